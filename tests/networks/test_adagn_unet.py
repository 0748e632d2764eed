"""Tests of common.networks.adagn_unet: paper parameter counts, shapes 2D/3D, TorchScript, bf16 autocast."""

import warnings

import pytest
import torch

from common.networks.adagn_unet import (
    PAPER_CONFIGS,
    AdaGNUNet,
    AdaGroupNorm,
    AttentionBlock,
    FourierFeatures,
    ResBlock,
    adagn_unet_paper_2p5d,
    adagn_unet_paper_3d,
    num_groups,
)
from network_helpers import n_params, randomize

TINY_2D = dict(spatial_dims=2, in_channels=3, out_channels=1, channels=(8, 16, 16), cond_channels=32)
TINY_3D = dict(spatial_dims=3, in_channels=2, out_channels=1, channels=(8, 16), cond_channels=16)


@pytest.mark.parametrize(
    "factory, expected, millions",
    [(adagn_unet_paper_3d, 50_713_153, 50.71), (adagn_unet_paper_2p5d, 51_144_577, 51.14)],
)
def test_paper_parameter_counts(factory, expected, millions):
    torch.manual_seed(0)
    count = n_params(factory())
    assert count == expected
    assert round(count / 1e6, 2) == millions


@pytest.mark.parametrize(
    "config, shape",
    [
        (TINY_2D, (2, 3, 16, 16)),
        (TINY_2D, (1, 3, 13, 10)),  # padded to multiples of 4, cropped back
        ({**TINY_2D, "out_channels": 2, "num_res_blocks": 1}, (2, 3, 7, 9)),
        ({**TINY_2D, "channels": (8,), "attention_levels": (True,)}, (2, 3, 5, 6)),
        (TINY_3D, (2, 2, 8, 8, 8)),
        (TINY_3D, (1, 2, 5, 6, 7)),
        ({**TINY_3D, "channels": (8, 8, 16), "num_res_blocks": (1, 2, 1)}, (1, 2, 9, 4, 6)),
    ],
)
def test_forward_shape(config, shape):
    torch.manual_seed(0)
    net = randomize(AdaGNUNet(**config))
    y = net(torch.randn(shape), torch.randn(shape[0]))
    assert y.shape == (shape[0], config["out_channels"]) + shape[2:]
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("config, shape", [(TINY_2D, (2, 3, 12, 10)), (TINY_3D, (2, 2, 6, 6, 5))])
def test_backward_reaches_every_parameter(config, shape):
    torch.manual_seed(0)
    net = randomize(AdaGNUNet(**config))
    net(torch.randn(shape), torch.rand(shape[0])).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_zero_init_output_and_identity_attention():
    torch.manual_seed(0)
    net = AdaGNUNet(**TINY_2D)
    y = net(torch.randn(2, 3, 8, 8), torch.randn(2))  # conv_out weights start at zero (DIAMOND): y = its bias
    torch.testing.assert_close(y, net.conv_out.bias.reshape(1, -1, 1, 1).expand_as(y))
    attn = AttentionBlock(16, spatial_dims=2)
    x = torch.randn(2, 16, 4, 5)
    torch.testing.assert_close(attn(x), x)


def test_noise_level_conditions_the_output():
    torch.manual_seed(0)
    net = randomize(AdaGNUNet(**TINY_2D))
    x = torch.randn(2, 3, 8, 8)
    assert (net(x, torch.tensor([0.1, 0.1])) - net(x, torch.tensor([0.5, 0.5]))).abs().max() > 1e-3
    # one value for the whole batch broadcasts
    torch.testing.assert_close(net(x, torch.tensor([0.3])), net(x, torch.tensor([0.3, 0.3])))


def test_structure_matches_diamond():
    net = AdaGNUNet(**{**TINY_2D, "channels": (8, 16, 16, 32)})
    assert [len(level.blocks) for level in net.encoder] == [2, 2, 2, 2]
    assert [len(level.blocks) for level in net.decoder] == [3, 3, 3, 3]  # one more: consumes the level's input
    assert len(net.middle) == 2
    # attention: 2 encoder + 3 decoder blocks of the deepest level, and both middle blocks
    assert sum(isinstance(m, AttentionBlock) for m in net.modules()) == 7
    assert sum(isinstance(m, ResBlock) for m in net.modules()) == 2 * 4 + 3 * 4 + 2
    assert not any(p.numel() for p in net.noise_emb.parameters())  # W is a fixed buffer


@pytest.mark.parametrize("channels, groups", [(8, 1), (32, 1), (64, 2), (96, 3), (100, 2), (384, 12), (512, 16)])
def test_num_groups(channels, groups):
    assert num_groups(channels) == groups


