"""Transform chains the bundles share, each built by one call so a bundle config needs one JSON entry for it.

Keys: ``image`` = LR input, ``label`` = HR volume (when known), ``pred`` = SR output; ``mask`` = head mask of HR.
"""

from __future__ import annotations

from typing import Sequence

from monai.transforms import CenterSpatialCropd, Compose, Transform

from common.degrade import BlockAverage, Degraded
from common.transforms import LoadVolumed, PercentileNormalized, SaveSRd

__all__ = ["SimulateLRd", "inference_preprocessing", "inference_postprocessing", "central_slices"]


class SimulateLRd(Transform):
    """Degrade ``label`` (HR) into ``image`` (LR) for items that have no LR image; block averaging by default.

    Args:
        scale_factor: HR/LR factor per RAS axis (for the default degradation).
        degradation: any array degradation of :mod:`common.degrade`.
        units_key: also keep the simulated LR under this key (scoring needs it in its units when ``image`` is
            then scaled and clipped, which cannot be inverted); None keeps no copy.
    """

    def __init__(self, scale_factor: Sequence[int], degradation: Transform | None = None,
                 units_key: str | None = None):
        self.degradation = degradation if degradation is not None else BlockAverage(scale_factor)
        self.degrade = Degraded(keys="label", degradation=self.degradation, output_keys="image")
        self.units_key = units_key

    def __call__(self, data):
        if "image" in data or "label" not in data:
            return data
        d = self.degrade(data)
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
    """
    return Compose(
        [
            LoadVolumed(keys=["image", "label"], min_shape=min_shape, allow_missing_keys=True),
            central_slices(num_slices),
            SimulateLRd(scale_factor, degradation, units_key="image_units" if clip else None),
            PercentileNormalized(keys="image", clip=clip),
        ]
    )


def inference_postprocessing(
    output_dir: str, scale_factor: Sequence[int], keys: Sequence[str] = ("pred",), std_keys: Sequence[str] = ()
) -> Compose:
    """Write each prediction key as ``<stem>_sr*.nii.gz`` on the HR grid in the input's units and orientation."""
    return Compose([SaveSRd(keys=list(keys), output_dir=output_dir, scale_factor=scale_factor, std_keys=std_keys)])
