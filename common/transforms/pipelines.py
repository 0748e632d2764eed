"""Transform chains the bundles share, each built by one call so a bundle config needs one JSON entry for it.

Keys: ``image`` = LR input, ``label`` = HR volume (when known), ``pred`` = SR output; ``mask`` = head mask of HR.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import CenterSpatialCropd, Compose, MapTransform, Spacingd, Transform

from common.data import VolumeError

from common.transforms.degrade import BlockAverage, BlockDownscaled, Degraded, degradation_by_name
from common.transforms.intensity import PercentileNormalized
from common.transforms.io import LoadVolumed, SaveSRd
from common.transforms.mask import HeadDepthd
from common.transforms.slices import ForegroundSlicesd, SliceForegroundd
from common.transforms.tissue import TissueModeld
from common.transforms.upsample import UpsampleLRd

__all__ = [
    "SimulateLRd",
    "central_slices",
    "inference_preprocessing",
    "inference_postprocessing",
    "CropHRToLRd",
    "training_preprocessing",
    "validation_preprocessing",
    "hr_preprocessing",
    "slab_preprocessing",
    "SameGridd",
    "pair_training_preprocessing",
    "pair_validation_preprocessing",
]


class SimulateLRd(Transform):
    """Degrade ``label`` (HR) into ``image`` (LR) for items that have no LR image; block averaging by default. An
    item naming its own degradation under ``"degradation"`` (:func:`common.data.with_degradation_copies`) gets that
    one (a name of :data:`common.transforms.DEGRADATIONS`, by ``scale_factor``).

    Args:
        scale_factor: HR/LR factor per RAS axis (for the default degradation).
        degradation: any array degradation of :mod:`common.transforms.degrade`.
        units_key: also keep the simulated LR under this key (scoring needs it in its units when ``image`` is
            then scaled and clipped, which cannot be inverted); None keeps no copy.
    """

    def __init__(self, scale_factor: Sequence[int], degradation: Transform | None = None,
                 units_key: str | None = None):
        self.scale_factor = scale_factor
        self.degradation = degradation if degradation is not None else BlockAverage(scale_factor)
        self.degrade = Degraded(keys="label", degradation=self.degradation, output_keys="image")
        self.named: dict[str, Degraded] = {}  # one transform per degradation name, built on first use
        self.units_key = units_key

    def _degrade(self, name: str | None) -> Degraded:
        if name is None:
            return self.degrade
        if name not in self.named:
            self.named[name] = Degraded(keys="label", degradation=degradation_by_name(name, self.scale_factor),
                                        output_keys="image")
        return self.named[name]

    def __call__(self, data):
        if "image" in data or "label" not in data:
            return data
        d = self._degrade(data.get("degradation"))(data)
        if self.units_key is not None:
            d[self.units_key] = d["image"].clone()
        return d


def central_slices(num_slices: int | None, axis: int = 0) -> Transform:
    """Crop ``label`` (HR) to its central ``num_slices`` along ``axis`` (all when None)."""
    size = [-1, -1, -1]
    if num_slices:
        size[axis] = int(num_slices)
    return CenterSpatialCropd(keys="label", roi_size=size, allow_missing_keys=True)


def inference_preprocessing(
    scale_factor: Sequence[int],
    min_shape: Sequence[int] = (1, 1, 1),
    degradation: Transform | None = None,
    num_slices: int | None = None,
    clip: bool = True,
    label_roi_size: Sequence[int] | None = None,
    output_spacing: Sequence[float] | None = None,
) -> Compose:
    """Load (RAS, checked), simulate the LR input from an HR label where no LR is given, scale LR to [0, 1].

    The LR image's own 1st/99th percentiles do the scaling (kept in its meta for the inverse); an HR label
    stays in its units for scoring.

    Args:
        scale_factor: HR/LR factor per RAS axis.
        min_shape: smallest LR volume the method accepts.
        degradation: how LR is simulated from HR (block averaging by ``scale_factor`` when None).
        num_slices: crop HR labels to their central sagittal slices first (for evaluation on slabs).
        clip: clip the scaled LR to [0, 1] (learned models are trained on clipped inputs; interpolation needs
            no clipping and keeps intensities above the 99th percentile, e.g. contrast enhancement).
        label_roi_size: centre-crop HR labels to this RAS size instead (-1 keeps an axis; overrides num_slices).
        output_spacing: resample a given LR image onto a grid of this spacing (mm, RAS) first, with a cubic
            B-spline: the input of a model trained on real pairs, which maps the HR grid to itself (scale 1);
            real factors need not be integers (e.g. 1 mm -> 0.65 mm). None: the image's own grid.
    """
    label_crop = central_slices(num_slices) if label_roi_size is None else CenterSpatialCropd(
        keys="label", roi_size=[int(r) for r in label_roi_size], allow_missing_keys=True
    )
    return Compose(
        [
            LoadVolumed(keys="image", min_shape=min_shape, allow_missing_keys=True, scale_factor=scale_factor),
            *([] if output_spacing is None else [
                Spacingd(keys="image", pixdim=[float(s) for s in output_spacing], mode=3, padding_mode="nearest",
                         allow_missing_keys=True)]),
            LoadVolumed(keys="label", min_shape=min_shape, allow_missing_keys=True),
            label_crop,
            SimulateLRd(scale_factor, degradation, units_key="image_units" if clip else None),
            PercentileNormalized(keys="image", clip=clip),
        ]
    )


def inference_postprocessing(
    output_dir: str, scale_factor: Sequence[int], keys: Sequence[str] = ("pred",), std_keys: Sequence[str] = ()
) -> Compose:
    """Write each prediction key as ``<stem>_sr*.nii.gz`` on the HR grid in the input's units and orientation."""
    return Compose([SaveSRd(keys=list(keys), output_dir=output_dir, scale_factor=scale_factor, std_keys=std_keys)])


