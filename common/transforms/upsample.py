"""Grid-aligned upsampling by integer factors: nearest, linear, cubic convolution and cubic B-spline.

HR voxel j sits at LR coordinate (j + 0.5)/f - 0.5 (the half-voxel rule of methods.md §0; ``grid_mode=True`` in
scipy, ``align_corners=False`` in torch). Each axis is one polyphase 1D filter: for the f output phases the kernel
weights are fixed, so each phase is a weighted sum of a few shifted views of the padded axis (differentiable, any
device). Not ``F.conv1d`` with one channel and N rows: on CPU its oneDNN path takes a scratch buffer many times the
volume and is slow on a first call (docs/performance.md, fifth pass).
Borders: linear and cubic repeat the edge voxel (as torch and scipy's 'nearest'); the B-spline uses the
half-sample symmetric extension (scipy's 'grid-mirror').
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.transforms import MapTransform

from common.utils import plain_tensor

__all__ = ["UPSAMPLE_MODES", "keys_cubic", "bspline3", "GridUpsample", "grid_upsample", "UpsampleLRd"]


UPSAMPLE_MODES = ("nearest", "linear", "cubic", "bspline")


# Cubic B-spline prefilter: the inverse of (z + 4 + 1/z)/6 has impulse response sqrt(3) * z1^|n| with the pole
# z1 = sqrt(3) - 2 (Unser, "Splines: a perfect fit", IEEE SPM 1999); |z1|^16 < 1e-9, so 16 taps are exact in fp32.
_POLE = math.sqrt(3.0) - 2.0


_PREFILTER_RADIUS = 16


def keys_cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (Keys 1981, eq. 15); a = -0.5 is Catmull-Rom, torch's bicubic uses -0.75."""
    t = t.abs()
    near = (a + 2) * t**3 - (a + 3) * t**2 + 1
    far = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def bspline3(t: torch.Tensor) -> torch.Tensor:
    """Centred cubic B-spline beta3 (Unser 1999, eq. 5)."""
    t = t.abs()
    near = 2.0 / 3.0 - t**2 + t**3 / 2
    far = (2 - t) ** 3 / 6
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _linear(t: torch.Tensor) -> torch.Tensor:
    return (1 - t.abs()).clamp(min=0)


def _nearest(t: torch.Tensor) -> torch.Tensor:
    return ((t >= -0.5) & (t < 0.5)).to(t.dtype)


def _polyphase(kernel: Callable[[torch.Tensor], torch.Tensor], factor: int, radius: int) -> torch.Tensor:
    """Weights (f, 1, 2R+1): output phase r reads LR taps i-R..i+R at offset delta_r = (2r + 1 - f)/(2f)."""
    deltas = (2 * torch.arange(factor, dtype=torch.float64) + 1 - factor) / (2 * factor)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    return kernel(deltas[:, None] - taps[None, :]).unsqueeze(1)


