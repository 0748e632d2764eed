"""Head masks (a threshold, closing and hole filling) and each voxel's depth inside the mask.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

__all__ = ["head_mask", "largest_component", "HeadMaskd", "mask_depth", "HeadDepthd"]


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
    return largest_component(ndimage.binary_fill_holes(mask))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (the mask itself when it has one or none)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


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
    (:class:`common.transforms.RandResimulatedSlicePatchd`).

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
