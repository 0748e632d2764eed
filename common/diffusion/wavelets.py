"""Torch 2D discrete wavelet transform matching PyWavelets, and the wavelet fusion of SRMRI (methods.md §3).

PyWavelets is NumPy only, so a fusion step inside a torch sampler needs its own DWT. Each analysis level is one
strided 2D convolution with the four separable kernels built from ``pywt.Wavelet(name).filter_bank``, each
synthesis level one transposed convolution; both are differentiable and run on any device.

Conventions copied from ``pywt.dwt`` / ``pywt.idwt`` with ``mode='zero'`` (checked against pywt in the tests):

- analysis: ``c[k] = Σ_j h[j]·x[2k + 1 − j]`` with ``x`` zero outside ``[0, N)``, giving ``⌊(N + F − 1)/2⌋``
  coefficients for a filter of length ``F``;
- synthesis: the full convolution of the 2x-upsampled coefficients with the reconstruction filters, cropped to
  ``[F − 2, 2K − F + 2 + F − 2)``: ``2K − F + 2`` samples (the original length, or one more when it was odd);
- 2D bands in pywt's order ``(cH, cV, cD)``: cH is the detail across rows (axis −2) and approximation across
  columns, cV the converse, cD detail on both; ``wavedec2`` returns ``[cA_n, (cH_n, cV_n, cD_n), ..., (cH_1, ...)]``
  and ``waverec2`` crops an approximation one sample larger than the next level's details, as pywt does.

Tensors are (..., H, W): every leading axis (batch, channel, slice) is an independent 2D image.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import pywt
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Bands", "dwt2", "idwt2", "wavedec2", "waverec2", "wavelet_fusion"]

Bands = tuple[Tensor, Tensor, Tensor]  # (cH, cV, cD)


@lru_cache(maxsize=None)
def _filters(wavelet: str) -> tuple[tuple[float, ...], ...]:
    """``(dec_lo, dec_hi, rec_lo, rec_hi)`` of a pywt wavelet, as tuples (hashable, cached)."""
    return tuple(tuple(float(v) for v in f) for f in pywt.Wavelet(wavelet).filter_bank)


@lru_cache(maxsize=64)
def _kernels(wavelet: str, synthesis: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(4, 1, F, F) separable kernels in the band order (A, H, V, D), cached per wavelet, dtype and device.

    Analysis kernels are flipped (``conv2d`` correlates; pywt convolves); synthesis kernels feed
    ``conv_transpose2d``, which already computes ``Σ_k c[k] g[n − 2k]``.
    """
    dec_lo, dec_hi, rec_lo, rec_hi = _filters(wavelet)
    lo, hi = (rec_lo, rec_hi) if synthesis else (dec_lo[::-1], dec_hi[::-1])
    lo_t = torch.tensor(lo, dtype=dtype, device=device)
    hi_t = torch.tensor(hi, dtype=dtype, device=device)
    pairs = [(lo_t, lo_t), (hi_t, lo_t), (lo_t, hi_t), (hi_t, hi_t)]  # (rows, cols): A, H = 'da', V = 'ad', D
    return torch.stack([torch.outer(r, c) for r, c in pairs]).unsqueeze(1)


