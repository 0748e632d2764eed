"""Loading and saving transforms: NIfTI volumes as RAS MetaTensors (path, affine, source orientation in the
meta), SR predictions written on the HR grid in the input's orientation and units, and the split of a
(mean, standard deviation) prediction into two outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.data.io import Volume, check_size, check_values, hr_affine, load_volume, nifti_stem, save_volume
from common.transforms.intensity import invert_normalization

__all__ = ["volume_to_metatensor", "LoadVolumed", "SRResult", "SaveSRd", "SplitMeanStdd"]

logger = logging.getLogger("common")


def volume_to_metatensor(vol: Volume) -> MetaTensor:
    """A channel-first (1, X, Y, Z) MetaTensor carrying the volume's RAS affine, path and orientation."""
    meta = {
        "affine": torch.as_tensor(vol.affine, dtype=torch.float64),
        "filename_or_obj": vol.path,
        "source_ornt": torch.as_tensor(vol.source_ornt),
        "space": "RAS",
    }
    return MetaTensor(torch.from_numpy(vol.data)[None], meta=meta)


class LoadVolumed(MapTransform):
    """Load NIfTI paths with :func:`common.data.load_volume` (RAS, float32, checked) into MetaTensors.

    A :class:`common.data.Volume` already in memory (e.g. built from a DICOM series by the Deploy application)
    goes through the same size and value checks, so both paths accept and refuse the same volumes.

    Args:
        keys: keys holding file paths or :class:`common.data.Volume` objects.
        min_shape: smallest volume the method accepts; smaller inputs stop with an error naming the file.
        scale_factor: the method's upsampling factors: a volume whose output would not fit in the memory
            available stops with an error before its voxels are read.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_shape: Sequence[int] = (1, 1, 1),
        allow_missing_keys=False,
        scale_factor: Sequence[float] = (1, 1, 1),
    ):
        super().__init__(keys, allow_missing_keys)
        self.min_shape, self.scale_factor = tuple(min_shape), tuple(scale_factor)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            vol = d[key]
            if isinstance(vol, Volume):
                check_size(vol.path, vol.data.shape, self.min_shape, self.scale_factor)
                check_values(vol.path, vol.data)
            else:
                vol = load_volume(vol, self.min_shape, self.scale_factor)
            d[key] = volume_to_metatensor(vol)
        return d


@dataclass
class SRResult:
    """One output of :class:`SaveSRd`: a RAS float32 array on the HR grid and where and how it is written."""

    key: str  # the prediction key, e.g. "pred" or "pred_std"
    path: Path  # <output_dir>/<input stem><suffix>.nii.gz
    data: np.ndarray  # (X, Y, Z) RAS, in the input's intensity units
    affine: np.ndarray  # the HR grid's RAS voxel-to-world matrix
    source_ornt: np.ndarray  # the input's orientation, in which the file is written
    protect: str  # the input file, never overwritten

    def save(self) -> Path:
        """Write it with :func:`common.data.save_volume` (atomic, in the input's orientation)."""
        return save_volume(self.path, self.data, self.affine, self.source_ornt, protect=[self.protect])


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

    def results(self, data: Mapping[Hashable, Any]) -> list[SRResult]:
        """What :meth:`__call__` writes, without writing it (the Deploy application's writer operator saves
        these), one :class:`SRResult` per prediction key present."""
        ref = data[self.ref_key]
        affine = hr_affine(np.asarray(ref.affine, dtype=np.float64), self.scale_factor)
        out = []
        for key in self.key_iterator(dict(data)):
            pred = data[key]
            arr = (pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)).detach().float()
            arr = arr.cpu().numpy()[0]
            if self.denormalize and "norm_lo" in ref.meta:
                lo, hi = float(ref.meta["norm_lo"]), float(ref.meta["norm_hi"])
                arr = arr * (hi - lo) if key in self.std_keys else invert_normalization(arr, lo, hi)
            out.append(SRResult(key, self.output_path(ref, key), arr, affine,
                                np.asarray(ref.meta["source_ornt"]), str(ref.meta["filename_or_obj"])))
        return out

    def __call__(self, data):
        d = dict(data)
        for result in self.results(d):
            result.save()
            logger.info("wrote %s", result.path)
            d[f"{result.key}_path"] = str(result.path)
        return d


class SplitMeanStdd(MapTransform):
    """Split a 2-channel (mean, standard deviation) prediction into ``key`` (mean) and ``<key>_std``.

    One-channel predictions pass through unchanged, so one postprocessing chain serves K = 1 and K > 1.

    Args:
        keys: prediction keys, channel-first (C, *spatial).
        std_suffix: suffix of the key that receives the standard deviation.
    """

    def __init__(self, keys: KeysCollection = "pred", std_suffix: str = "_std") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.std_suffix = std_suffix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].shape[0] == 2:
                d[f"{key}{self.std_suffix}"], d[key] = d[key][1:2], d[key][0:1]
        return d
