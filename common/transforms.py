"""Volume transforms: NIfTI load/save with geometry, percentile normalisation and its inverse, head masks.

The dictionary transforms carry what the output needs in the image's meta: ``norm_lo``/``norm_hi`` (the
percentiles used for [0, 1] scaling), ``source_ornt`` (the input's orientation) and the RAS affine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor
from scipy import ndimage

from common.io import Volume, hr_affine, load_volume, nifti_stem, save_volume

__all__ = [
    "percentiles",
    "PercentileNormalize",
    "PercentileNormalized",
    "invert_normalization",
    "head_mask",
    "HeadMaskd",
    "mask_depth",
    "HeadDepthd",
    "volume_to_metatensor",
    "plain_tensor",
    "LoadVolumed",
    "SaveSRd",
]

logger = logging.getLogger(__name__)


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


def head_mask(volume, threshold: float = 0.1, closing: int = 2) -> np.ndarray:
    """Head (foreground) mask: voxels above ``threshold`` of the 99th percentile, closed, holes filled, the
    largest connected component kept.

    Args:
        volume: 3D array (any intensity units).
        threshold: fraction of the 99th percentile that separates head from air.
        closing: iterations of binary closing that bridge dark gaps (CSF, sinuses) before filling holes.
    """
    arr = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    lo, hi = np.percentile(arr, [1, 99])
    mask = arr > lo + threshold * (hi - lo)
    if closing:
        # pad by replication: a head cut by the field of view (a neck, a slab crop) must not erode from the edge
        pad = [(closing, closing)] * mask.ndim
        mask = ndimage.binary_closing(np.pad(mask, pad, mode="edge"), iterations=closing, border_value=0)
        mask = mask[tuple(slice(closing, -closing) for _ in range(mask.ndim))]
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    return mask


class HeadMaskd(MapTransform):
    """Dictionary version of :func:`head_mask`: computes the mask of ``keys`` into ``output_key``."""

    def __init__(self, keys: KeysCollection, output_key: str = "mask", threshold: float = 0.1):
        super().__init__(keys)
        self.output_key, self.threshold = output_key, threshold

    def __call__(self, data):
        d = dict(data)
        key = self.first_key(d)
        d[self.output_key] = torch.from_numpy(head_mask(d[key][0], self.threshold)[None])
        return d


def mask_depth(mask: np.ndarray) -> np.ndarray:
    """Each voxel's Euclidean distance (voxels) to the nearest voxel outside ``mask``: 0 outside, and infinite
    everywhere when no voxel is outside (a crop inside the head has no surface to measure from; scipy would
    measure from an implicit point beyond the array)."""
    mask = np.asarray(mask, dtype=bool)
    return np.full(mask.shape, np.inf) if mask.all() else ndimage.distance_transform_edt(mask)


class HeadDepthd(MapTransform):
    """Depth inside the head: :func:`mask_depth` of the :func:`head_mask` of ``keys``, into ``output_key``
    (1, X, Y, Z) float16.

    Zeroing the voxels shallower than a depth ``d`` strips the scalp (and, deeper, the skull) the way a
    skull-stripping tool does, following the head's shape: the training-time stand-in for skull-stripped scans
    (:class:`common.slice_augment.RandResimulatedSlicePatchd`).

    Args:
        keys: the volume the mask is computed from (the first present key is used).
        output_key: where the depth map goes.
        threshold: :func:`head_mask` threshold.
    """

    def __init__(self, keys: KeysCollection, output_key: str = "head_depth", threshold: float = 0.1):
        super().__init__(keys)
        self.output_key, self.threshold = output_key, threshold

    def __call__(self, data):
        d = dict(data)
        depth = mask_depth(head_mask(d[self.first_key(d)][0], self.threshold)).astype(np.float16)
        d[self.output_key] = torch.from_numpy(depth[None])
        return d


def volume_to_metatensor(vol: Volume) -> MetaTensor:
    """A channel-first (1, X, Y, Z) MetaTensor carrying the volume's RAS affine, path and orientation."""
    meta = {
        "affine": torch.as_tensor(vol.affine, dtype=torch.float64),
        "filename_or_obj": vol.path,
        "source_ornt": torch.as_tensor(vol.source_ornt),
        "space": "RAS",
    }
    return MetaTensor(torch.from_numpy(vol.data)[None], meta=meta)


