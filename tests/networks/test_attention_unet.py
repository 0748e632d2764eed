"""Tests of common.networks.attention_unet: covariate tokens (NaN = unknown), the U-Net's shapes 2D/3D and odd sizes,
the residual to the target slice, the context's effect and ablations, TorchScript, bf16, parameter counts."""

import math
import warnings

import pytest
import torch

from common.networks.adadm import AdaDM, AdaDMResBlock
from common.networks.attention_unet import COVARIATES, AttentionResUNet, CovariateEncoder, SpatialAttention
from network_helpers import n_params, randomize

NAN = math.nan
TINY = dict(channels=(8, 16, 16), num_res_blocks=1, norm_num_groups=4, num_head_channels=8, context_dim=8,
            cross_attention_levels=(False, True, True))
TINY_3D = {**TINY, "spatial_dims": 3, "in_channels": 5}
CONTEXT = torch.tensor([[0.4, 1.0, 0.0, -0.2], [NAN, 0.0, NAN, 0.3]])


def cross_attentions(net) -> list:
    return [m for m in net.modules() if isinstance(m, SpatialAttention) and m.cross]


# ---- CovariateEncoder ----


def test_covariates_and_token_shape():
    assert COVARIATES == ("age", "sex", "group", "slice_position")
    enc = CovariateEncoder(16)
    assert enc.kinds == ("continuous", "categorical", "categorical", "continuous")
    tokens = enc(torch.rand(3, 4))
    assert tokens.shape == (3, 4, 16) and tokens.dtype == torch.float32


def test_unknown_values_share_one_token():
    """Two samples whose entries are all unknown, in different spellings (NaN, or a category out of range), get the
    same tokens; the known entries of a third sample differ from them."""
    torch.manual_seed(0)
    enc = CovariateEncoder(8)
    ctx = torch.tensor([[NAN, NAN, NAN, NAN], [NAN, -1.0, 7.0, NAN], [0.5, 1.0, 0.0, 0.1]], dtype=torch.float64)
    t = enc(ctx)
    torch.testing.assert_close(t[0], t[1])
    assert torch.isfinite(t).all()
    for i in range(4):
        assert (t[2, i] - t[0, i]).abs().max() > 1e-3, COVARIATES[i]


def test_known_values_are_encoded():
    torch.manual_seed(0)
    enc = CovariateEncoder(8)
    t = enc(torch.tensor([[0.2, 0.0, 0.0, -0.5], [0.7, 1.0, 1.0, 0.5], [0.2, 0.0, 1.0, -0.5]]))
    for i in range(4):
        assert (t[0, i] - t[1, i]).abs().max() > 1e-3, COVARIATES[i]
    torch.testing.assert_close(t[0, :2], t[2, :2])  # one token per covariate: the group changes only its own
    assert (t[0, 2] - t[2, 2]).abs().max() > 1e-3
    # continuous: Linear(1, d) of the value, plus the covariate's type embedding
    lin = enc.tokens[0].linear
    torch.testing.assert_close(t[0, 0], lin.weight[:, 0] * 0.2 + lin.bias + enc.type_embedding[0])


def test_unknown_gradients_stay_finite():
    enc = CovariateEncoder(8)
    enc(torch.tensor([[NAN, NAN, 1.0, 0.3], [0.5, 0.0, NAN, NAN]])).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.tokens[0].unknown.grad.abs().sum() > 0  # the unknown age was used
    assert enc.tokens[2].embedding.weight.grad[2].abs().sum() > 0  # the unknown group's row


def test_covariate_kinds_are_configurable():
    enc = CovariateEncoder(4, kinds=("categorical", "continuous"), num_categories=3)
    assert enc(torch.tensor([[2.0, 0.1], [NAN, NAN]])).shape == (2, 2, 4)
    with pytest.raises(ValueError):
        CovariateEncoder(4, kinds=("ordinal",))
    with pytest.raises(ValueError):
        enc(torch.zeros(2, 4))


# ---- AttentionResUNet ----


@pytest.mark.parametrize(
    "config, shape",
    [
        (TINY, (2, 3, 16, 16)),
        (TINY, (1, 3, 13, 19)),  # padded to multiples of 4, cropped back
        ({**TINY, "in_channels": 5, "num_res_blocks": 2}, (2, 5, 20, 20)),
        ({**TINY, "channels": (8, 16, 16, 16), "cross_attention_levels": (False, False, True, True)}, (1, 3, 21, 10)),
        (TINY_3D, (2, 5, 8, 8, 8)),
        (TINY_3D, (1, 5, 7, 5, 9)),
    ],
)
def test_forward_shape(config, shape):
    torch.manual_seed(0)
    net = randomize(AttentionResUNet(**config))
    for ctx in (CONTEXT[: shape[0]], None):
        y = net(torch.randn(shape), ctx)
        assert y.shape == (shape[0], 1) + shape[2:]
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("in_channels, index", [(3, 1), (5, 2), (3, -1)])
def test_untrained_output_is_the_residual_channel(in_channels, index):
    torch.manual_seed(0)
    net = AttentionResUNet(**{**TINY, "in_channels": in_channels, "residual_index": index})
    x = torch.randn(2, in_channels, 12, 10)
    k = index % in_channels
    assert torch.equal(net(x, CONTEXT), x[:, k : k + 1])  # exact: the head's weights and bias are zero
    assert torch.equal(net(x), x[:, k : k + 1])


