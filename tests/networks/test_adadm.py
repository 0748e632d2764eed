"""Tests of common.networks.adadm: the modulation h * exp(w ln σ(x) + b), its gradients, the zero-initialised block,
the ablation without AdaDM, and the scale equivariance that AdaDM gives back to a normalised residual block."""

import warnings

import pytest
import torch

from common.networks.adadm import AdaDM, AdaDMResBlock, _deviation, _deviation_no_grad
from network_helpers import randomize


def with_std(shape, stds, seed=0) -> torch.Tensor:
    """A random tensor whose sample ``i`` has standard deviation exactly ``stds[i]`` (torch's unbiased std)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.3
    flat = x.flatten(1)
    target = torch.tensor(stds, dtype=torch.float64)[:, None]
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True) * target
    return (flat + 0.7).reshape(shape).float()  # the mean does not count


@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (2, 3, 4, 5, 3)])
def test_identity_at_init_for_unit_std(shape):
    h = torch.randn(shape)
    torch.testing.assert_close(AdaDM()(h, with_std(shape, [1.0, 1.0])), h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (2, 3, 4, 5, 3)])
def test_scales_by_the_input_std_per_sample(shape):
    h = torch.randn(shape)
    out = AdaDM()(h, with_std(shape, [0.25, 3.0]))
    torch.testing.assert_close(out[0], 0.25 * h[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], 3.0 * h[1], rtol=1e-5, atol=1e-6)


def test_learned_exponent_and_bias():
    m = AdaDM()
    assert m.weight.item() == 1.0 and m.bias.item() == 0.0  # the paper's initialisation
    with torch.no_grad():
        m.weight.fill_(2.0)
        m.bias.fill_(0.5)
    h = torch.randn(2, 3, 4, 4)
    out = m(h, with_std((2, 5, 4, 4), [0.5, 2.0]))  # x and h may differ in channels
    expected = h * torch.exp(torch.tensor(0.5)) * torch.tensor([0.25, 4.0]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_weight_and_bias_get_gradients():
    m = AdaDM()
    x = with_std((2, 3, 5, 5), [0.5, 2.0]).requires_grad_()
    m(torch.randn(2, 3, 5, 5), x).square().sum().backward()
    for p in (m.weight, m.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().item() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0  # the statistic is differentiated too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, layout",
    [
        ((2, 8, 9, 7), torch.channels_last),  # fewer entries than one piece: float64 sums only
        ((2, 8, 16, 16), torch.channels_last),  # whole pieces of 1024
        ((2, 8, 13, 11), torch.channels_last),  # pieces and a tail
        ((2, 4, 5, 6, 3), torch.channels_last_3d),
        ((2, 4, 8, 8, 5), torch.channels_last_3d),
    ],
)
@pytest.mark.parametrize("offset", [0.0, 20.0, 100.0])
def test_inference_deviation_equals_the_differentiable_one(dtype, shape, layout, offset):
    """Without autograd (no copy of x): float32 entries from float64 sums, the same float32 value; bf16 entries
    from float32 sums of pieces with float64 totals, within 1e-5 whatever the layout or mean, including means that
    dwarf the deviation (100 / 3: the float64 sums of every entry, where float32 sums of squares would cancel)."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + offset).to(dtype)
    rtol = 1e-6 if dtype == torch.float32 else 1e-5
    for x_in in (x, x.contiguous(memory_format=layout), x.transpose(1, 2)):
        torch.testing.assert_close(_deviation_no_grad(x_in), _deviation(x), rtol=rtol, atol=0)
    m = AdaDM()
    h = torch.randn(shape)
    with torch.no_grad():
        fast = m(h, x)
    torch.testing.assert_close(fast, m(h, x.detach().clone().requires_grad_()), rtol=rtol, atol=0)