class CropHRToLRd(MapTransform):
    """Crop the HR ``label`` to the LR ``image``'s shape times ``scale_factor`` (the voxels the LR grid covers).

    Args:
        scale_factor: HR/LR factor per spatial axis.
        image_key: key of the LR image.
        label_key: key of the HR image.
    """

    def __init__(self, scale_factor: Sequence[int], image_key: str = "image", label_key: str = "label") -> None:
        super().__init__([image_key, label_key])
        self.scale_factor = tuple(int(f) for f in scale_factor)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        lr = d[self.image_key].shape[1:]
        crop = tuple(slice(0, s * f) for s, f in zip(lr, self.scale_factor))
        d[self.label_key] = d[self.label_key][(slice(None),) + crop]
        return d


def training_preprocessing(
    scale_factor: Sequence[int],
    degradation: Transform | None = None,
    upsample_mode: str = "cubic",
    slice_axes: Sequence[int] = (0,),
    head_depth: bool = False,
    tissue_model: bool = False,
) -> Compose:
    """The cached part of the training data path: load the HR ``label`` (RAS), simulate the LR ``image``, scale
    both with the LR's 1st/99th percentiles (as inference does, where only LR exists), upsample LR to ``image_up``,
    and note each sagittal slice's foreground fraction (``slice_foreground``). Items marked ``downscale``
    (:func:`common.data.with_downscaled_copies`) are block-averaged first.

    Args:
        scale_factor: HR/LR factor per RAS axis.
        degradation: LR simulation (block averaging by ``scale_factor`` when None).
        upsample_mode: upsampling of the LR conditioning.
        slice_axes: axes training slices are drawn along (foreground fractions are noted for each).
        head_depth: also store the HR's depth inside the head (``head_depth``, :class:`common.transforms.HeadDepthd`)
            for the skull-strip augmentation.
        tissue_model: also fit the HR's tissue mixture (:class:`common.transforms.TissueModeld`, in the item's
            ``brain_mask`` or an atlas brain mask) for the GMM intensity augmentation.
    """
    transforms = [
        LoadVolumed(keys="label"),
        BlockDownscaled("label"),
        SimulateLRd(scale_factor, degradation),
        PercentileNormalized(keys=["image", "label"], ref_key="image"),
        UpsampleLRd(scale_factor, upsample_mode),
        SliceForegroundd("label", axes=slice_axes),
    ]
    transforms += [HeadDepthd("label")] if head_depth else []
    return Compose(transforms + ([TissueModeld("label")] if tissue_model else []))


def validation_preprocessing(
    scale_factor: Sequence[int], num_slices: int | None = None, degradation: Transform | None = None
) -> Compose:
    """Validation volumes: the HR ``label`` (block-averaged first when the item is marked ``downscale``, as a
    cascade's earlier stage) cropped to its central ``num_slices`` sagittal slices, the LR ``image`` simulated from
    it, both scaled with the LR's percentiles; ``label`` cropped to the SR grid.

    Args:
        scale_factor: HR/LR factor per RAS axis.
        num_slices: central sagittal slices to keep (all when None).
        degradation: LR simulation (block averaging by ``scale_factor`` when None).
    """
    return Compose(
        [
            LoadVolumed(keys="label"),
            BlockDownscaled("label"),
            central_slices(num_slices),
            SimulateLRd(scale_factor, degradation),
            CropHRToLRd(scale_factor),
            PercentileNormalized(keys=["image", "label"], ref_key="image"),
        ]
    )