def _fold(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """(..., H, W) -> (N, 1, H, W) and the leading shape."""
    if x.ndim < 2:
        raise ValueError(f"expected (..., H, W), got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-2])
    return x.reshape(-1, 1, *x.shape[-2:]), lead


def dwt2(x: Tensor, wavelet: str = "bior4.4") -> tuple[Tensor, Bands]:
    """One level of the 2D DWT with zero padding, as ``pywt.dwt2(x, wavelet, mode='zero')``: ``(cA, (cH, cV, cD))``.

    Args:
        x: images (..., H, W), floating point.
        wavelet: a pywt wavelet name.
    """
    n = len(_filters(wavelet)[0])
    v, lead = _fold(x)
    h, w = v.shape[-2:]
    kh, kw = (h + n - 1) // 2, (w + n - 1) // 2
    # c[k] = Σ_j f[j] x[2k + 1 − j]: a cross-correlation with the flipped filter, input shifted by F − 2 zeros
    pad_h, pad_w = 2 * (kh - 1) + n - (h + n - 2), 2 * (kw - 1) + n - (w + n - 2)
    v = F.pad(v, (n - 2, max(pad_w, 0), n - 2, max(pad_h, 0)))
    out = F.conv2d(v, _kernels(wavelet, False, v.dtype, v.device), stride=2)[..., :kh, :kw]
    bands = [out[:, b].reshape(*lead, kh, kw) for b in range(4)]
    return bands[0], (bands[1], bands[2], bands[3])


def idwt2(ca: Tensor, details: Bands, wavelet: str = "bior4.4") -> Tensor:
    """One level of the inverse 2D DWT, as ``pywt.idwt2((cA, (cH, cV, cD)), wavelet, mode='zero')``.

    Args:
        ca: approximation band (..., h, w).
        details: ``(cH, cV, cD)``, each shaped like ``ca``.
        wavelet: a pywt wavelet name.
    """
    n = len(_filters(wavelet)[2])
    if any(d.shape != ca.shape for d in details):
        raise ValueError(f"bands differ in shape: {[tuple(t.shape) for t in (ca, *details)]}")
    lead, (kh, kw) = tuple(ca.shape[:-2]), ca.shape[-2:]
    v = torch.stack([b.reshape(-1, kh, kw) for b in (ca, *details)], dim=1)  # (N, 4, h, w)
    # conv_transpose2d sums the four bands: out[n] = Σ_k c[k] g[n − 2k], the full convolution pywt then crops
    full = F.conv_transpose2d(v, _kernels(wavelet, True, v.dtype, v.device), stride=2)
    out_h, out_w = 2 * kh - n + 2, 2 * kw - n + 2
    if out_h < 1 or out_w < 1:
        raise ValueError(f"bands of {kh}x{kw} are too small for a filter of length {n}")
    return full[..., n - 2 : n - 2 + out_h, n - 2 : n - 2 + out_w].reshape(*lead, out_h, out_w)


def wavedec2(x: Tensor, wavelet: str = "bior4.4", level: int = 2) -> list:
    """Multilevel 2D DWT, as ``pywt.wavedec2(x, wavelet, mode='zero', level=level)``.

    Returns ``[cA_n, (cH_n, cV_n, cD_n), ..., (cH_1, cV_1, cD_1)]``, coarsest first.

    Args:
        x: images (..., H, W).
        wavelet: a pywt wavelet name.
        level: number of levels (>= 1); pywt warns past ``dwt_max_level``, this does not.
    """
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    coeffs: list = []
    ca = x
    for _ in range(level):
        ca, details = dwt2(ca, wavelet)
        coeffs.insert(0, details)
    coeffs.insert(0, ca)
    return coeffs


def waverec2(coeffs: Sequence, wavelet: str = "bior4.4", size: Sequence[int] | None = None) -> Tensor:
    """Multilevel inverse 2D DWT, as ``pywt.waverec2(coeffs, wavelet, mode='zero')``, optionally cropped to ``size``.

    pywt returns one extra row/column for an odd original size; pass ``size = x.shape[-2:]`` to get ``x`` back.

    Args:
        coeffs: ``[cA_n, (cH_n, cV_n, cD_n), ..., (cH_1, cV_1, cD_1)]`` as from :func:`wavedec2`.
        wavelet: a pywt wavelet name.
        size: (H, W) to crop the result to.
    """
    ca = coeffs[0]
    for details in coeffs[1:]:
        # an odd-sized level gives an approximation one sample larger than the next details: pywt drops it
        ca = ca[..., : details[0].shape[-2], : details[0].shape[-1]]
        ca = idwt2(ca, tuple(details), wavelet)
    if size is not None:
        ca = ca[..., : size[0], : size[1]]
    return ca


def wavelet_fusion(x: Tensor, y_up: Tensor, wavelet: str = "bior4.4", levels: int = 2) -> Tensor:
    """SRMRI wavelet fusion (methods.md §3): ``IDWT(approximation band of y_up, detail bands of x)``.

    Keeps the low frequencies of the upsampled measurement and the high frequencies of the current sample.
    ``fuse(x, x) = x`` exactly. The approximation band of the result equals ``y_up``'s except within a few
    coefficients of an edge (6 at level 2 for bior4.4): a zero-padded DWT is redundant, so a mixed set of bands is
    not exactly the transform of its inverse there. It is exact everywhere when both images vanish within about
    ``F·2^(levels−1)`` pixels of the edges (``F`` the filter length), as a brain MRI's background does.

    Args:
        x: current sample (..., H, W).
        y_up: the measurement upsampled to the HR grid, broadcastable to ``x``.
        wavelet: a pywt wavelet name ('bior4.4' in SRMRI).
        levels: number of DWT levels (2 in SRMRI).
    """
    y_up = y_up.expand_as(x) if y_up.shape != x.shape else y_up
    ca_y = wavedec2(y_up, wavelet, levels)[0]
    details_x = wavedec2(x, wavelet, levels)[1:]
    return waverec2([ca_y, *details_x], wavelet, size=x.shape[-2:])
