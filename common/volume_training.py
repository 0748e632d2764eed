"""3D pieces of EDM super-resolution training that :mod:`common.edm_training` (2D slices) does not cover.

The 3D bundle trains on paired 3D patches (methods.md §1, 3D): an LR patch (d, h, w) and the HR patch it covers,
(d·f0, h·f1, w·f2), with the factors from the config (x2 in-plane as the paper, or e.g. (1, 1, 4) for thick slices).
The conditioning is the crop of the *whole-volume* trilinear upsampling of LR (``image_up`` of
:func:`common.edm_training.training_preprocessing` with ``upsample_mode="linear"``) at the HR patch's place: exactly
the window of the conditioning that inference hands the network, borders included, which upsampling each LR patch
on its own would not give.

:class:`RandForegroundPairedPatchd` is :class:`common.data.RandPairedPatchd` with foreground-biased patch
positions: brain volumes are mostly air, and patches of air teach little.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.config import KeysCollection

from common.data import RandPairedPatchd
from common.transforms import plain_tensor

__all__ = ["RandForegroundPairedPatchd"]



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