@pytest.mark.parametrize(
    "offset, dtype, float64_sums",
    [(0.0, torch.bfloat16, False), (20.0, torch.bfloat16, False), (100.0, torch.bfloat16, True),
     (0.0, torch.float32, True)],
)
def test_float64_sums_take_over_when_the_mean_dwarfs_the_deviation(monkeypatch, offset, dtype, float64_sums):
    """For bf16 the pieces' float32 sums serve while mean² <= 100 var; beyond it, and for float32 entries, every
    entry is summed in float64."""
    import common.networks.adadm as adadm

    calls = []
    monkeypatch.setattr(adadm, "_deviation_float64", lambda x: calls.append(1) or _deviation(x))
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(2)) * 3 + offset
    adadm._deviation_no_grad(x.to(dtype).contiguous(memory_format=torch.channels_last))
    assert bool(calls) == float64_sums


def test_constant_input_stays_finite():
    """An empty (constant) slice: σ = 0, the eps keeps the log finite and the gradients are not NaN."""
    m = AdaDM()
    x = torch.full((2, 3, 4, 4), -1.0, requires_grad=True)
    h = torch.randn(2, 3, 4, 4)
    out = m(h, x)
    torch.testing.assert_close(out, h * m.eps)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()


def test_bf16_keeps_the_dtype_of_h():
    h = torch.randn(2, 3, 4, 4).bfloat16()
    x = with_std((2, 3, 4, 4), [2.0, 2.0]).bfloat16()
    out = AdaDM()(h, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), 2.0 * h.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize(
    "spatial_dims, cin, cout, shape",
    [(2, 8, 8, (2, 8, 6, 7)), (2, 8, 16, (2, 8, 6, 7)), (3, 4, 8, (1, 4, 5, 4, 3))],
)
def test_block_starts_as_its_skip(spatial_dims, cin, cout, shape):
    torch.manual_seed(0)
    block = AdaDMResBlock(spatial_dims, cin, cout, norm_num_groups=4)
    assert not block.conv2.weight.any() and not block.conv2.bias.any()
    x = torch.randn(shape)
    y = block(x)
    assert y.shape == (shape[0], cout) + shape[2:]
    torch.testing.assert_close(y, x if cin == cout else block.skip(x))
    assert isinstance(block.skip, torch.nn.Identity) == (cin == cout)


def test_plain_block_has_no_adadm_parameters():
    with_adadm = AdaDMResBlock(2, 8, 16, norm_num_groups=4)
    plain = AdaDMResBlock(2, 8, 16, norm_num_groups=4, use_adadm=False)
    assert plain.adadm is None and not any(isinstance(m, AdaDM) for m in plain.modules())
    assert not any("adadm" in name for name, _ in plain.named_parameters())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(with_adadm) - n(plain) == 2  # w and b


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 8, 8, 6)), (3, (2, 8, 4, 5, 4))])
def test_adadm_makes_the_block_scale_equivariant(spatial_dims, shape):
    """The branch starts with GroupNorm, so it forgets the input's scale; AdaDM (w=1, b=0) gives it back:
    block(k·x) = k·block(x) with an identity skip. The plain block lacks that (the point of the paper)."""
    x, k = torch.randn(shape), 5.0
    block = randomize(AdaDMResBlock(spatial_dims, 8, 8, norm_num_groups=4))
    with torch.no_grad():
        block.adadm.weight.fill_(1.0)
        block.adadm.bias.fill_(0.0)
        torch.testing.assert_close(block(k * x), k * block(x), rtol=1e-4, atol=1e-4)
        plain = randomize(AdaDMResBlock(spatial_dims, 8, 8, norm_num_groups=4, use_adadm=False))
        assert (plain(k * x) - k * plain(x)).abs().max() > 0.1


def test_block_backward_reaches_every_parameter():
    block = randomize(AdaDMResBlock(2, 4, 8, norm_num_groups=2))
    block(torch.randn(2, 4, 6, 6)).square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_invalid_groups():
    with pytest.raises(ValueError):
        AdaDMResBlock(2, 8, 12, norm_num_groups=8)


@pytest.mark.parametrize("use_adadm", [True, False])
def test_torchscript(use_adadm):
    block = randomize(AdaDMResBlock(2, 4, 8, norm_num_groups=2, use_adadm=use_adadm)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(block)
    x = torch.randn(2, 4, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), block(x))
