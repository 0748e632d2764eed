"""Tests of common.diffusion.wavelets against PyWavelets (mode 'zero'), and the properties of wavelet fusion."""

import warnings

import numpy as np
import pytest
import pywt
import torch

from common.diffusion.wavelets import dwt2, idwt2, wavedec2, wavelet_fusion, waverec2


def _pywt_wavedec2(x: np.ndarray, wavelet: str, level: int):
    with warnings.catch_warnings():  # pywt warns when a level is past dwt_max_level; the values still count
        warnings.simplefilter("ignore", UserWarning)
        return pywt.wavedec2(x, wavelet, mode="zero", level=level)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(16, 16), (13, 22), (37, 41), (64, 48), (20, 9)])
@pytest.mark.parametrize("wavelet", ["bior4.4", "db2", "haar"])
def test_dwt2_idwt2_match_pywt(shape, wavelet):
    x = _rand(*shape)
    ca, (ch, cv, cd) = dwt2(x, wavelet)
    ref_a, (ref_h, ref_v, ref_d) = pywt.dwt2(x.numpy(), wavelet, mode="zero")
    for mine, ref in zip((ca, ch, cv, cd), (ref_a, ref_h, ref_v, ref_d)):
        assert mine.shape == ref.shape
        np.testing.assert_allclose(mine.numpy(), ref, atol=1e-10)
    rec = idwt2(ca, (ch, cv, cd), wavelet)
    ref_rec = pywt.idwt2((ref_a, (ref_h, ref_v, ref_d)), wavelet, mode="zero")
    np.testing.assert_allclose(rec.numpy(), ref_rec, atol=1e-10)


@pytest.mark.parametrize("shape, level", [((32, 32), 1), ((32, 32), 2), ((37, 29), 2), ((45, 64), 3), ((64, 64), 4)])
def test_wavedec2_waverec2_match_pywt_float32(shape, level):
    x = _rand(*shape, dtype=torch.float32)
    ref = _pywt_wavedec2(x.double().numpy(), "bior4.4", level)
    mine = wavedec2(x, "bior4.4", level)
    assert len(mine) == len(ref) == level + 1
    np.testing.assert_allclose(mine[0].numpy(), ref[0], atol=1e-5)
    for bands, ref_bands in zip(mine[1:], ref[1:]):
        for b, r in zip(bands, ref_bands):
            assert b.shape == r.shape
            np.testing.assert_allclose(b.numpy(), r, atol=1e-5)
    rec_ref = pywt.waverec2(ref, "bior4.4", mode="zero")
    rec = waverec2(mine, "bior4.4")
    assert rec.shape == rec_ref.shape  # pywt's own size: one more on an odd axis
    np.testing.assert_allclose(rec.numpy(), rec_ref, atol=1e-5)
    np.testing.assert_allclose(waverec2(mine, "bior4.4", size=shape).numpy(), x.numpy(), atol=1e-5)


def test_leading_axes_are_independent_images():
    x = _rand(2, 3, 4, 24, 20)
    coeffs = wavedec2(x, level=2)
    assert coeffs[0].shape[:3] == (2, 3, 4)
    single = wavedec2(x[1, 2, 3], level=2)
    torch.testing.assert_close(coeffs[0][1, 2, 3], single[0])
    torch.testing.assert_close(coeffs[1][2][1, 2, 3], single[1][2])
    torch.testing.assert_close(waverec2(coeffs, size=x.shape[-2:]), x)


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (2, 3, 33, 27), (4, 1, 17, 40)])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_fusion_of_an_image_with_itself_is_the_image(shape, levels):
    x = _rand(*shape)
    out = wavelet_fusion(x, x, levels=levels)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x)


@pytest.mark.parametrize("shape", [(1, 1, 96, 90), (2, 2, 81, 77)])
def test_fusion_takes_the_approximation_of_y_and_the_details_of_x(shape):
    x, y = _rand(*shape, seed=1), _rand(*shape, seed=2)
    fused = wavelet_fusion(x, y)
    ca_f, *details_f = wavedec2(fused)
    ca_y, *details_x = wavedec2(y)[:1] + wavedec2(x)[1:]
    # a zero-padded DWT is redundant: equal away from the edges (6 coefficients at level 2 for bior4.4)
    m = 6
    torch.testing.assert_close(ca_f[..., m:-m, m:-m], ca_y[..., m:-m, m:-m])
    m1 = 2 * m
    torch.testing.assert_close(details_f[1][0][..., m1:-m1, m1:-m1], details_x[1][0][..., m1:-m1, m1:-m1])


def test_fusion_is_exact_for_images_with_a_zero_background():
    pad = 24  # F·2^(levels−1) = 20 for bior4.4 at two levels
    x = torch.nn.functional.pad(_rand(1, 1, 40, 36, seed=3), (pad,) * 4)
    y = torch.nn.functional.pad(_rand(1, 1, 40, 36, seed=4), (pad,) * 4)
    fused = wavelet_fusion(x, y)
    torch.testing.assert_close(wavedec2(fused)[0], wavedec2(y)[0], atol=1e-9, rtol=0)


def test_fusion_broadcasts_y_and_is_differentiable():
    x = _rand(3, 2, 24, 24, dtype=torch.float32).requires_grad_(True)
    y = _rand(1, 2, 24, 24, seed=5, dtype=torch.float32)
    out = wavelet_fusion(x, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(out[0], wavelet_fusion(x[:1].detach(), y)[0])


def test_fusion_keeps_a_smooth_y_and_the_fine_texture_of_x():
    # y a smooth ramp, x = y + a checkerboard: fusing y with x gives x back (the checkerboard lives in the details)
    h = w = 64
    ramp = torch.linspace(0, 1, w, dtype=torch.float64).expand(h, w)
    checker = 0.1 * (-1.0) ** (torch.arange(h)[:, None] + torch.arange(w)[None, :])
    x, y = (ramp + checker)[None, None], ramp[None, None]
    out = wavelet_fusion(x, y)
    inner = (..., slice(16, -16), slice(16, -16))
    torch.testing.assert_close(out[inner], x[inner], atol=1e-9, rtol=0)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        wavedec2(torch.zeros(8, 8), level=0)
    with pytest.raises(ValueError):
        dwt2(torch.zeros(8))
    with pytest.raises(ValueError):
        idwt2(torch.zeros(4, 4), (torch.zeros(4, 4), torch.zeros(4, 5), torch.zeros(4, 4)))
