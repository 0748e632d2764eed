"""Sagittal slices of volumes for the 2D/2.5D models: neighbour stacks (:func:`slice_stack`), per-slice
foreground fractions, and random slice patches, with LR conditioning (EDM 2.5D) or HR alone (SRMRI).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import MapTransform, Randomizable
from torch import Tensor

from common.utils import plain_tensor

__all__ = [
    "slice_stack",
    "SliceForegroundd",
    "RandSlicePatchd",
    "ForegroundSlicesd",
    "RandSliceCropd",
    "random_slice_crops",
]


def slice_stack(volume: torch.Tensor, offsets: Sequence[int] = (-1, 0), axis: int = 0) -> torch.Tensor:
    """Stack each slice with its neighbours as channels: (X, Y, Z) -> (n_slices, len(offsets), *plane).

    Args:
        volume: 3D tensor (or (1, X, Y, Z)).
        offsets: neighbour offsets per output channel; (-1, 0) = previous + target slice (the EDM 2.5D paper),
            (-1, 0, 1) = both neighbours. Indices past the ends repeat the edge slice.
        axis: slicing axis (0 = sagittal in RAS).
    """
    if volume.ndim == 4:
        volume = volume[0]
    vol = volume.movedim(axis, 0)
    n = vol.shape[0]
    index = torch.arange(n)[:, None] + torch.as_tensor(list(offsets))[None, :]
    return vol[index.clamp(0, n - 1)]


class SliceForegroundd(MapTransform):
    """Store, per slice along axis 0 of ``key`` (1, X, Y, Z), the fraction of voxels above ``threshold`` in
    ``output_key`` (X,): computed once in the cached preprocessing, read by :class:`RandSlicePatchd`. With
    ``axes`` other than ``(0,)`` it stores ``{axis: fractions}`` for each axis (slices drawn along several axes).

    Args:
        key: the HR volume.
        threshold: foreground threshold on the [0, 1] scale.
        output_key: where the fractions go.
        axes: slice axes to compute the fractions for.
    """

    def __init__(
        self, key: str = "label", threshold: float = 0.1, output_key: str = "slice_foreground",
        axes: Sequence[int] = (0,),
    ) -> None:
        super().__init__([key])
        self.key, self.threshold, self.output_key = key, float(threshold), output_key
        self.axes = tuple(int(a) for a in axes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        foreground = (plain_tensor(d[self.key])[0] > self.threshold).float()
        fractions = {a: foreground.movedim(a, 0).flatten(1).mean(1) for a in self.axes}
        d[self.output_key] = fractions[0] if self.axes == (0,) else fractions
        return d


class RandSlicePatchd(Randomizable, MapTransform):
    """A random non-empty sagittal slice with its conditioning stack and an aligned random in-plane crop.

    From ``label`` (1, X, Y, Z) HR and ``image_up`` (1, X, Y, Z) upsampled LR (both in [0, 1]), returns
    ``image`` = the upsampled LR slices at ``offsets`` around slice i (edge slices repeat), (len(offsets), h, w),
    and ``label`` = HR slice i, (1, h, w). Slices are drawn among those with at least ``min_foreground`` of their
    voxels above ``threshold`` (all slices when none qualifies); the crop is centred, with probability
    ``pos_fraction``, on a random foreground voxel, and its start is a multiple of the in-plane ``scale_factor``
    so HR and LR keep the block phase of inference. Slices smaller than the patch are zero-padded.

    Args:
        patch_size: in-plane crop size (h, w).
        offsets: neighbour offsets of the conditioning slices.
        scale_factor: in-plane factors (fy, fz) the crop start is a multiple of.
        min_foreground: smallest fraction of foreground voxels of a drawn slice.
        threshold: foreground threshold on the HR [0, 1] scale.
        pos_fraction: probability of centring the crop on a foreground voxel.
        num_samples: patches per call (a list when > 1).
        label_key: key of the HR volume.
        cond_key: key of the upsampled LR volume.
        output_cond_key: where the conditioning stack goes.
        foreground_key: key of precomputed per-slice foreground fractions (see :class:`SliceForegroundd`);
            computed here when absent.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        offsets: Sequence[int] = (-1, 0),
        scale_factor: Sequence[int] = (2, 2),
        min_foreground: float = 0.05,
        threshold: float = 0.1,
        pos_fraction: float = 0.9,
        num_samples: int = 1,
        label_key: str = "label",
        cond_key: str = "image_up",
        output_cond_key: str = "image",
        foreground_key: str = "slice_foreground",
    ) -> None:
        MapTransform.__init__(self, [label_key, cond_key])
        self.foreground_key = foreground_key
        self.patch_size = tuple(int(p) for p in patch_size)
        self.offsets = tuple(int(o) for o in offsets)
        self.scale_factor = tuple(int(f) for f in scale_factor)[-2:]
        self.min_foreground, self.threshold, self.pos_fraction = min_foreground, threshold, pos_fraction
        self.num_samples = int(num_samples)
        self.label_key, self.cond_key, self.output_cond_key = label_key, cond_key, output_cond_key

    def randomize(self, data: Any = None) -> None:
        pass

    def _start(self, size: int, patch: int, centre: int | None, f: int) -> int:
        room = size - patch
        if room <= 0:
            return 0
        if centre is None:
            start = int(self.R.randint(0, room + 1))
        else:
            start = min(max(centre - patch // 2, 0), room)
        start -= start % f
        return start

    def _draw(self, hr: Tensor, fg_slices: Tensor, extent: Sequence[int]) -> tuple[int, list[int], list[int]]:
        """A slice i among ``fg_slices``, the indices of its conditioning slices, and the aligned in-plane start of
        a crop inside ``extent`` (the in-plane size the crop may use)."""
        i = int(fg_slices[self.R.randint(len(fg_slices))])
        n = hr.shape[0]
        idx = [min(max(i + o, 0), n - 1) for o in self.offsets]
        centre = None
        if self.R.rand() < self.pos_fraction:
            fg = torch.nonzero(hr[i] > self.threshold)
            if len(fg):
                centre = fg[self.R.randint(len(fg))].tolist()
        starts = [
            self._start(extent[a], self.patch_size[a], None if centre is None else centre[a], self.scale_factor[a])
            for a in range(2)
        ]
        return i, idx, starts

    def _pad(self, cond: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """Zero-pad crops of slices smaller than the patch; contiguous float outputs."""
        pad = []
        for a in (1, 0):  # F.pad lists the last axis first
            pad += [0, max(self.patch_size[a] - label.shape[1 + a], 0)]
        if any(pad):
            label, cond = torch.nn.functional.pad(label, pad), torch.nn.functional.pad(cond, pad)
        return cond.float().contiguous(), label.float().contiguous()

    def _one(self, hr: Tensor, up: Tensor, fg_slices: Tensor) -> tuple[Tensor, Tensor]:
        i, idx, starts = self._draw(hr, fg_slices, hr.shape[1:])
        sl = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        return self._pad(up[idx][(slice(None),) + sl], hr[i][sl][None])

    def _foreground_slices(self, hr: Tensor, fractions: Any, axis: int = 0) -> Tensor:
        """Indices of the slices of ``hr`` (slice axis first, viewed along volume ``axis``) with at least
        ``min_foreground`` foreground; all slices when none qualifies. ``fractions``: the cached
        :class:`SliceForegroundd` output (a tensor for axis 0 or ``{axis: tensor}``), computed here when absent."""
        fraction = fractions.get(axis) if isinstance(fractions, Mapping) else fractions if axis == 0 else None
        if fraction is None or len(fraction) != hr.shape[0]:
            fraction = (hr > self.threshold).float().flatten(1).mean(1)
        fg_slices = torch.nonzero(fraction >= self.min_foreground)[:, 0]
        return fg_slices if len(fg_slices) else torch.arange(hr.shape[0])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict | list[dict]:
        d = dict(data)
        hr, up = plain_tensor(d[self.label_key])[0], plain_tensor(d[self.cond_key])[0]
        fg_slices = self._foreground_slices(hr, d.get(self.foreground_key))
        out = []
        for _ in range(self.num_samples):
            cond, label = self._one(hr, up, fg_slices)
            out.append({self.output_cond_key: cond, self.label_key: label})
        return out if self.num_samples > 1 else out[0]


class ForegroundSlicesd(MapTransform):
    """``fg_slices``: indices of the sagittal slices (axis 0) of ``label`` (1, X, Y, Z) with at least
    ``min_foreground`` of their voxels above ``threshold`` (all slices when none qualifies).

    Args:
        threshold: head threshold on the [0, 1] scale.
        min_foreground: smallest fraction of head voxels.
        label_key: key of the HR volume.
        output_key: where the indices go.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        min_foreground: float = 0.05,
        label_key: str = "label",
        output_key: str = "fg_slices",
    ) -> None:
        super().__init__([label_key])
        self.threshold, self.min_foreground = float(threshold), float(min_foreground)
        self.label_key, self.output_key = label_key, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        hr = plain_tensor(d[self.label_key])[0]
        fraction = (hr > self.threshold).float().flatten(1).mean(1)
        fg = torch.nonzero(fraction >= self.min_foreground)[:, 0]
        d[self.output_key] = fg if len(fg) else torch.arange(hr.shape[0])
        return d


class RandSliceCropd(Randomizable, MapTransform):
    """A random non-empty sagittal slice of the HR ``label`` (1, X, Y, Z), cropped in-plane to ``patch_size``.

    Returns ``{"label": (1, h, w)}``. The slice is drawn from ``fg_slices`` (see :class:`ForegroundSlicesd`, cached
    with the volume, so a draw costs one slice, not a scan of the volume); the crop is centred on a random head
    voxel (above ``threshold``) with probability ``pos_fraction``, else uniform; slices smaller than the patch are
    zero-padded (zero is air on the [0, 1] scale).

    Args:
        patch_size: in-plane crop size (h, w).
        num_samples: crops per call (a list when > 1).
        threshold: head threshold on the [0, 1] scale.
        pos_fraction: probability of centring the crop on a head voxel.
        label_key: key of the HR volume.
        slices_key: key of the non-empty slice indices.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        num_samples: int = 1,
        threshold: float = 0.1,
        pos_fraction: float = 0.9,
        label_key: str = "label",
        slices_key: str = "fg_slices",
    ) -> None:
        MapTransform.__init__(self, [label_key])
        self.patch_size = tuple(int(p) for p in patch_size)
        self.num_samples, self.threshold, self.pos_fraction = int(num_samples), float(threshold), float(pos_fraction)
        self.label_key, self.slices_key = label_key, slices_key

    def randomize(self, data: Any = None) -> None:
        pass

    def _start(self, size: int, patch: int, centre: int | None) -> int:
        room = size - patch
        if room <= 0:
            return 0
        if centre is None:
            return int(self.R.randint(0, room + 1))
        return min(max(centre - patch // 2, 0), room)

    def _one(self, hr: Tensor, fg_slices: Tensor) -> Tensor:
        plane = hr[int(fg_slices[self.R.randint(len(fg_slices))])]
        centre = None
        if self.R.rand() < self.pos_fraction:
            fg = torch.nonzero(plane > self.threshold)
            if len(fg):
                centre = fg[self.R.randint(len(fg))].tolist()
        starts = [
            self._start(plane.shape[a], self.patch_size[a], None if centre is None else centre[a]) for a in range(2)
        ]
        # a copy: the cached volume is shared with later draws (CacheDataset with copy_cache=False)
        crop = plane[tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))][None].clone()
        pad = [0, max(self.patch_size[1] - crop.shape[2], 0), 0, max(self.patch_size[0] - crop.shape[1], 0)]
        if any(pad):
            crop = torch.nn.functional.pad(crop, pad)
        return crop.float().contiguous()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict | list[dict]:
        hr = plain_tensor(data[self.label_key])[0]
        fg_slices = data.get(self.slices_key)
        if fg_slices is None:
            fg_slices = ForegroundSlicesd(self.threshold)(dict(data))["fg_slices"]
        out = [{self.label_key: self._one(hr, torch.as_tensor(fg_slices))} for _ in range(self.num_samples)]
        return out if self.num_samples > 1 else out[0]


def random_slice_crops(
    patch_size: Sequence[int], num_samples: int = 1, threshold: float = 0.1, pos_fraction: float = 0.9
) -> RandSliceCropd:
    """:class:`RandSliceCropd` with the bundle's defaults (kept as a function for the configs)."""
    return RandSliceCropd(patch_size, num_samples, threshold, pos_fraction)
