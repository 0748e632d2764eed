"""Paired LR/HR random patches for any number of spatial axes: an LR patch and the HR patch it covers
(methods.md §0), and the 3D trainer's variant centred mostly on the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from common.utils import plain_tensor

__all__ = ["RandPairedPatchd", "RandForegroundPairedPatchd"]


class RandPairedPatchd(Randomizable, MapTransform):
    """Random aligned LR/HR patches: an LR patch at a random corner and the HR patch it covers.

    LR voxel i covers HR voxels f*i .. f*i+f-1 (methods.md §0), so the HR patch starts at f times the LR start.
    Works for any number of spatial axes (2D slices or 3D volumes, channel-first).

    Args:
        lr_key: key of the LR image (C, *lr_spatial).
        hr_keys: keys on the HR grid (the target, and e.g. a mask).
        lr_patch_size: LR patch size per spatial axis.
        scale_factor: HR/LR factor per spatial axis.
        num_samples: patches per call (a list of dicts when > 1, as MONAI's RandSpatialCropSamplesd).
    """

    def __init__(
        self,
        lr_key: str,
        hr_keys: KeysCollection,
        lr_patch_size: Sequence[int],
        scale_factor: Sequence[int],
        num_samples: int = 1,
    ):
        hr_keys = [hr_keys] if isinstance(hr_keys, str) else list(hr_keys)
        MapTransform.__init__(self, [lr_key] + hr_keys)
        self.lr_key, self.hr_keys = lr_key, hr_keys
        self.lr_patch_size = tuple(int(s) for s in lr_patch_size)
        self.scale_factor = tuple(int(f) for f in scale_factor)
        self.num_samples = num_samples
        self._starts: list[tuple[int, ...]] = []

    def randomize(self, lr_shape: Sequence[int]) -> None:
        if any(s < p for s, p in zip(lr_shape, self.lr_patch_size)):
            raise ValueError(f"LR image {tuple(lr_shape)} is smaller than the patch {self.lr_patch_size}")
        self._starts = [
            tuple(int(self.R.randint(0, s - p + 1)) for s, p in zip(lr_shape, self.lr_patch_size))
            for _ in range(self.num_samples)
        ]

    def __call__(self, data):
        d = dict(data)
        self.randomize(d[self.lr_key].shape[1:])
        out = []
        for start in self._starts:
            item = dict(d)
            lr_sl = tuple(slice(s, s + p) for s, p in zip(start, self.lr_patch_size))
            hr_sl = tuple(slice(s * f, (s + p) * f) for s, p, f in zip(start, self.lr_patch_size, self.scale_factor))
            item[self.lr_key] = d[self.lr_key][(slice(None),) + lr_sl]
            for key in self.hr_keys:
                item[key] = d[key][(slice(None),) + hr_sl]
            out.append(item)
        return out if self.num_samples > 1 else out[0]


class RandForegroundPairedPatchd(RandPairedPatchd):
    """Random aligned LR/HR 3D (or 2D) patches, centred on a foreground LR voxel with probability ``pos_fraction``.

    LR voxel i covers HR voxels f·i … f·i + f − 1 (methods.md §0), so the HR patch starts at f times the LR start
    on every axis. A foreground centre is found by drawing LR voxels uniformly until one is above ``threshold``
    (at most ``max_tries`` draws; otherwise the start is uniform), so nothing is precomputed per volume.

    Args:
        lr_key: key of the LR image (C, *lr_spatial), in [0, 1].
        hr_keys: keys on the HR grid cropped alongside (the HR target, the upsampled LR conditioning).
        lr_patch_size: LR patch size per spatial axis.
        scale_factor: HR/LR factor per spatial axis.
        num_samples: patches per call (a list of dicts when > 1).
        pos_fraction: probability of centring the patch on a foreground voxel.
        threshold: foreground threshold on the LR [0, 1] scale.
        max_tries: uniform draws per foreground search.
        keep_other_keys: keep the item's other entries (whole-volume extras of the cached preprocessing, which
            would not collate across volumes of different sizes) and the MetaTensors; by default a patch holds only
            the cropped keys, as plain tensors (cheaper to collate: training needs no geometry).
    """

    def __init__(
        self,
        lr_key: str,
        hr_keys: KeysCollection,
        lr_patch_size: Sequence[int],
        scale_factor: Sequence[int],
        num_samples: int = 1,
        pos_fraction: float = 0.9,
        threshold: float = 0.1,
        max_tries: int = 100,
        keep_other_keys: bool = False,
    ) -> None:
        super().__init__(lr_key, hr_keys, lr_patch_size, scale_factor, num_samples)
        if len(self.lr_patch_size) != len(self.scale_factor):
            raise ValueError(
                f"lr_patch_size {self.lr_patch_size} and scale_factor {self.scale_factor} differ in length"
            )
        self.pos_fraction, self.threshold, self.max_tries = float(pos_fraction), float(threshold), int(max_tries)
        self.keep_other_keys = bool(keep_other_keys)
        self._lr: torch.Tensor | None = None

    def _foreground_centre(self, lr: torch.Tensor) -> tuple[int, ...] | None:
        shape = lr.shape
        for _ in range(self.max_tries):
            idx = tuple(int(self.R.randint(0, s)) for s in shape)
            if float(lr[idx]) > self.threshold:
                return idx
        return None

    def randomize(self, lr_shape: Sequence[int]) -> None:
        if any(s < p for s, p in zip(lr_shape, self.lr_patch_size)):
            raise ValueError(f"LR image {tuple(lr_shape)} is smaller than the patch {self.lr_patch_size}")
        starts = []
        for _ in range(self.num_samples):
            centre = None
            if self._lr is not None and self.R.rand() < self.pos_fraction:
                centre = self._foreground_centre(self._lr)
            if centre is None:
                start = tuple(int(self.R.randint(0, s - p + 1)) for s, p in zip(lr_shape, self.lr_patch_size))
            else:
                start = tuple(min(max(c - p // 2, 0), s - p) for c, s, p in zip(centre, lr_shape, self.lr_patch_size))
            starts.append(start)
        self._starts = starts

    def __call__(self, data):
        lr = data[self.lr_key]
        self._lr = plain_tensor(lr)[0]  # the first channel decides what is foreground
        try:
            out = super().__call__(data)
        finally:
            self._lr = None
        if self.keep_other_keys:
            return out
        keys = [self.lr_key, *self.hr_keys]
        items = [{k: plain_tensor(item[k]).contiguous() for k in keys} for item in (out if isinstance(out, list) else [out])]
        return items if isinstance(out, list) else items[0]