def plain_tensor(x) -> torch.Tensor:
    """The data of a MetaTensor, tensor or array as a plain tensor (batches and crops need no metadata)."""
    return convert_to_tensor(x, track_meta=False)


class LoadVolumed(MapTransform):
    """Load NIfTI paths with :func:`common.io.load_volume` (RAS, float32, checked) into MetaTensors.

    Args:
        keys: keys holding file paths.
        min_shape: smallest volume the method accepts; smaller inputs stop with an error naming the file.
    """

    def __init__(self, keys: KeysCollection, min_shape: Sequence[int] = (1, 1, 1), allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.min_shape = tuple(min_shape)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = volume_to_metatensor(load_volume(d[key], self.min_shape))
        return d


class SaveSRd(MapTransform):
    """Write SR predictions as ``<output_dir>/<input stem><suffix>.nii.gz`` on the HR grid.

    The affine comes from the LR image's RAS affine by the half-voxel rule (the network's output would otherwise
    inherit the LR geometry), intensities are mapped back to the input's units with the LR image's percentiles,
    and each file is written float32, atomically, in the input's orientation, never over an input.

    Args:
        keys: the prediction keys, e.g. ("pred", "pred_std").
        output_dir: folder for the results.
        scale_factor: upsampling factor per RAS axis.
        suffixes: one per key; default "_sr" for the first key and "_sr_<key minus 'pred_'>" for the others.
        std_keys: keys holding a spread (standard deviation): mapped back by the scale alone, no offset.
        ref_key: key of the LR input whose meta gives path, affine, orientation and percentiles.
        denormalize: map [0, 1] back to the input's units (the contract's default).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        scale_factor: Sequence[int],
        suffixes: Sequence[str] | None = None,
        std_keys: KeysCollection = (),
        ref_key: str = "image",
        denormalize: bool = True,
    ):
        super().__init__(keys, allow_missing_keys=True)
        self.output_dir = Path(output_dir)
        self.scale_factor = tuple(int(f) for f in scale_factor)
        if suffixes is None:
            suffixes = ["_sr"] + [f"_sr_{k.removeprefix('pred_')}" for k in self.keys[1:]]
        self.suffixes = dict(zip(self.keys, suffixes))
        self.std_keys = {std_keys} if isinstance(std_keys, str) else set(std_keys)
        self.ref_key, self.denormalize = ref_key, denormalize

    def output_path(self, ref: MetaTensor, key: str) -> Path:
        """Where the output of ``key`` for the input behind ``ref`` goes."""
        stem = nifti_stem(ref.meta["filename_or_obj"])
        return self.output_dir / f"{stem}{self.suffixes[key]}.nii.gz"

    def __call__(self, data):
        d = dict(data)
        ref = d[self.ref_key]
        affine = hr_affine(np.asarray(ref.affine, dtype=np.float64), self.scale_factor)
        for key in self.key_iterator(d):
            pred = d[key]
            arr = (pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)).detach().float()
            arr = arr.cpu().numpy()[0]
            if self.denormalize and "norm_lo" in ref.meta:
                lo, hi = float(ref.meta["norm_lo"]), float(ref.meta["norm_hi"])
                arr = arr * (hi - lo) if key in self.std_keys else invert_normalization(arr, lo, hi)
            path = self.output_path(ref, key)
            save_volume(
                path, arr, affine, np.asarray(ref.meta["source_ornt"]), protect=[ref.meta["filename_or_obj"]]
            )
            logger.info("wrote %s", path)
            d[f"{key}_path"] = str(path)
        return d