def test_context_conditions_the_output_per_sample():
    torch.manual_seed(0)
    net = randomize(AttentionResUNet(**TINY)).eval()
    x = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        y = net(x, CONTEXT)
        other = CONTEXT.clone()
        other[0] = torch.tensor([-0.8, 0.0, 1.0, 0.4])
        y2 = net(x, other)
        assert (y2[0] - y[0]).abs().max() > 1e-4  # float32 noise here: ~1e-7
        torch.testing.assert_close(y2[1], y[1])  # GroupNorm, AdaDM and attention are per sample
        # None = every covariate unknown
        torch.testing.assert_close(net(x), net(x, torch.full((2, 4), NAN)))
        assert (net(x) - y).abs().max() > 1e-4


@pytest.mark.parametrize("context_dim", [None, 0])
def test_without_context_there_is_no_cross_attention(context_dim):
    torch.manual_seed(0)
    net = randomize(AttentionResUNet(**{**TINY, "context_dim": context_dim}))
    assert net.covariate_encoder is None and cross_attentions(net) == []
    assert sum(isinstance(m, SpatialAttention) for m in net.modules()) == 1  # the bottleneck's self-attention
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, CONTEXT), net(x))  # the context is ignored


def test_structure():
    net = AttentionResUNet(**{**TINY, "channels": (8, 16, 16, 16), "num_res_blocks": 2,
                              "cross_attention_levels": (False, False, True, True)})
    # 2 per encoder and decoder stage of the last two stages, plus the bottleneck's
    assert len(cross_attentions(net)) == 2 * 2 * 2 + 1
    assert sum(isinstance(m, AdaDMResBlock) for m in net.modules()) == 2 * 2 * 4 + 2
    assert sum(isinstance(m, AdaDM) for m in net.modules()) == 2 * 2 * 4 + 2
    assert [s.blocks[0].in_channels for s in net.decoder] == [32, 32, 32, 16]  # one skip concatenated per stage


def test_plain_blocks_have_no_adadm_parameters():
    net = AttentionResUNet(**{**TINY, "use_adadm": False})
    assert not any(isinstance(m, AdaDM) for m in net.modules())
    blocks = sum(isinstance(m, AdaDMResBlock) for m in net.modules())
    assert n_params(AttentionResUNet(**TINY)) - n_params(net) == 2 * blocks


@pytest.mark.parametrize("config, shape", [(TINY, (2, 3, 12, 10)), (TINY_3D, (2, 5, 6, 4, 5))])
def test_backward_reaches_every_parameter(config, shape):
    torch.manual_seed(0)
    net = randomize(AttentionResUNet(**config))
    # sample 0 all known, sample 1 mixes unknowns: every embedding row in use gets a gradient
    net(torch.randn(shape), torch.tensor([[0.4, 1.0, 0.0, -0.2], [NAN, NAN, NAN, NAN]])).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "config, shape",
    [(TINY, (2, 3, 10, 12)), ({**TINY, "context_dim": None, "residual_index": 1}, (2, 3, 9, 8)),
     ({**TINY_3D, "use_adadm": False}, (2, 5, 6, 5, 4))],
)
def test_torchscript(config, shape):
    torch.manual_seed(0)
    net = randomize(AttentionResUNet(**config)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(net)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, CONTEXT), net(x, CONTEXT))
        torch.testing.assert_close(scripted(x), net(x))  # the image alone, as verify_net_in_out calls it


def test_bf16_autocast_channels_last():
    torch.manual_seed(0)
    net = randomize(AttentionResUNet(**{**TINY, "residual_index": 1}), std=0.05)
    x = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        ref = net(x, CONTEXT)
        net = net.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x.to(memory_format=torch.channels_last), CONTEXT)
    assert y.dtype == torch.float32  # the residual slice promotes the bf16 head output
    assert (y - ref).norm() / ref.norm() < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, CONTEXT).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "kwargs",
    [{"spatial_dims": 1}, {"cross_attention_levels": (True,)}, {"num_res_blocks": 0}, {"residual_index": 3},
     {"residual_index": 0, "out_channels": 2}, {"norm_num_groups": 3}],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        AttentionResUNet(**{**TINY, **kwargs})


@pytest.mark.parametrize(
    "config, expected",
    [
        # The thesis configuration: 2D, 3 input slices, channels (64, 128, 128, 128), 3 AdaDM residual blocks per
        # encoder and decoder stage (one skip concatenation per stage), GroupNorm 32, bottleneck res-self-attn-
        # cross-attn-res, cross-attention after every residual block of stages 3 and 4 (context_dim 64, 4 covariate
        # tokens, heads of 32 channels), nearest+conv3 up, GN-SiLU-conv3 head: 7,967,605 parameters.
        (dict(), 7_967_605),
        # The CPU configuration: the same with channels (32, 64, 64, 96) and 1 residual block per stage:
        # 1,443,125 parameters.
        (dict(channels=(32, 64, 64, 96), num_res_blocks=1), 1_443_125),
    ],
)
def test_parameter_counts(config, expected):
    net = AttentionResUNet(spatial_dims=2, in_channels=3, out_channels=1, norm_num_groups=32,
                           cross_attention_levels=(False, False, True, True), context_dim=64, **config)
    assert n_params(net) == expected


def test_command_line_strings_are_read_as_flags():
    """``--use_adadm false`` and ``--cross_attention_levels "[false, true, true]"`` reach the network as the
    strings "false"/"true" (MONAI's CLI keeps JSON words as strings; bool("false") is True): read as flags."""
    as_strings = AttentionResUNet(**{**TINY, "use_adadm": "false", "cross_attention_levels": ["false", "true", "true"]})
    as_bools = AttentionResUNet(**{**TINY, "use_adadm": False, "cross_attention_levels": [False, True, True]})
    assert n_params(as_strings) == n_params(as_bools)
    assert not any(isinstance(m, AdaDM) for m in as_strings.modules())
    assert len(cross_attentions(as_strings)) == len(cross_attentions(as_bools))
    with pytest.raises(ValueError):
        AttentionResUNet(**{**TINY, "use_adadm": "maybe"})