def _fir(padded: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """``out[..., i] = sum_k taps[k] * padded[..., i + k]`` (a valid 1D correlation) as sums of shifted views.

    Zero taps are skipped (the nearest and linear kernels' outer taps).
    """
    length = padded.shape[-1] - len(taps) + 1
    terms = [(k, t) for k, t in enumerate(taps) if t != 0.0]
    if not terms:
        return padded.new_zeros(padded.shape[:-1] + (length,))
    k0, t0 = terms[0]
    out = padded[..., k0 : k0 + length] * t0
    for k, t in terms[1:]:
        out.add_(padded[..., k : k + length], alpha=t)
    return out


def _symmetric_index(length: int, pad: int) -> torch.Tensor:
    """Indices of a half-sample symmetric extension (d c b a | a b c d | d c b a), valid for any pad."""
    idx = torch.arange(-pad, length + pad) % (2 * length)
    return torch.where(idx < length, idx, 2 * length - 1 - idx)


class GridUpsample(nn.Module):
    """Upsample (B, C, *spatial) by integer factors per axis on the half-voxel-aligned grid.

    Args:
        scale_factor: integer factor per spatial axis, e.g. (1, 2, 2) for x2 in-plane of sagittal slices.
        mode: "nearest", "linear" (bi/trilinear), "cubic" (Keys cubic convolution, "bicubic") or "bspline"
            (interpolating cubic B-spline, as scipy.ndimage.zoom(order=3)).
        cubic_a: the free parameter of Keys' kernel (-0.5 Catmull-Rom/MATLAB, -0.75 torch/OpenCV).
    """

    def __init__(self, scale_factor: Sequence[int], mode: str = "cubic", cubic_a: float = -0.5):
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self.scale_factor = tuple(int(f) for f in scale_factor)
        if any(f < 1 for f in self.scale_factor):
            raise ValueError(f"scale factors must be integers >= 1, got {scale_factor}")
        self.mode = mode
        kernel, self.radius = {
            "nearest": (_nearest, 1),
            "linear": (_linear, 1),
            "cubic": (lambda t: keys_cubic(t, cubic_a), 2),
            "bspline": (bspline3, 2),
        }[mode]
        # taps as Python numbers (rounded to float32, the precision they always had): device-free, no sync per call
        self.phase_taps = [_polyphase(kernel, f, self.radius).float()[:, 0].tolist() for f in self.scale_factor]
        n = torch.arange(-_PREFILTER_RADIUS, _PREFILTER_RADIUS + 1, dtype=torch.float64)
        self.prefilter_taps = (math.sqrt(3.0) * _POLE ** n.abs()).float().tolist()

    def _pad(self, v: torch.Tensor, pad: int) -> torch.Tensor:
        if self.mode == "bspline":
            if pad <= v.shape[-1]:  # the mirrored ends as two flipped slices: cheaper than a gather along the last axis
                return torch.cat([v[..., :pad].flip(-1), v, v[..., v.shape[-1] - pad :].flip(-1)], dim=-1)
            return v.index_select(-1, _symmetric_index(v.shape[-1], pad).to(v.device))
        return F.pad(v, (pad, pad), mode="replicate")

    def _axis(self, v: torch.Tensor, phase_taps: list[list[float]]) -> torch.Tensor:
        # v: (N, 1, L) -> (N, 1, L * factor)
        if self.mode == "bspline":
            v = _fir(self._pad(v, _PREFILTER_RADIUS), self.prefilter_taps)
        padded = self._pad(v, self.radius)
        phases = [_fir(padded, taps) for taps in phase_taps]  # f x (N, 1, L)
        return torch.stack(phases, dim=-1).reshape(v.shape[0], 1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != len(self.scale_factor) + 2:
            raise ValueError(f"expected (B, C, {len(self.scale_factor)} spatial axes), got shape {tuple(x.shape)}")
        for axis, f in enumerate(self.scale_factor):
            if f == 1:
                continue
            moved = x.movedim(axis + 2, -1)
            shape = moved.shape
            out = self._axis(moved.reshape(-1, 1, shape[-1]), self.phase_taps[axis])
            x = out.reshape(*shape[:-1], shape[-1] * f).movedim(-1, axis + 2)
        return x

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}"


def grid_upsample(x: torch.Tensor, scale_factor: Sequence[int], mode: str = "cubic") -> torch.Tensor:
    """Functional form of :class:`GridUpsample` for (B, C, *spatial) tensors."""
    return GridUpsample(scale_factor, mode).to(x.device)(x)


class UpsampleLRd(MapTransform):
    """Upsample the LR ``image`` in-plane onto the HR grid into ``output_key``; crop ``label`` to the same shape.

    The HR volume loses the trailing voxels that do not fill a whole LR voxel, so HR and upsampled LR align.

    Args:
        scale_factor: HR/LR factor per spatial axis.
        mode: upsampling mode of :class:`common.transforms.GridUpsample` (cubic, as inference).
        image_key: key of the LR image (1, x, y, z).
        label_key: key of the HR image.
        output_key: where the upsampled LR goes.
    """

    def __init__(
        self,
        scale_factor: Sequence[int],
        mode: str = "cubic",
        image_key: str = "image",
        label_key: str = "label",
        output_key: str = "image_up",
    ) -> None:
        super().__init__([image_key, label_key])
        self.upsample = GridUpsample(scale_factor, mode)
        self.image_key, self.label_key, self.output_key = image_key, label_key, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        with torch.no_grad():
            up = self.upsample(plain_tensor(d[self.image_key])[None].float())[0]
        d[self.output_key] = up
        if self.label_key in d:
            d[self.label_key] = d[self.label_key][(slice(None),) + tuple(slice(0, s) for s in up.shape[1:])]
        return d
