"""Intensity scaling: the 1st/99th-percentile [0, 1] scaling of methods.md §0 and its inverse, and the
[0, 1] <-> [-1, 1] maps of the networks. ``PercentileNormalized`` keeps ``norm_lo``/``norm_hi`` in the image's
meta so outputs can be mapped back to the input's units.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from torch import Tensor

__all__ = ["percentiles", "PercentileNormalize", "invert_normalization", "PercentileNormalized", "to_signed", "to_unit"]


def percentiles(x, lower: float = 1.0, upper: float = 99.0) -> tuple[float, float]:
    """The ``lower`` and ``upper`` percentiles of an array (the scaling of methods.md §0)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    lo, hi = np.percentile(arr, [lower, upper])
    if hi <= lo:
        hi = lo + 1.0  # a constant image: keep it finite rather than divide by zero
    return float(lo), float(hi)


class PercentileNormalize(Transform):
    """Scale by the 1st/99th percentile to [0, 1] and clip; the percentiles go into a MetaTensor's meta.

    Args:
        lower: lower percentile.
        upper: upper percentile.
        clip: clip the result to [0, 1].
    """

    def __init__(self, lower: float = 1.0, upper: float = 99.0, clip: bool = True):
        self.lower, self.upper, self.clip = lower, upper, clip

    def __call__(self, img, lo: float | None = None, hi: float | None = None):
        if lo is None or hi is None:
            lo, hi = percentiles(img, self.lower, self.upper)
        out = (img - lo) / (hi - lo)
        if self.clip:
            out = out.clamp(0, 1) if isinstance(out, torch.Tensor) else np.clip(out, 0, 1)
        if isinstance(out, MetaTensor):
            out.meta["norm_lo"], out.meta["norm_hi"] = lo, hi
        return out


def invert_normalization(x, lo: float, hi: float):
    """Map [0, 1] values back to the input's intensity units."""
    return x * (hi - lo) + lo


class PercentileNormalized(MapTransform):
    """Dictionary version: statistics from ``ref_key`` (default: each key its own) applied to every key.

    Using the LR image's percentiles for both LR and HR in training matches inference, where only LR exists.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str | None = None,
        lower: float = 1.0,
        upper: float = 99.0,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.normalize = PercentileNormalize(lower, upper, clip)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        stats = None
        if self.ref_key is not None:
            stats = percentiles(d[self.ref_key], self.normalize.lower, self.normalize.upper)
        for key in self.key_iterator(d):
            lo, hi = stats if stats is not None else percentiles(d[key], self.normalize.lower, self.normalize.upper)
            d[key] = self.normalize(d[key], lo, hi)
        return d


def to_signed(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1] (the networks' range)."""
    return x * 2.0 - 1.0


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
