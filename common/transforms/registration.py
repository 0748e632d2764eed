"""Image registration with elastix (Klein et al. 2010, IEEE TMI 29(1)) through itk-elastix: rigid, affine and
B-spline stages, the moved image on the reference grid, the transform kept for masks and other images.

Each stage is elastix's default parameter map of that name (multi-resolution, Mattes mutual information, adaptive
stochastic gradient descent) with a fixed random seed, so a run is reproducible; mutual information lets a scan
of one contrast or scanner be registered onto another's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.data import InputFileError

from .itk_bridge import from_itk, import_itk, in_fresh_process, to_itk
from .mask import head_mask

__all__ = ["RegistrationError", "Registration", "register", "warp", "displacement_field", "RegisterToReferenced"]

STAGES = ("translation", "rigid", "affine", "bspline")


class RegistrationError(InputFileError):
    """A registration that failed or produced an implausible alignment; names the moving and the fixed file."""


@dataclass
class Registration:
    """The result of :func:`register`.

    Attributes:
        moved: the moving volume resampled onto the fixed volume's grid.
        parameters: elastix's transform parameter maps, one ``{name: [values]}`` dict per stage (plain data: it
            crosses processes and writes as JSON); :func:`warp` applies them.
        overlap: Dice of the fixed head mask and the moved head mask (the plausibility check).
        warped: the ``follow`` volumes of :func:`register`, moved with the same transform.
    """

    moved: MetaTensor
    parameters: list[dict[str, list[str]]]
    overlap: float
    warped: list[MetaTensor] = field(default_factory=list)


def _name(volume) -> str:
    meta = getattr(volume, "meta", {}) or {}
    return str(meta.get("filename_or_obj") or meta.get("path") or "<in-memory volume>")


def _parameter_object(
    stages: Sequence[str], resolutions: int, iterations: int, samples: int, bspline_spacing: float, seed: int
):
    itk = import_itk()

    params = itk.ParameterObject.New()
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown registration stage {stage!r}; choose from {STAGES}")
        pmap = params.GetDefaultParameterMap(stage, int(resolutions), float(bspline_spacing))
        pmap["MaximumNumberOfIterations"] = [str(int(iterations))]
        pmap["NumberOfSpatialSamples"] = [str(int(samples))]
        pmap["RandomSeed"] = [str(int(seed))]
        pmap["AutomaticTransformInitialization"] = ["true"] if stage == stages[0] else ["false"]
        pmap["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        pmap["ResultImagePixelType"] = ["float"]
        params.AddParameterMap(pmap)
    return params


def _maps(parameter_object) -> list[dict[str, list[str]]]:
    return [
        {k: list(v) for k, v in dict(parameter_object.GetParameterMap(i)).items()}
        for i in range(parameter_object.GetNumberOfParameterMaps())
    ]


def _parameter_object_of(maps: list[dict[str, list[str]]], **overrides):
    itk = import_itk()
    params = itk.ParameterObject.New()
    for pmap in maps:
        params.AddParameterMap({**pmap, **{k: [str(v)] for k, v in overrides.items()}})
    return params


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 0.0


def register(
    fixed: MetaTensor,
    moving: MetaTensor,
    stages: Sequence[str] = ("rigid",),
    fixed_mask=None,
    resolutions: int = 4,
    iterations: int = 500,
    samples: int = 4096,
    bspline_spacing: float = 10.0,
    seed: int = 0,
    min_overlap: float = 0.5,
    follow: Sequence[tuple[MetaTensor, int]] = (),
) -> Registration:
    """Register ``moving`` onto ``fixed`` (both (1, X, Y, Z) MetaTensors with RAS affines, grids may differ).

    Args:
        fixed: the reference volume; the result lies on its grid.
        moving: the volume to move.
        stages: elastix transforms applied in turn, from ``translation``, ``rigid``, ``affine``, ``bspline``.
        fixed_mask: restrict the metric to these fixed voxels (e.g. a brain mask), same shape as ``fixed``.
        resolutions: pyramid levels per stage.
        iterations: optimiser iterations per level.
        samples: random spatial samples per iteration.
        bspline_spacing: B-spline control-point spacing in mm (``bspline`` stage).
        seed: elastix's random seed (reproducible sampling).
        min_overlap: smallest Dice of the two head masks after registration that counts as a success.
        follow: ``(volume, interpolation order)`` pairs on the moving grid to move with the same transform
            (``Registration.warped``; order 0 for masks).

    Runs in a fresh process (:func:`common.transforms.in_fresh_process`): elastix slows down by 10x and more in a
    process where N4 or elastix has run before.

    Raises:
        RegistrationError: elastix failed (an empty image, no overlap) or the result overlaps the reference's head
            by less than ``min_overlap``; the message names both volumes.
    """
    names = f"{_name(moving)} onto {_name(fixed)}"
    for volume in (fixed, moving):
        if not torch.isfinite(volume).all() or float(volume.max() - volume.min()) <= 0:
            raise RegistrationError(_name(volume), f"registration of {names}: the image is empty or constant")
    settings = dict(stages=tuple(stages), resolutions=resolutions, iterations=iterations, samples=samples,
                    bspline_spacing=bspline_spacing, seed=seed, min_overlap=min_overlap)
    mask = None if fixed_mask is None else torch.as_tensor(fixed_mask).reshape(fixed.shape[1:]) > 0
    result = in_fresh_process(_register, fixed, moving, mask, list(follow), settings)
    if isinstance(result, tuple):  # (path, problem): exceptions with two arguments do not unpickle
        raise RegistrationError(*result)
    return result


def _register(fixed, moving, mask, follow, settings):
    itk = import_itk()
    names = f"{_name(moving)} onto {_name(fixed)}"
    params = _parameter_object(settings["stages"], settings["resolutions"], settings["iterations"],
                               settings["samples"], settings["bspline_spacing"], settings["seed"])
    kwargs = {}
    if mask is not None:
        kwargs["fixed_mask"] = to_itk(mask[None].to(torch.uint8), affine=fixed.affine, pixel="uint8")
    try:
        moved_image, result = itk.elastix_registration_method(
            to_itk(fixed), to_itk(moving), parameter_object=params, log_to_console=False, **kwargs
        )
    except RuntimeError as err:
        problem = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return _name(moving), f"registration of {names} failed: {problem}"
    moved = from_itk(moved_image, like=fixed)
    overlap = _dice(head_mask(fixed[0].numpy()), head_mask(moved[0].numpy()))
    if overlap < settings["min_overlap"]:
        return (_name(moving), f"registration of {names} is implausible: the moved head overlaps the reference's "
                f"with Dice {overlap:.2f} < {settings['min_overlap']} (is it the same body part?)")
    maps = _maps(result)
    warped = [_warp(volume, maps, order) for volume, order in follow]
    return Registration(moved=moved, parameters=maps, overlap=overlap, warped=warped)


def warp(volume: MetaTensor, parameters: list[dict], order: int = 3) -> MetaTensor:
    """Apply a :func:`register` transform to another volume on the moving grid (a mask with ``order=0``), in a
    fresh process as :func:`register` (pass ``follow=`` to :func:`register` to save the process start)."""
    return in_fresh_process(_warp, volume, parameters, order)


def _warp(volume: MetaTensor, parameters: list[dict], order: int) -> MetaTensor:
    itk = import_itk()
    params = _parameter_object_of(parameters, FinalBSplineInterpolationOrder=int(order))
    out = from_itk(itk.transformix_filter(to_itk(volume), params, log_to_console=False), like=volume)
    return out.round() if order == 0 else out


def displacement_field(parameters, fixed: MetaTensor) -> np.ndarray:
    """The transform's displacement at each fixed voxel, (3, X, Y, Z) in mm in ITK's LPS world frame: fixed
    point ``p`` maps to ``p + d(p)`` in the moving image. (ITK's (Z, Y, X, 3) array order reversed.)"""
    itk = import_itk()

    params = _parameter_object_of(parameters)
    with tempfile.TemporaryDirectory() as scratch:  # transformix writes deformationField.nii into its folder
        deformation = itk.transformix_deformation_field(
            to_itk(fixed), params, log_to_console=False, output_directory=scratch
        )
        arr = itk.array_from_image(deformation)
    return np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0)))


