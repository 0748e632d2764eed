"""N4 bias-field correction (Tustison et al. 2010, IEEE TMI 29(6)) on ITK's N4BiasFieldCorrectionImageFilter.

The field is fitted on a copy shrunk by ``shrink_factor``, as ANTs' ``N4BiasFieldCorrection`` does, and its
B-spline log field, reconstructed on the shrunk grid, is resampled onto the full grid (the field is smooth by
construction, so nothing is lost by fitting it coarse). Defaults are the 3T->7T thesis's (methods.md §4): shrink 4, 150
iterations at each of 4 fitting levels, convergence 1e-7, Wiener noise 0.1, bias FWHM 0.18.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialResample

from .itk_bridge import from_itk, import_itk, to_itk
from .mask import head_mask

__all__ = ["N4_THESIS", "n4_bias_field", "N4BiasFieldCorrectiond"]

# methods.md §4, the thesis's N4 settings
N4_THESIS = {
    "shrink_factor": 4,
    "iterations": (150, 150, 150, 150),
    "convergence_threshold": 1e-7,
    "wiener_filter_noise": 0.1,
    "bias_field_fwhm": 0.18,
}


def n4_bias_field(
    volume: MetaTensor,
    mask=None,
    shrink_factor: int = N4_THESIS["shrink_factor"],
    iterations: Sequence[int] = N4_THESIS["iterations"],
    convergence_threshold: float = N4_THESIS["convergence_threshold"],
    wiener_filter_noise: float = N4_THESIS["wiener_filter_noise"],
    bias_field_fwhm: float = N4_THESIS["bias_field_fwhm"],
    control_points: int = 4,
) -> MetaTensor:
    """The multiplicative bias field of a volume (corrected = volume / field), on the volume's grid.

    Args:
        volume: (1, X, Y, Z) MetaTensor with a RAS affine (positive intensities; N4 works on their logarithm).
        mask: voxels the field is fitted on (same shape; default: :func:`common.transforms.head_mask`).
        shrink_factor: fit on a copy shrunk by this factor per axis.
        iterations: maximum iterations per fitting level (one entry per level, coarse to fine).
        convergence_threshold: stop a level when the field's change falls below this.
        wiener_filter_noise: the Wiener filter's noise term in histogram sharpening.
        bias_field_fwhm: full width at half maximum of the bias field's Gaussian model of the histogram.
        control_points: B-spline control points per axis at the coarsest level.
    """
    itk = import_itk()

    arr = volume.as_tensor()[0].float()
    if mask is None:
        mask = head_mask(arr.numpy())
    mask = np.asarray(torch.as_tensor(mask).reshape(arr.shape).numpy() > 0, dtype=np.uint8)
    if not mask.any():
        raise ValueError("N4: the mask is empty, nothing to fit the bias field on")
    # N4 takes logarithms: voxels at or below zero must stay out of the fit
    mask &= (arr.numpy() > 0).astype(np.uint8)
    image = to_itk(volume.clamp_min(0))
    mask_image = to_itk(torch.from_numpy(mask)[None], affine=volume.affine, pixel="uint8")

    shrink = [int(shrink_factor)] * 3
    small = itk.shrink_image_filter(image, shrink_factors=shrink)
    small_mask = itk.shrink_image_filter(mask_image, shrink_factors=shrink)
    n4 = itk.N4BiasFieldCorrectionImageFilter[type(small), type(small_mask), type(small)].New(
        Input=small, MaskImage=small_mask
    )
    n4.SetNumberOfFittingLevels(len(iterations))
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.SetConvergenceThreshold(float(convergence_threshold))
    n4.SetWienerFilterNoise(float(wiener_filter_noise))
    n4.SetBiasFieldFullWidthAtHalfMaximum(float(bias_field_fwhm))
    n4.SetNumberOfControlPoints([int(control_points)] * 3)
    n4.Update()

    # N4's B-spline log field on the shrunk grid, interpolated onto the full grid through world coordinates (the
    # field is smooth by construction: a few control points per axis, so linear interpolation loses nothing)
    log_small = from_itk(n4.ReconstructBiasField(n4.GetLogBiasFieldControlPointLattice()))
    log_field = SpatialResample(mode="bilinear", padding_mode="border")(
        log_small, dst_affine=volume.affine, spatial_size=arr.shape
    )
    return MetaTensor(log_field.as_tensor().exp(), meta=dict(volume.meta))


class N4BiasFieldCorrectiond(MapTransform):
    """Divide ``keys`` by their N4 bias field; the field can be kept under ``field_key``.

    The thesis's two-pass recipe is two of these around brain extraction: correct in the head, extract the brain
    (:class:`common.transforms.AtlasBrainMaskd`), correct again inside the brain (``mask_key="brain_mask"``).

    Args:
        keys: the volumes to correct, each with its own field.
        mask_key: a mask in the data to fit on (None: the volume's head mask).
        field_key: where to keep the field (``"{key}_" + field_key``), None to drop it.
        kwargs: :func:`n4_bias_field` settings (the thesis's by default).
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = None,
        field_key: str | None = None,
        allow_missing_keys: bool = False,
        **kwargs,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.field_key, self.kwargs = mask_key, field_key, kwargs

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[self.mask_key] if self.mask_key is not None else None
            field = n4_bias_field(d[key], mask=mask, **self.kwargs)
            d[key] = d[key] / field.as_tensor().to(d[key].dtype)
            if self.field_key is not None:
                d[f"{key}_{self.field_key}"] = field
        return d
