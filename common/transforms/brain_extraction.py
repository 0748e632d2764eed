"""Atlas-based brain extraction that works offline: nilearn's ICBM152 2009a template (Fonov et al. 2011,
NeuroImage 54(1)), registered onto the scan with elastix (affine, then B-spline), carries its tissue maps along.

nilearn ships the template's T1 (skull-stripped: CSF around the brain, nothing beyond), grey-matter and
white-matter probability maps; the ICBM CSF map is not in the wheel, so CSF is the rest of the closed brain
envelope: ``csf = envelope - gm - wm``, the envelope being the closed, hole-filled region of ``gm + wm > 0.1``.
The brain mask is ``gm + wm >= threshold``, or ``gm + wm + csf >= threshold`` with CSF kept (ventricles and
sulci inside the mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Spacing, SpatialResample
from scipy import ndimage

from common.data import load_volume, nilearn_file

from .mask import head_mask, largest_component, mask_depth
from .registration import register

__all__ = [
    "TISSUES",
    "mni152_atlas",
    "rough_brain_mask",
    "atlas_tissue_priors",
    "brain_mask_from_priors",
    "AtlasBrainMaskd",
]

TISSUES = ("csf", "gm", "wm")  # T1 intensity order
_ATLAS = "datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@lru_cache(maxsize=1)
def _atlas_arrays() -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    t1 = load_volume(nilearn_file(_ATLAS.format("t1")))
    gm, wm = (load_volume(nilearn_file(_ATLAS.format(k))).data / 255.0 for k in ("gm", "wm"))  # uint8 maps
    envelope = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.1, iterations=3))
    csf = np.clip(envelope - gm - wm, 0.0, 1.0).astype(np.float32)
    return t1.affine, {"t1": t1.data, "gm": gm, "wm": wm, "csf": csf}, envelope


def mni152_atlas() -> dict[str, MetaTensor]:
    """The template as (1, X, Y, Z) MetaTensors: ``t1`` as shipped, ``t1_brain`` (zero outside the envelope), the
    ``csf``/``gm``/``wm`` probability maps in [0, 1]."""
    affine, maps, envelope = _atlas_arrays()
    out = {k: MetaTensor(torch.from_numpy(v.copy())[None], affine=torch.as_tensor(affine)) for k, v in maps.items()}
    out["t1_brain"] = out["t1"] * torch.from_numpy(envelope)[None]
    return out


def _resampled(volume: MetaTensor, spacing: float | None) -> MetaTensor:
    return volume if spacing is None else Spacing(pixdim=(spacing,) * 3, mode="bilinear")(volume)


def rough_brain_mask(
    volume: np.ndarray, spacing: float, threshold: float = 0.4, erosion_mm: float = 4.0, fov_mm: float = 170.0
) -> np.ndarray:
    """A morphological first guess of the brain in a T1 head scan, the starting point of the registration.

    The template in nilearn's wheel is skull-stripped, and mutual information between it and a whole head pulls
    the template's brain out to the scalp (measured here: 2.7 l brains). So the head is first cut to ``fov_mm``
    below its top (FSL ``robustfov``'s 170 mm, which drops the neck), thresholded at ``threshold`` of its 95th
    percentile (tissue brighter than CSF and bone), eroded by ``erosion_mm`` to cut the brain from the scalp
    through the dark skull, reduced to its largest component and dilated back.

    Args:
        volume: (X, Y, Z) RAS array on an isotropic grid of ``spacing`` mm (Z superior).
        spacing: its voxel size in mm.
        threshold: fraction of the head's 95th percentile.
        erosion_mm: erosion radius that separates brain from scalp.
        fov_mm: kept height below the top of the head.
    """
    head = head_mask(volume)
    if not head.any():
        return head
    top = int(np.nonzero(head.any(axis=(0, 1)))[0].max())
    fov = np.zeros_like(head)
    fov[:, :, max(0, top - int(round(fov_mm / spacing))) :] = True
    inner = mask_depth(head) * spacing > 2 * spacing  # off the scalp's surface
    steps = max(1, int(round(erosion_mm / spacing)))
    tissue = (volume > threshold * np.percentile(volume[head], 95)) & fov & inner
    mask = largest_component(ndimage.binary_erosion(tissue, iterations=steps))
    return ndimage.binary_fill_holes(ndimage.binary_dilation(mask, iterations=steps + 1) & head)


def atlas_tissue_priors(
    volume: MetaTensor,
    skull_stripped: bool = False,
    stages: Sequence[str] = ("affine", "bspline"),
    working_spacing: float | None = 2.0,
    iterations: int = 300,
    bspline_spacing: float = 12.0,
    seed: int = 0,
) -> dict[str, MetaTensor]:
    """The template's CSF/GM/WM probability maps moved onto ``volume``'s grid.

    Args:
        volume: the scan, (1, X, Y, Z) MetaTensor with a RAS affine.
        skull_stripped: the scan has no skull (register onto it directly, without :func:`rough_brain_mask`).
        stages: elastix stages, template onto scan.
        working_spacing: register copies resampled to this isotropic spacing (mm) and resample the moved maps onto
            the scan's own grid (None: all at full resolution; 2 mm is about 8x cheaper and the maps are smooth).
        iterations: optimiser iterations per pyramid level.
        bspline_spacing: B-spline control-point spacing in mm.
        seed: elastix's random seed.
    """
    atlas = mni152_atlas()
    fixed = _resampled(volume, working_spacing)
    if not skull_stripped:
        spacing = working_spacing or float(np.abs(np.linalg.svd(volume.affine.numpy()[:3, :3])[1]).mean())
        fixed = fixed * torch.from_numpy(rough_brain_mask(fixed[0].numpy(), spacing).astype(np.float32))[None]
    result = register(
        fixed,
        _resampled(atlas["t1_brain"], working_spacing),
        stages=stages,
        iterations=iterations,
        bspline_spacing=bspline_spacing,
        seed=seed,
        follow=[(atlas[k], 1) for k in TISSUES],
    )
    priors = dict(zip(TISSUES, result.warped))
    if working_spacing is not None:  # smooth maps: resampling them beats a B-spline transform at every voxel
        to_grid = SpatialResample(mode="bilinear", padding_mode="zeros")
        priors = {k: to_grid(v, dst_affine=volume.affine, spatial_size=volume.shape[1:]) for k, v in priors.items()}
    return {k: MetaTensor(v.as_tensor().clamp(0, 1), meta=dict(volume.meta)) for k, v in priors.items()}


def brain_mask_from_priors(
    priors: dict[str, MetaTensor], keep_csf: bool = True, threshold: float = 0.5, head=None
) -> MetaTensor:
    """Brain mask from tissue probabilities: ``gm + wm (+ csf) >= threshold``, holes filled, largest component,
    cut to ``head`` (the scan's :func:`common.transforms.head_mask`) when given: maps registered at a working
    resolution must not let the brain reach past the head into air."""
    prob = priors["gm"] + priors["wm"] + (priors["csf"] if keep_csf else 0.0)
    mask = largest_component(prob[0].numpy() >= threshold)
    if keep_csf:
        mask = ndimage.binary_fill_holes(mask)
    if head is not None:
        mask &= np.asarray(head, dtype=bool).reshape(mask.shape)
    return MetaTensor(torch.from_numpy(mask.astype(np.uint8))[None], meta=dict(priors["gm"].meta))


class AtlasBrainMaskd(MapTransform):
    """Brain mask of ``keys`` (first present, cut to its head mask) into ``mask_key``, the moved tissue maps into
    ``"{prior_key}_csf"`` etc. for :class:`common.transforms.TissueSegmentd`; ``apply`` zeroes the non-brain.

    Args:
        keys: the scan(s); the first present is registered, the mask applies to all.
        mask_key: where the brain mask goes.
        prior_key: prefix of the moved tissue maps (None: drop them).
        keep_csf: the mask keeps the CSF (ventricles, sulci) or only grey and white matter.
        threshold: probability threshold of the mask.
        apply: multiply ``keys`` by the mask (brain extraction proper).
        kwargs: :func:`atlas_tissue_priors` settings (``skull_stripped``, ``working_spacing``, ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "brain_mask",
        prior_key: str | None = "prior",
        keep_csf: bool = True,
        threshold: float = 0.5,
        apply: bool = False,
        allow_missing_keys: bool = False,
        **kwargs,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.prior_key, self.keep_csf, self.threshold = mask_key, prior_key, keep_csf, threshold
        self.apply, self.kwargs = apply, kwargs

    def __call__(self, data):
        d = dict(data)
        key = self.first_key(d)
        priors = atlas_tissue_priors(d[key], **self.kwargs)
        mask = brain_mask_from_priors(priors, self.keep_csf, self.threshold, head=head_mask(d[key][0].numpy()))
        d[self.mask_key] = mask
        if self.prior_key is not None:
            d.update({f"{self.prior_key}_{k}": v for k, v in priors.items()})
        if self.apply:
            for k in self.key_iterator(d):
                d[k] = d[k] * mask.to(d[k].dtype)
        return d