class RegisterToReferenced(MapTransform):
    """Register ``keys`` onto ``ref_key`` (e.g. the low-field scan onto the high-field one of the same person):
    each key is replaced by its moved volume on the reference grid and its transform kept under
    ``"{key}_transform"``; keys in ``follow_keys`` (masks: nearest neighbour) are moved with the first key's.

    Args:
        keys: the moving volumes.
        ref_key: the fixed volume.
        mask_key: a mask of the reference to restrict the metric to (e.g. its brain mask).
        follow_keys: volumes on the first moving key's grid to move with its transform (nearest neighbour).
        kwargs: :func:`register` settings.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "label",
        mask_key: str | None = None,
        follow_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
        **kwargs,
    ):
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.mask_key, self.kwargs = ref_key, mask_key, kwargs
        self.follow_keys = [follow_keys] if isinstance(follow_keys, str) else list(follow_keys)

    def __call__(self, data):
        d = dict(data)
        follow = [k for k in self.follow_keys if k in d]
        for i, key in enumerate(self.key_iterator(d)):
            mask = d[self.mask_key] if self.mask_key is not None else None
            moved_with = [(d[k], 0) for k in follow] if i == 0 else []
            result = register(d[self.ref_key], d[key], fixed_mask=mask, follow=moved_with, **self.kwargs)
            d[key], d[f"{key}_transform"] = result.moved, result.parameters
            d.update(zip(follow if i == 0 else [], result.warped))
        return d
