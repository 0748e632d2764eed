"""Tests of common.diffusion.operators: antialiased downsamplers (vs PIL and BlockAverage) and the learned operator."""

import numpy as np
import pytest
import torch
from PIL import Image

from common.diffusion.operators import (
    DOWNSAMPLE_KERNELS,
    Downsample,
    LearnedOperator,
    antialias_weights,
    downsample,
    fit_learned_operator,
    lanczos3,
)
from common.transforms.degrade import BlockAverage

PIL_FILTERS = {"bicubic": Image.BICUBIC, "box": Image.BOX, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("kernel", DOWNSAMPLE_KERNELS)
@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5])
def test_weights_sum_to_one_and_are_centred(kernel, factor):
    w, first = antialias_weights(kernel, factor)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
    offsets = first + torch.arange(len(w), dtype=torch.float64) - (factor - 1) / 2
    assert (w * offsets).sum().item() == pytest.approx(0.0, abs=1e-12)  # symmetric about the LR centre
    torch.testing.assert_close(w, w.flip(0))


def test_lanczos3_kernel():
    t = torch.tensor([0.0, 1.0, 2.0, -2.0, 2.999, 3.0, 4.5], dtype=torch.float64)
    out = lanczos3(t)
    assert out[0] == 1 and out[5] == 0 and out[6] == 0
    torch.testing.assert_close(out[1:4], torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", DOWNSAMPLE_KERNELS)
@pytest.mark.parametrize(
    "shape, factors",
    [((1, 1, 16, 16), (2, 2)), ((2, 3, 18, 24), (3, 3)), ((1, 1, 16, 20), (4, 4)), ((1, 2, 8, 12, 12), (1, 2, 2)),
     ((1, 1, 12, 8, 8), (4, 1, 1)), ((1, 1, 17, 11), (2, 3))],
)
def test_shapes_and_constants(kernel, shape, factors):
    op = Downsample(factors, kernel)
    x = torch.full(shape, 0.37, dtype=torch.float64)
    out = op(x)
    lr = tuple(s // f for s, f in zip(shape[2:], factors))
    assert out.shape == shape[:2] + lr == shape[:2] + op.lr_shape(shape[2:])
    torch.testing.assert_close(out, torch.full_like(out, 0.37))  # up to the borders: PIL renormalises there


@pytest.mark.parametrize(
    "shape, factors",
    [((2, 16, 16), (2, 2)), ((1, 18, 21), (3, 3)), ((1, 8, 12, 12), (1, 2, 2)), ((2, 9, 8, 8), (3, 2, 4))],
)
def test_box_equals_block_average_exactly(shape, factors):
    x = _rand(*shape, dtype=torch.float32)
    assert torch.equal(Downsample(factors, "box")(x[None])[0], BlockAverage(factors)(x))


@pytest.mark.parametrize("kernel", ["bicubic", "bilinear", "lanczos"])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_linear_ramp_lands_on_the_lr_centres(kernel, factor):
    # a symmetric kernel reproduces a linear function at its centre: LR voxel i reads the ramp at f·i + (f − 1)/2
    n = 12 * factor
    ramp = torch.arange(n, dtype=torch.float64)
    x = (0.5 + 0.01 * ramp)[:, None] + 0.02 * ramp[None, :]
    out = Downsample((factor, factor), kernel)(x[None, None])[0, 0]
    centres = factor * torch.arange(n // factor, dtype=torch.float64) + (factor - 1) / 2
    expected = (0.5 + 0.01 * centres)[:, None] + 0.02 * centres[None, :]
    reach = 3  # the kernel is truncated (and renormalised) within its support of the edges
    inner = (slice(reach, -reach), slice(reach, -reach))
    torch.testing.assert_close(out[inner], expected[inner], atol=1e-10, rtol=0)


@pytest.mark.parametrize("kernel", DOWNSAMPLE_KERNELS)
@pytest.mark.parametrize("factor, size", [(2, (24, 36)), (3, (27, 21)), (4, (32, 16))])
def test_matches_pil_resize(kernel, factor, size):
    # PIL's "F" images resample in float: same stretched kernel, same centres, same renormalised borders
    a = np.random.default_rng(factor).random(size).astype(np.float32)
    ref = np.asarray(Image.fromarray(a, mode="F").resize((size[1] // factor, size[0] // factor), PIL_FILTERS[kernel]))
    out = Downsample((factor, factor), kernel)(torch.from_numpy(a)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("kernel", DOWNSAMPLE_KERNELS)
def test_gradients_flow_and_operator_is_linear(kernel):
    op = Downsample((1, 2, 2), kernel)
    x = _rand(1, 1, 4, 8, 8).requires_grad_(True)
    y = op(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    a, b = _rand(1, 1, 4, 8, 8, seed=1), _rand(1, 1, 4, 8, 8, seed=2)
    torch.testing.assert_close(op(2 * a - 3 * b), 2 * op(a) - 3 * op(b))
    # the adjoint identity <A a, c> = <a, Aᵀ c> through autograd (a vector-Jacobian product)
    c = _rand(*y.shape, seed=3)
    x2 = a.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((op(x2) * c).sum(), x2)
    assert (op(a) * c).sum().item() == pytest.approx((a * g).sum().item(), rel=1e-10)


def test_functional_form_and_errors():
    x = _rand(1, 1, 8, 8)
    torch.testing.assert_close(downsample(x, 2), Downsample((2, 2))(x))
    with pytest.raises(ValueError):
        Downsample((2, 2), "gaussian")
    with pytest.raises(ValueError):
        Downsample((2, 2))(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError):
        Downsample((4, 4))(torch.zeros(1, 1, 2, 8))


@pytest.mark.parametrize("factors", [(2, 2), (1, 2, 2)])
def test_learned_operator_starts_as_the_fixed_downsampler(factors):
    op = LearnedOperator(factors, "bicubic")
    x = _rand(2, 1, *([4] * (len(factors) - 2)), 8, 8, dtype=torch.float32) - 0.5  # negative values pass too
    torch.testing.assert_close(op(x), Downsample(factors, "bicubic")(x), atol=1e-6, rtol=0)
    n_params = sum(p.numel() for p in op.net.parameters())
    k = 3 ** len(factors)
    assert n_params == (k * 64 + 64) + (k * 64 + 1)


def test_learned_operator_fits_a_known_degradation():
    # pairs made by a 3x3 blur then bicubic x2: exactly representable by the CNN, not by bicubic alone
    torch.manual_seed(0)
    hr = _rand(8, 1, 24, 24, dtype=torch.float32)
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    lr = Downsample((2, 2))(torch.nn.functional.conv2d(hr, blur[None, None], padding=1))
    op = LearnedOperator((2, 2), "bicubic")
    start = torch.nn.functional.mse_loss(op(hr), lr).item()
    losses = fit_learned_operator(op, hr, lr, steps=150, learning_rate=3e-3, batch_size=4,
                                  generator=torch.Generator().manual_seed(0))
    assert len(losses) == 150
    with torch.no_grad():
        end = torch.nn.functional.mse_loss(op(hr), lr).item()
    assert end < start / 10
    assert not op.training