def hr_preprocessing(
    lower: float = 1.0, upper: float = 99.0, threshold: float = 0.1, min_foreground: float = 0.05
) -> Compose:
    """The cached part of the data path: load the HR ``label`` (RAS, checked), scale it to [0, 1] by its own
    ``lower``/``upper`` percentiles and clip (methods.md §0), and list its non-empty sagittal slices in
    ``fg_slices`` (at least ``min_foreground`` of the voxels above ``threshold``). No LR image is made.

    Args:
        lower: lower percentile.
        upper: upper percentile.
        threshold: head threshold on the [0, 1] scale.
        min_foreground: smallest fraction of head voxels in a non-empty slice.
    """
    return Compose([
        LoadVolumed(keys="label"),
        PercentileNormalized(keys="label", lower=lower, upper=upper),
        ForegroundSlicesd(threshold=threshold, min_foreground=min_foreground),
    ])


def slab_preprocessing(
    scale_factor: Sequence[int], roi_size: Sequence[int] | None = None, degradation: Any = None
) -> Any:
    """Evaluation data path on a cropped slab: :func:`common.transforms.inference_preprocessing` with the HR
    ``label`` first centre-cropped to ``roi_size`` (RAS voxels, -1 keeps an axis; e.g. [8, 128, 128]: 8 sagittal
    slices, 128 x 128 in-plane), so the 2000-level sampler and its k-ablation fit a CPU budget.

    Args:
        scale_factor: HR/LR factor per RAS axis.
        roi_size: HR crop (None: whole volumes).
        degradation: LR simulation (block averaging by ``scale_factor`` when None).
    """

    return inference_preprocessing(scale_factor, degradation=degradation, label_roi_size=roi_size)


class SameGridd(MapTransform):
    """Check that the volumes of ``keys`` lie on one voxel grid (shape and affine), as the registered pairs of the
    preparation chain (:func:`common.transforms.prepare_pairs`) do; an error naming both files otherwise.

    Args:
        keys: the volumes (the first is the reference).
        atol: tolerance on the affines (mm).
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"), atol: float = 1e-3) -> None:
        super().__init__(keys)
        self.atol = float(atol)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        ref, *others = (data[k] for k in self.keys)
        for other in others:
            if tuple(ref.shape[1:]) != tuple(other.shape[1:]) or not np.allclose(
                np.asarray(ref.affine), np.asarray(other.affine), atol=self.atol
            ):
                raise VolumeError(
                    ref.meta.get("filename_or_obj", self.keys[0]),
                    f"is not on the voxel grid of {other.meta.get('filename_or_obj', '?')} (shapes "
                    f"{tuple(ref.shape[1:])} and {tuple(other.shape[1:])}): a real pair must be registered and "
                    "resampled onto the HR grid first (the bundle's configs/prepare.json)",
                )
        return dict(data)


def pair_training_preprocessing(slice_axes: Sequence[int] = (0,), head_depth: bool = False) -> Compose:
    """The cached part of training on real pairs: load the LR ``image`` (registered onto the HR grid) and the HR
    ``label``, check they share the grid, scale both with the LR's 1st/99th percentiles (as inference, where only
    LR exists), and note each slice's foreground fraction. No LR is simulated: the pair is the data.

    Args:
        slice_axes: axes training slices are drawn along.
        head_depth: also store the HR's depth inside the head (``head_depth``) for the skull-strip augmentation.
    """
    transforms = [
        LoadVolumed(keys=["image", "label"]),
        SameGridd(("image", "label")),
        PercentileNormalized(keys=["image", "label"], ref_key="image"),
        SliceForegroundd("label", axes=slice_axes),
    ]
    return Compose(transforms + ([HeadDepthd("label")] if head_depth else []))


def pair_validation_preprocessing(num_slices: int | None = None) -> Compose:
    """Validation on real pairs: both scans loaded, checked to share the grid, cropped to their central
    ``num_slices`` sagittal slices (all when None) and scaled with the LR's percentiles.

    Args:
        num_slices: central sagittal slices to keep.
    """
    size = [int(num_slices) if num_slices else -1, -1, -1]
    return Compose([
        LoadVolumed(keys=["image", "label"]),
        SameGridd(("image", "label")),
        CenterSpatialCropd(keys=["image", "label"], roi_size=size),
        PercentileNormalized(keys=["image", "label"], ref_key="image"),
    ])
