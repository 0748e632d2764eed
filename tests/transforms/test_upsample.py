"""Grid-aligned upsampling against scipy.ndimage.zoom(grid_mode=True) and torch's own interpolation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from common.transforms.degrade import BlockAverage
from common.transforms.upsample import GridUpsample

SCIPY_CASES = [  # mode, scipy order, scipy boundary mode that matches ours
    ("nearest", 0, "nearest"),
    ("linear", 1, "nearest"),
    ("bspline", 3, "grid-mirror"),
]


@pytest.mark.parametrize("mode, order, boundary", SCIPY_CASES)
@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 2, 2), (1, 1, 4), (3, 2, 1)])
def test_matches_scipy_zoom_grid_mode(mode, order, boundary, factors):
    x = np.random.default_rng(1).random((5, 7, 6)).astype(np.float32)
    ours = GridUpsample(factors, mode)(torch.from_numpy(x)[None, None])[0, 0].numpy()
    ref = ndimage.zoom(x, factors, order=order, grid_mode=True, mode=boundary)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 40, 20), (1, 10, 33)])
def test_bspline_matches_scipy_on_axes_longer_and_shorter_than_the_prefilter(shape):
    """Axes longer than the prefilter's 16-voxel radius take the mirrored-ends padding, shorter ones the index path.

    In float64, and with a single slice on the factor-1 axis: scipy's own prefilter along a factor-1 axis of a few
    voxels is not the identity to 1e-5, whereas ours skips that axis.
    """
    x = np.random.default_rng(2).random(shape)
    ours = GridUpsample((1, 2, 3), "bspline")(torch.from_numpy(x)[None, None])[0, 0].numpy()
    ref = ndimage.zoom(x, (1, 2, 3), order=3, grid_mode=True, mode="grid-mirror")
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic", "bspline"])
def test_differentiable(mode):
    x = torch.rand(1, 1, 3, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GridUpsample((1, 2), mode).double(), (x,))


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_cubic_matches_torch_bicubic(factor):
    x = torch.rand(2, 1, 9, 11)
    ours = GridUpsample((factor, factor), "cubic", cubic_a=-0.75)(x)
    ref = F.interpolate(x, scale_factor=float(factor), mode="bicubic", align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_half_voxel_shift_costs_accuracy():
    """Grid alignment matters: an upsampler shifted by half an HR voxel is clearly worse on a smooth image."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 64)] * 3, indexing="ij")
    hr = torch.tensor(np.exp(-3 * (x**2 + y**2 + z**2)) + 0.3 * np.sin(4 * y), dtype=torch.float32)[None]
    lr = BlockAverage((1, 2, 2))(hr)
    aligned = GridUpsample((1, 2, 2), "cubic")(lr[None])[0]
    shifted = F.interpolate(lr[None], scale_factor=(1.0, 2.0, 2.0), mode="trilinear", align_corners=True)[0]
    err_aligned = (aligned - hr).abs().mean()
    err_shifted = (shifted - hr).abs().mean()
    assert err_aligned < 0.7 * err_shifted


@pytest.mark.parametrize("mode", ["linear", "cubic", "bspline"])
def test_reproduces_linear_ramps(mode):
    ramp = torch.arange(24, dtype=torch.float32).reshape(1, 1, 24)
    up = GridUpsample((2,), mode)(ramp)[0, 0].numpy()
    expected = (np.arange(48) + 0.5) / 2 - 0.5
    # the B-spline's mirrored border decays as |sqrt(3) - 2|^n, so look a few LR voxels in from the ends
    inner = slice(14, -14) if mode == "bspline" else slice(4, -4)
    np.testing.assert_allclose(up[inner], expected[inner], atol=1e-3)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        GridUpsample((1, 2), "lanczos")
    with pytest.raises(ValueError):
        GridUpsample((1, 0))
    with pytest.raises(ValueError):
        GridUpsample((2, 2))(torch.zeros(1, 1, 4, 4, 4))
