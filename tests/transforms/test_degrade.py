"""Degradations: known values, preserved constants, kept low frequencies, and the LR geometry they imply."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.data.io import lr_affine
from common.transforms.degrade import (
    BlockAverage,
    BlockAveraged,
    GaussianDecimation,
    KSpaceTruncation,
    KSpaceTruncationd,
    RicianNoise,
    SplineDownsample,
    ThickSlices,
)

RESAMPLERS = [BlockAverage, KSpaceTruncation, GaussianDecimation, SplineDownsample]


def test_block_average_known_array():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    out = BlockAverage((2, 2))(x)
    np.testing.assert_allclose(out[0].numpy(), [[2.5, 4.5], [10.5, 12.5]])
    # trailing voxels that do not fill a block are dropped
    assert BlockAverage((1, 2, 2))(torch.ones(1, 3, 5, 7)).shape == (1, 3, 2, 3)


@pytest.mark.parametrize("cls", RESAMPLERS)
@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 2, 2), (1, 1, 3)])
def test_constant_stays_constant(cls, factors):
    x = torch.full((1, 12, 12, 12), 3.7)
    out = cls(factors)(x)
    assert out.shape == (1, *(12 // f for f in factors))
    np.testing.assert_allclose(out.numpy(), 3.7, rtol=1e-5)


@pytest.mark.parametrize("cls", RESAMPLERS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_metatensor_gets_lr_affine(cls, ndim):
    hr_aff = torch.diag(torch.tensor([0.8, 1.0, 1.2, 1.0], dtype=torch.float64))
    hr_aff[:3, 3] = torch.tensor([3.0, -4.0, 5.0])
    factors = (1, 2, 2)[:ndim] if ndim == 3 else (2, 2)
    x = MetaTensor(torch.rand(1, *([8] * ndim)), affine=hr_aff)
    out = cls(factors)(x)
    assert isinstance(out, MetaTensor)
    np.testing.assert_allclose(out.affine.numpy(), lr_affine(hr_aff.numpy(), factors), atol=1e-12)
    assert isinstance(cls(factors)(np.random.rand(1, *([8] * ndim)).astype(np.float32)), np.ndarray)


def test_kspace_keeps_low_frequencies_at_lr_voxel_centres():
    n, f = 32, 2
    i = np.arange(n)

    def signal(t):
        return np.cos(2 * np.pi * 3 * t / n) + 0.5 * np.sin(2 * np.pi * 5 * t / n)

    lr = KSpaceTruncation([f])(torch.tensor(signal(i), dtype=torch.float32)[None])[0].numpy()
    centres = f * np.arange(n // f) + (f - 1) / 2  # HR index of each LR voxel centre (methods.md §0)
    np.testing.assert_allclose(lr, signal(centres), atol=1e-5)
    # its spectrum is the HR spectrum's low band (up to the centring phase)
    hr_spec = np.fft.fft(signal(i))
    lr_spec = np.fft.fft(lr) * (n / (n // f))
    k = np.fft.fftfreq(n // f, 1 / (n // f)).astype(int)
    phase = np.exp(2j * np.pi * k * (f - 1) / 2 / n)
    np.testing.assert_allclose(np.abs(lr_spec[1:7]), np.abs(hr_spec[k[1:7]] * phase[1:7]), atol=1e-3)


def test_kspace_removes_high_frequencies():
    n = 32
    x = torch.tensor(np.cos(2 * np.pi * 14 * np.arange(n) / n), dtype=torch.float32)[None]  # above the LR Nyquist (8)
    assert KSpaceTruncation([2])(x).abs().max() < 1e-4
    assert BlockAverage([2])(x).abs().max() > 0.05  # the box filter lets it alias through


def test_gaussian_decimation_centred_and_blurs():
    ramp = torch.arange(20, dtype=torch.float32)[None]
    out = GaussianDecimation([2])(ramp)[0].numpy()
    # a symmetric kernel centred on the LR voxel centre reproduces a ramp there (away from the padded ends)
    np.testing.assert_allclose(out[2:-2], 2 * np.arange(10)[2:-2] + 0.5, atol=1e-4)
    spike = torch.zeros(1, 40)
    spike[0, 20] = 1
    assert (GaussianDecimation([2], sigma=2.0)(spike) > 1e-3).sum() >= 5
    assert (GaussianDecimation([2])(spike) > 1e-3).sum() <= 3


def test_spline_matches_known_value():
    x = torch.arange(32, dtype=torch.float32)[None]
    out = SplineDownsample([2])(x)[0].numpy()
    # cubic splines reproduce a ramp: LR voxel i takes the value at HR index 2i + 0.5 (away from the mirrored ends)
    np.testing.assert_allclose(out[4:-4], 2 * np.arange(16)[4:-4] + 0.5, atol=1e-4)


def test_thick_slices_average_along_one_axis():
    x = torch.arange(8, dtype=torch.float32).reshape(1, 1, 1, 8).expand(1, 2, 2, 8)
    out = ThickSlices(axis=2, thickness=4)(x)
    assert out.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [1.5, 5.5])


def test_rician_noise_is_seeded_and_positive():
    x = torch.zeros(1, 16, 16)
    a, b = RicianNoise(0.1, seed=3)(x), RicianNoise(0.1, seed=3)(x)
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert (torch.as_tensor(a) >= 0).all()
    # Rician noise on zero signal is Rayleigh with mean sigma*sqrt(pi/2)
    assert abs(float(torch.as_tensor(RicianNoise(0.1, seed=1)(torch.zeros(1, 128, 128))).mean()) - 0.1 * math.sqrt(math.pi / 2)) < 0.01


def test_dict_versions():
    d = {"label": MetaTensor(torch.rand(1, 8, 8, 8))}
    out = BlockAveraged(keys="label", output_keys="image", factors=(1, 2, 2))(d)
    assert out["image"].shape == (1, 8, 4, 4) and out["label"].shape == (1, 8, 8, 8)
    assert KSpaceTruncationd(keys="label", factors=2)(d)["label"].shape == (1, 4, 4, 4)
