"""Datalists of the bundles' commands: inference inputs, evaluation references, training/validation splits
(MONAI-style JSON, covariates), downscaled training copies, and the embedded sample (nilearn's MNI152 template).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Sequence

from common.data.covariates import read_covariates
from common.data.io import VolumeError, check_nifti_header, list_nifti, nifti_stem
from common.utils import is_unset

__all__ = [
    "EMBEDDED_SAMPLE",
    "embedded_sample_path",
    "inference_datalist",
    "evaluation_datalist",
    "build_datalist",
    "training_datalist",
    "nilearn_file",
    "with_downscaled_copies",
    "with_degradation_copies",
    "downscaled_split",
    "refuse_real_pairs",
    "real_pair_split",
]


# The MNI152 2009a template inside the nilearn wheel: a 1 mm average brain that any fresh install has.
EMBEDDED_SAMPLE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def nilearn_file(relative: str) -> Path:
    """Path of a data file shipped in the installed nilearn package (found without importing it)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise VolumeError("nilearn", f"package not installed: it carries {relative} (pip install nilearn)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise VolumeError(path, "missing from this nilearn install")
    return path


def embedded_sample_path() -> Path:
    """Path of the embedded sample volume shipped in the installed nilearn package (found without importing it)."""
    return nilearn_file(EMBEDDED_SAMPLE)


def inference_datalist(
    dataset_dir: str | None, min_shape: Sequence[int] = (1, 1, 1), output_dir: str | None = None
) -> list[dict]:
    """Items for the inference command: every NIfTI in ``dataset_dir`` as ``{"image": path}``.

    With no ``dataset_dir`` the embedded sample is given as the HR ``label``, to be degraded into the LR
    ``image`` by the bundle's preprocessing (and scored against it).

    What concerns the whole run is checked here, before any volume is read: the input folder exists and holds
    NIfTI files; the output folder is writable and is not the input folder (the next run would take the outputs
    as inputs). Inputs whose stems collide (``a.nii`` and ``a.nii.gz`` would both write ``a_sr.nii.gz``) carry an
    ``"error"``, so neither overwrites the other; each file's own checks run when it is loaded
    (:class:`common.data.BadInputSkippingDataset` reports a bad one and goes on).

    Args:
        dataset_dir: folder of LR NIfTI volumes; unset: the embedded sample.
        min_shape: kept for configs that pass it (each file's size is checked when it is loaded).
        output_dir: the run's output folder, checked when given.
    """
    if not is_unset(output_dir):
        _check_output_dir(output_dir, dataset_dir)
    if is_unset(dataset_dir):
        return [{"label": str(embedded_sample_path()), "embedded_sample": True}]
    files = list_nifti(dataset_dir)
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(nifti_stem(path), []).append(path)
    items = []
    for path in files:
        twins = [p.name for p in by_stem[nifti_stem(path)] if p != path]
        item = {"image": str(path)}
        if twins:
            item["error"] = (f"another input has the same stem ({', '.join(twins)}); both would write "
                             f"{nifti_stem(path)}_sr.nii.gz: rename one")
        items.append(item)
    return items


def _check_output_dir(output_dir: str | os.PathLike, dataset_dir: str | None) -> None:
    out = Path(output_dir)
    if not is_unset(dataset_dir) and out.resolve() == Path(dataset_dir).resolve():
        raise VolumeError(out, "the output folder is the input folder: the next run would read the outputs as "
                               "inputs; choose another --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise VolumeError(out, f"cannot write to the output folder ({err.strerror or err})") from err


def evaluation_datalist(dataset_dir: str | None) -> list[dict]:
    """Items for evaluation: every NIfTI in ``dataset_dir`` as an HR ``label`` (the embedded sample when None)."""
    if is_unset(dataset_dir):
        return [{"label": str(embedded_sample_path())}]
    files = list_nifti(dataset_dir)
    for path in files:
        check_nifti_header(path)
    return [{"label": str(path)} for path in files]


def build_datalist(
    folder: str | Path,
    key: str = "label",
    val_subjects: Sequence[str] | None = None,
    num_val: int = 1,
    covariates: str | Path | None = None,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """A MONAI-style datalist ``{"training": [...], "validation": [...]}`` from a folder of HR NIfTI.

    Args:
        folder: folder of NIfTI volumes (one subject each).
        key: the key holding each path ("label" for HR volumes that LR pairs are simulated from).
        val_subjects: file stems held out for validation; when None, ``num_val`` stems drawn with ``seed``.
        num_val: number of held-out subjects when ``val_subjects`` is None.
        covariates: optional CSV/JSON with a ``subject`` column; its other columns are added to the items.
        seed: seed for the validation draw.
    """
    files = list_nifti(folder)
    covars = read_covariates(covariates) if covariates else {}
    items = [{key: str(p), "subject": nifti_stem(p), **covars.get(nifti_stem(p), {})} for p in files]
    stems = [it["subject"] for it in items]
    if val_subjects is None:
        val_subjects = random.Random(seed).sample(stems, min(num_val, max(len(stems) - 1, 0)))
    unknown = set(val_subjects) - set(stems)
    if unknown:
        raise VolumeError(folder, f"validation subjects not found: {sorted(unknown)}")
    return {
        "training": [it for it in items if it["subject"] not in val_subjects],
        "validation": [it for it in items if it["subject"] in val_subjects],
    }


def training_datalist(
    dataset_dir: str, datalist: str | None = None, key: str = "label", num_val: int = 1, seed: int = 0
) -> dict[str, list[dict]]:
    """The training/validation split of the training command.

    With a ``datalist`` JSON (MONAI style: ``{"training": [...], "validation": [...]}``), its relative paths are
    taken from ``dataset_dir`` (from the working folder when it is unset, as the preparation chain writes them); items may give real LR/HR pairs (``image`` = LR, ``label`` = HR) and covariates.
    Without one, every NIfTI in ``dataset_dir`` is an HR ``label`` and ``num_val`` of them are held out.
    """
    if is_unset(datalist):
        return build_datalist(dataset_dir, key=key, num_val=num_val, seed=seed)
    path = Path(datalist)
    if not path.is_file():
        raise VolumeError(path, "datalist file not found")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VolumeError(path, f"not valid JSON ({err})") from err
    out = {}
    for split in ("training", "validation"):
        items = []
        for item in content.get(split, []):
            item = dict(item)
            for k in ("image", "label", "brain_mask"):
                if k in item and not Path(item[k]).is_absolute() and not is_unset(dataset_dir):
                    item[k] = str(Path(dataset_dir) / item[k])
                if k in item:
                    check_nifti_header(item[k])
            item.setdefault("subject", nifti_stem(item.get("label", item.get("image"))))
            items.append(item)
        out[split] = items
    if not out["training"]:
        raise VolumeError(path, "no 'training' items")
    return out


def with_downscaled_copies(split: dict[str, list[dict]], factors: Sequence[int] = ()) -> dict[str, list[dict]]:
    """``split`` with, per factor ``f``, a copy of every training item marked ``"downscale": f`` (validation
    untouched): :class:`common.transforms.BlockDownscaled` block-averages such an item's HR by ``f`` along every
    axis, a cleaner image at a coarser voxel (block averaging ``f³`` voxels divides white noise by ``f^1.5``).

    Args:
        split: ``{"training": [...], "validation": [...]}``.
        factors: integer factors > 1; empty returns ``split`` unchanged.
    """
    factors = [int(f) for f in factors]
    if any(f < 2 for f in factors):
        raise ValueError(f"downscale factors must be integers >= 2, got {factors}")
    copies = [
        {**item, "downscale": f, "subject": f"{item.get('subject', '')}_down{f}"}
        for f in factors for item in split["training"]
    ]
    return {**split, "training": list(split["training"]) + copies}


def with_degradation_copies(split: dict[str, list[dict]], names: Sequence[str] = ()) -> dict[str, list[dict]]:
    """``split`` with every training item once per degradation name, marked ``"degradation": name`` (validation
    untouched): :class:`common.transforms.SimulateLRd` simulates each copy's LR with its own degradation, so one
    model learns to invert several acquisitions (e.g. the seed's cubic spline and block averaging). Empty
    ``names`` returns ``split`` unchanged.

    Args:
        split: ``{"training": [...], "validation": [...]}``.
        names: names of :data:`common.transforms.DEGRADATIONS` (checked there, when the LR is simulated).
    """
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"degradation names must differ, got {names}")
    if not names:
        return split
    copies = [
        {**item, "degradation": name, "subject": f"{item.get('subject', '')}_{name}"}
        for name in names for item in split["training"]
    ]
    return {**split, "training": copies}


def downscaled_split(split: dict[str, list[dict]], factors: Sequence[int] | None = None) -> dict[str, list[dict]]:
    """``split`` with every item (training and validation) marked ``"downscale": factors``: its HR is block-averaged
    by ``factors`` before anything else (:class:`common.transforms.BlockDownscaled`). This is the data of a
    cascade's earlier stage, whose target is the next stage's input (x4 = x2 then x2: the first stage learns
    HR/4 -> HR/2). None or all-ones returns ``split`` unchanged.

    Args:
        split: ``{"training": [...], "validation": [...]}``.
        factors: integer block sizes per spatial axis, e.g. [1, 2, 2].
    """
    if factors is None or all(int(f) == 1 for f in factors):
        return split
    factors = [int(f) for f in factors]
    if any(f < 1 for f in factors):
        raise ValueError(f"downscale factors must be positive integers, got {factors}")
    return {name: [{**item, "downscale": factors} for item in items] for name, items in split.items()}


def refuse_real_pairs(split: dict[str, list[dict]], datalist: str | None = None) -> dict[str, list[dict]]:
    """``split`` unchanged when its training items are HR volumes alone; an error when they give real LR/HR pairs
    (an ``image`` key), for a training config whose data path simulates LR from HR and would otherwise ignore the
    user's LR scans without a word.

    Args:
        split: ``{"training": [...], "validation": [...]}``.
        datalist: the datalist file, named in the error.
    """
    if any("image" in item for item in split.get("training", [])):
        raise VolumeError(datalist or "datalist", "its items give real LR/HR pairs ('image' and 'label'), which this "
                          "training config does not train on yet: it simulates LR from each 'label'; give HR "
                          "volumes alone ('label')")
    return split


def real_pair_split(
    split: dict[str, list[dict]], datalist: str | None = None, num_val: int = 1, seed: int = 0
) -> dict[str, list[dict]]:
    """``split`` of real LR/HR pairs (``image`` = the LR scan registered onto the HR grid, ``label`` = the HR scan,
    e.g. :func:`common.transforms.prepare_pairs`' datalist) for a training config that learns from them.

    Every item must give both scans (an error names the first that does not). A datalist without a validation
    list (the preparation chain writes ``training`` alone) gets ``num_val`` of its pairs held out, drawn with
    ``seed``; hold out whole people, not scans, when a person has several pairs (give ``validation`` yourself).

    Args:
        split: ``{"training": [...], "validation": [...]}``.
        datalist: the datalist file, named in errors.
        num_val: pairs held out when ``split`` has no validation items.
        seed: seed of that draw.
    """
    name = datalist or "datalist"
    for part in ("training", "validation"):
        for item in split.get(part, []):
            if "image" not in item or "label" not in item:
                raise VolumeError(name, f"a {part} item is not a real pair ('image' = LR scan on the HR grid and "
                                  f"'label' = HR scan): {item}")
    if split.get("validation"):
        return split
    training = list(split["training"])
    if len(training) <= num_val:
        raise VolumeError(name, f"{len(training)} pair(s) and no 'validation' list: give a 'validation' list or "
                          f"more than {num_val} pairs to hold {num_val} out")
    held = set(random.Random(seed).sample(range(len(training)), num_val))
    return {
        "training": [it for i, it in enumerate(training) if i not in held],
        "validation": [it for i, it in enumerate(training) if i in held],
    }