def test_ada_group_norm_modulation():
    torch.manual_seed(0)
    norm = AdaGroupNorm(8, cond_channels=4, spatial_dims=3)
    x, cond = torch.randn(2, 8, 3, 4, 5), torch.randn(2, 4)
    with torch.no_grad():
        norm.linear.weight.zero_()
        norm.linear.bias.zero_()
        torch.testing.assert_close(norm(x, cond), torch.nn.functional.group_norm(x, 1))
        norm.linear.bias[:8] = 1.0  # scale = 1 -> doubles
        norm.linear.bias[8:] = 0.5  # shift
        torch.testing.assert_close(norm(x, cond), 2 * torch.nn.functional.group_norm(x, 1) + 0.5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ada_group_norm_equals_the_formula(spatial_dims, channels_last):
    """GN + one addcmul is GN(x) * (1 + scale) + shift per sample, in value and in gradient, contiguous or
    channels-last (the layout is kept)."""
    torch.manual_seed(0)
    norm = AdaGroupNorm(8, cond_channels=4, spatial_dims=spatial_dims)
    torch.nn.init.normal_(norm.linear.weight)
    shape = (3, 8, 5, 6) if spatial_dims == 2 else (3, 8, 3, 4, 5)
    x, cond = torch.randn(shape) * 2 + 1, torch.randn(3, 4)  # a different modulation per sample
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    if channels_last:
        x = x.contiguous(memory_format=layout)
    x.requires_grad_()
    out = norm(x, cond)
    assert out.is_contiguous(memory_format=layout) == channels_last
    scale, shift = norm.linear(cond).reshape(3, 16, *[1] * spatial_dims).chunk(2, dim=1)
    x_ref = x.detach().clone().contiguous().requires_grad_()
    ref = torch.nn.functional.group_norm(x_ref, norm.groups, eps=norm.eps) * (1 + scale) + shift
    torch.testing.assert_close(out, ref)
    weights = torch.randn(shape)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_block_equals_the_formula(spatial_dims, channels_last):
    """x + proj(softmax(q kᵀ / sqrt(d)) v) per head, q, k, v the qkv conv's channels in (3, heads, head_dim) order
    (the order of the shipped weights), whatever the input's layout."""
    torch.manual_seed(0)
    attn = AttentionBlock(16, spatial_dims=spatial_dims, head_dim=4)
    torch.nn.init.normal_(attn.proj.weight)
    shape = (2, 16, 5, 6) if spatial_dims == 2 else (2, 16, 3, 4, 5)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
    qkv = attn.qkv(attn.norm(x)).reshape(2, 3, 4, 4, -1)  # (B, q/k/v, heads, head_dim, N)
    q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, N, head_dim)
    y = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    ref = x + attn.proj(y.transpose(-1, -2).reshape(shape))
    torch.testing.assert_close(attn(x), ref, rtol=1e-4, atol=1e-5)


def test_fourier_features():
    torch.manual_seed(0)
    ff = FourierFeatures(16)
    c = torch.linspace(-1, 1, 5)
    f = ff(c)
    assert f.shape == (5, 16)
    torch.testing.assert_close(f.square().sum(1), torch.full((5,), 8.0))  # cos² + sin² per frequency
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ff(c).dtype == torch.float32
    with pytest.raises(ValueError):
        FourierFeatures(7)


@pytest.mark.parametrize("config, shape", [(TINY_2D, (2, 3, 10, 12)), (TINY_3D, (2, 2, 6, 5, 4))])
def test_torchscript(config, shape):
    torch.manual_seed(0)
    net = randomize(AdaGNUNet(**config)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(net)
    x, c = torch.randn(shape), torch.randn(shape[0])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, c), net(x, c))


@pytest.mark.parametrize("config, shape", [(TINY_2D, (2, 3, 16, 12)), (TINY_3D, (2, 2, 8, 8, 4))])
def test_bf16_autocast(config, shape):
    torch.manual_seed(0)
    net = randomize(AdaGNUNet(**config), std=0.05)
    x, c = torch.randn(shape), torch.randn(shape[0])
    with torch.no_grad():
        ref = net(x, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x, c)
    assert y.shape == ref.shape and torch.isfinite(y.float()).all()
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, c).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_noise_cond_embedding():
    torch.manual_seed(0)
    net = randomize(AdaGNUNet(**TINY_2D, noise_cond_embedding=True))
    assert n_params(net) == n_params(AdaGNUNet(**TINY_2D))  # a buffer, no parameters
    x, c = torch.randn(1, 3, 8, 8), torch.randn(1)
    assert (net(x, c, torch.tensor([0.5])) - net(x, c)).abs().max() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spatial_dims": 1},
        {"num_res_blocks": (2, 2)},
        {"attention_levels": (True,)},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        AdaGNUNet(**{**TINY_2D, **kwargs})


def test_paper_configs_are_generic_constructor_arguments():
    for key, cfg in PAPER_CONFIGS.items():
        assert cfg["spatial_dims"] == (3 if key == "3d" else 2)
    net = adagn_unet_paper_2p5d(channels=(8, 16), cond_channels=16, attention_levels=(False, True))
    assert net.in_channels == 3 and net.spatial_dims == 2
