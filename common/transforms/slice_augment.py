"""Augmented 2.5D training patches: the LR conditioning is re-simulated from the augmented HR patch.

Two training scans cannot show a network the range of contrasts and orientations users feed it (a skull-stripped
contrast-enhanced scan puts brain tissue much higher on the [p1, p99] scale than an MPRAGE with scalp does).
Augmenting the cached upsampled LR beside the HR would break the pair: block averaging does not commute with a
gamma curve. :class:`RandResimulatedSlicePatchd` therefore draws the HR slice stack with a margin, augments it
(slice axis, in-plane flips, gamma and contrast stretch, zeroed background, stripped scalp and skull), then
degrades it with the bundle's LR simulation and upsamples it exactly as inference does, and only then crops the
margin away. With no augmentation it returns the same patches as :class:`common.transforms.RandSlicePatchd` on
the cached path.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform
from torch import Tensor

from common.data.covariates import COVARIATE_NAMES, encode_covariates
from common.transforms.degrade import BlockAverage
from common.transforms.slices import RandSlicePatchd
from common.transforms.tissue import TissueModel, draw_tissue_remap, remap_tissue_intensities
from common.transforms.upsample import GridUpsample
from common.utils import plain_tensor

__all__ = ["RandResimulatedSlicePatchd", "slice_position", "CovariateContextd"]


def slice_position(index: int | Tensor, num_slices: int) -> float | Tensor:
    """Position of slice ``index`` of ``num_slices`` relative to the middle slice: -1 first, 0 middle, 1 last."""
    half = max((num_slices - 1) / 2.0, 1.0)
    return (index - (num_slices - 1) / 2.0) / half


class CovariateContextd(Transform):
    """``context`` = ``[age / 100, sex, group, slice position]`` (float32, NaN = unknown) of a patch, the
    vector :class:`common.networks.CovariateEncoder` reads (encoding: :func:`common.data.encode_covariates`).
    The raw covariates and the position are removed: items that state different covariates still collate.

    Args:
        position_key: key of the slice position (:class:`RandResimulatedSlicePatchd` ``position_key``).
        output_key: where the context vector goes.
    """

    def __init__(self, position_key: str = "slice_position", output_key: str = "context") -> None:
        self.position_key, self.output_key = position_key, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        position = float(d.get(self.position_key, math.nan))
        d[self.output_key] = torch.tensor([*encode_covariates(d), position], dtype=torch.float32)
        for key in (*COVARIATE_NAMES, self.position_key):
            d.pop(key, None)
        return d


class RandResimulatedSlicePatchd(RandSlicePatchd):
    """A random slice patch of the HR ``label`` with its LR conditioning stack simulated after augmentation.

    Per patch: a slice axis from ``slice_axes`` (the volume is viewed with that axis first; ``0`` = sagittal as
    inference), a foreground slice and an aligned crop as :class:`common.transforms.RandSlicePatchd`, the HR
    slices at ``offsets`` taken with ``margin`` LR voxels of context; with probability ``strip_prob``, the voxels
    less than a depth drawn from ``strip_depth_range`` inside the head zeroed (a skull-stripped scan); then, with
    probability ``prob``, in-plane flips and the intensity map ``clip(stretch · x^gamma, 0, 1)`` (log-uniform
    gamma, uniform stretch), and, with probability ``background_prob`` among those patches, a zeroed background;
    then LR = ``degradation`` of each slice, upsampled with ``upsample_mode`` on the HR grid, and the margin
    cropped.

    Args:
        patch_size: in-plane crop size (h, w); multiples of the in-plane factors.
        offsets: neighbour offsets of the conditioning slices.
        scale_factor: HR/LR factors (fx, fy, fz) or in-plane (fy, fz); only the in-plane ones are used.
        degradation: LR simulation of a (1, slices, h, w) volume (block averaging by (1, fy, fz) when None).
        upsample_mode: upsampling of the LR conditioning (cubic, as inference).
        slice_axes: axes of the HR volume a slice may be drawn along (all three multiply the anatomy seen).
        prob: probability of augmenting a patch (flips and intensity); 0 turns augmentation off.
        gamma_range: range of the gamma exponent (log-uniform).
        stretch_range: range of the contrast stretch factor (uniform), applied after gamma, then clipped.
        background_prob: probability of zeroing the HR blocks whose mean is below a threshold drawn from
            ``background_range`` (after the intensity map): a skull-stripped or masked scan's background, where
            an LR voxel of exactly 0 means HR voxels of exactly 0. Without it the network, trained on scans with
            a noise floor, paints a faint offset into such backgrounds.
        background_range: range of that threshold on the [0, 1] scale.
        strip_prob: probability of stripping a patch: zeroing the HR voxels whose depth inside the head
            (``depth_key``, :class:`common.transforms.HeadDepthd`, in voxels) is below a depth drawn uniformly
            from ``strip_depth_range``. Brain tissue cut against an exact zero is the hardest edge of a
            skull-stripped scan, and scans with scalp never show it.
        strip_depth_range: range of the stripping depth in voxels (scalp and skull are about 5-15 mm thick).
        depth_key: key of the depth map (needed when ``strip_prob`` > 0).
        margin: LR voxels of context on each side (>= the upsampling kernel's radius keeps crops exact).
        position_key: also output the drawn slice's position relative to the middle slice under this key, in
            [-1, 1] along the drawn slice axis (the attention U-Net's context); None: not output.
        keep_keys: keys of the input item copied into every patch (e.g. the covariates ``age``, ``sex``,
            ``group``); missing ones are left out.
        paired_key: a real LR scan on the HR grid (a registered pair, :func:`common.transforms.
            pair_training_preprocessing`): the conditioning slices are cut from it at the same place instead of
            simulated, and take the same flips, intensity map, background and strip as the HR slice. Needs
            in-plane factors of 1 (the network maps the HR grid to itself). None: LR simulated from ``label``.
        gmm_prob: probability of the thesis's GMM intensity augmentation (methods.md §4), applied to the HR
            stack before the LR is simulated: each tissue class's mean shifted by a draw from ``gmm_mean_shift``
            (a fraction of the brain's intensity range) and its std scaled by a draw from ``gmm_std_scale``, every
            brain voxel keeping its z-score in its class. Needs the cached tissue labels and statistics
            (:class:`common.transforms.TissueModeld`: ``tissue_key``, ``tissue_stats_key``).
        gmm_mean_shift: range of the class means' shifts.
        gmm_std_scale: range of the class stds' factors.
        tissue_key: key of the tissue labels (1 CSF, 2 GM, 3 WM, 0 outside the brain).
        tissue_stats_key: key of ``[means, stds, span]`` of the fitted mixture.
        kwargs: the other :class:`common.transforms.RandSlicePatchd` arguments.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        offsets: Sequence[int] = (-1, 0),
        scale_factor: Sequence[int] = (2, 2),
        degradation: Transform | None = None,
        upsample_mode: str = "cubic",
        slice_axes: Sequence[int] = (0,),
        prob: float = 0.0,
        gamma_range: Sequence[float] = (1.0, 1.0),
        stretch_range: Sequence[float] = (1.0, 1.0),
        background_prob: float = 0.0,
        background_range: Sequence[float] = (0.0, 0.1),
        strip_prob: float = 0.0,
        strip_depth_range: Sequence[float] = (4.0, 16.0),
        depth_key: str = "head_depth",
        margin: int = 4,
        position_key: str | None = None,
        keep_keys: Sequence[str] = (),
        paired_key: str | None = None,
        gmm_prob: float = 0.0,
        gmm_mean_shift: Sequence[float] = (-0.05, 0.05),
        gmm_std_scale: Sequence[float] = (0.9, 1.1),
        tissue_key: str = "tissue",
        tissue_stats_key: str = "tissue_stats",
        **kwargs: Any,
    ) -> None:
        super().__init__(patch_size, offsets, scale_factor, **kwargs)
        self.position_key, self.keep_keys, self.paired_key = position_key, tuple(keep_keys), paired_key
        fy, fz = self.scale_factor
        if paired_key is not None and (fy, fz) != (1, 1):
            raise ValueError(f"real pairs ('{paired_key}' on the HR grid) need in-plane factors (1, 1), got {(fy, fz)}")
        self.gmm_prob, self.gmm_mean_shift, self.gmm_std_scale = float(gmm_prob), gmm_mean_shift, gmm_std_scale
        self.tissue_key, self.tissue_stats_key = tissue_key, tissue_stats_key
        if self.gmm_prob > 0 and paired_key is not None:
            raise ValueError("the GMM augmentation remaps the HR scan's tissue classes; with real pairs the LR scan "
                             "would need its own fit (not supported): set gmm_prob 0")
        self.degradation = degradation if degradation is not None else BlockAverage((1, fy, fz))
        self.upsample = GridUpsample((fy, fz), upsample_mode)
        self.slice_axes = tuple(int(a) for a in slice_axes)
        if not self.slice_axes or any(a not in (0, 1, 2) for a in self.slice_axes):
            raise ValueError(f"slice_axes must be a non-empty subset of (0, 1, 2), got {slice_axes}")
        self.prob, self.margin = float(prob), int(margin)
        self.background_prob = float(background_prob)
        self.background_range = tuple(float(t) for t in background_range)
        self.gamma_range = tuple(float(g) for g in gamma_range)
        self.stretch_range = tuple(float(s) for s in stretch_range)
        self.strip_prob, self.depth_key = float(strip_prob), depth_key
        self.strip_depth_range = tuple(float(t) for t in strip_depth_range)
        if not 0.0 <= self.strip_prob <= 1.0 or min(self.strip_depth_range) < 0:
            raise ValueError(f"strip_prob must be in [0, 1] and depths >= 0, got {strip_prob}, {strip_depth_range}")
        if min(self.gamma_range) <= 0 or min(self.stretch_range) <= 0:
            raise ValueError(f"gamma_range and stretch_range must be positive, got {gamma_range}, {stretch_range}")

    def _augment(self, stack: Tensor) -> tuple[Tensor, list[bool]]:
        """Random in-plane flips and intensity map of an HR stack (C, h, w) in [0, 1]; returns the flips made."""
        flips = [bool(self.R.rand() < 0.5) for _ in range(2)]
        for a, flip in enumerate(flips):
            if flip:
                stack = stack.flip(1 + a)
        gamma = math.exp(self.R.uniform(*(math.log(g) for g in self.gamma_range)))
        stretch = self.R.uniform(*self.stretch_range)
        stack = (stack.clamp(0, 1) ** gamma * stretch).clamp(0, 1)
        if self.background_prob > 0 and self.R.rand() < self.background_prob:
            threshold = self.R.uniform(*self.background_range)
            f = self.scale_factor
            keep = torch.nn.functional.avg_pool2d(stack[None], f)[0] > threshold
            stack = stack * keep.repeat_interleave(f[0], 1).repeat_interleave(f[1], 2)
        return stack, flips

    def _region(self, start: int, patch: int, size: int, f: int) -> tuple[int, int]:
        """HR index range of a crop with ``margin`` LR voxels each side, inside the volume, on the block grid."""
        lo = max(start - self.margin * f, 0)
        hi = min(start + patch + self.margin * f, size - size % f)
        return lo, hi

    def _remap_tissues(self, stack: Tensor, labels: Tensor, stats: Tensor) -> Tensor:
        """The GMM augmentation of an HR stack (C, h, w) with its tissue labels (C, h, w)."""
        means, stds, span = stats[:3].double().numpy(), stats[3:6].double().numpy(), float(stats[6])
        new_means, new_stds = draw_tissue_remap(self.R, means, stds, span, self.gmm_mean_shift, self.gmm_std_scale)
        model = TissueModel(means, stds, np.zeros(3), labels.numpy())
        return torch.from_numpy(remap_tissue_intensities(stack, model, new_means, new_stds)).clamp(0, 1)

    def _one_resimulated(
        self, hr: Tensor, fg_slices: Tensor, depth: Tensor | None = None, lr: Tensor | None = None,
        tissue: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, int]:
        # the usable in-plane extent: whole LR voxels only, as the degradation crops
        usable = [hr.shape[1 + a] - hr.shape[1 + a] % self.scale_factor[a] for a in range(2)]
        i, idx, starts = self._draw(hr, fg_slices, usable)
        regions = [self._region(starts[a], self.patch_size[a], hr.shape[1 + a], self.scale_factor[a]) for a in range(2)]
        # the conditioning slices, then the target slice last
        crop = (idx + [i], slice(*regions[0]), slice(*regions[1]))
        stack = hr[crop].float()
        if lr is not None:  # a real pair: its LR slices replace the HR ones the conditioning is simulated from
            stack = torch.cat([lr[crop][:-1].float(), stack[-1:]])
        if self.strip_prob > 0 and self.R.rand() < self.strip_prob:
            stack = stack * (depth[crop].float() >= self.R.uniform(*self.strip_depth_range))
        if tissue is not None and self.R.rand() < self.gmm_prob:
            stack = self._remap_tissues(stack, tissue[0][crop], tissue[1])
        inner = [starts[a] - regions[a][0] for a in range(2)]
        extent = [min(self.patch_size[a], stack.shape[1 + a] - inner[a]) for a in range(2)]
        if self.prob > 0 and self.R.rand() < self.prob:
            stack, flips = self._augment(stack)
            # a flip mirrors the crop inside its region (region and crop lengths are whole LR voxels)
            inner = [stack.shape[1 + a] - inner[a] - extent[a] if flips[a] else inner[a] for a in range(2)]
        if lr is not None:
            cond = stack[:-1]
        else:
            with torch.no_grad():
                cond = self.upsample(self.degradation(stack[:-1][None]))[0]
        sl = tuple(slice(s, s + e) for s, e in zip(inner, extent))
        label, cond = stack[-1][sl][None], cond[(slice(None),) + sl]
        return (*self._pad(cond, label), i)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict | list[dict]:
        d = dict(data)
        volume = plain_tensor(d[self.label_key])[0]
        fractions = d.get(self.foreground_key)
        if self.strip_prob > 0 and self.depth_key not in d:
            raise KeyError(f"strip_prob > 0 needs the head depth map '{self.depth_key}' (HeadDepthd)")
        depth = plain_tensor(d[self.depth_key])[0] if self.strip_prob > 0 else None
        paired = plain_tensor(d[self.paired_key])[0] if self.paired_key is not None else None
        labels = None
        if self.gmm_prob > 0:
            if self.tissue_key not in d or self.tissue_stats_key not in d:
                raise KeyError(f"gmm_prob > 0 needs the tissue model '{self.tissue_key}', '{self.tissue_stats_key}' "
                               "(TissueModeld in the cached preprocessing)")
            labels = plain_tensor(d[self.tissue_key])[0]
        if paired is not None and paired.shape != volume.shape:
            raise ValueError(f"'{self.paired_key}' {tuple(paired.shape)} and '{self.label_key}' "
                             f"{tuple(volume.shape)} are not on one grid")
        out = []
        for _ in range(self.num_samples):
            axes = self.slice_axes
            axis = axes[self.R.randint(len(axes))] if len(axes) > 1 else axes[0]
            hr = volume.movedim(axis, 0)
            depth_axis = depth.movedim(axis, 0) if depth is not None else None
            lr = paired.movedim(axis, 0) if paired is not None else None
            tissue = (labels.movedim(axis, 0), d[self.tissue_stats_key]) if labels is not None else None
            cond, label, i = self._one_resimulated(
                hr, self._foreground_slices(hr, fractions, axis), depth_axis, lr, tissue
            )
            patch = {self.output_cond_key: cond, self.label_key: label}
            patch.update({k: d[k] for k in self.keep_keys if k in d})
            if self.position_key is not None:
                patch[self.position_key] = slice_position(i, hr.shape[0])
            out.append(patch)
        return out if self.num_samples > 1 else out[0]
