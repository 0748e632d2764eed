"""The 3T->7T thesis's preparation of real scan pairs (methods.md §4), over a datalist of raw pairs
(``image`` = the low-field / low-resolution scan, ``label`` = the high-resolution scan of the same person):

N4 (both scans, in the head) -> atlas brain extraction of ``label`` -> N4 again inside the brain (the thesis's
two-pass recipe) -> elastix registration of ``image`` onto ``label`` (the metric restricted to the brain) ->
N4 of the moved ``image`` inside the brain -> clipped min-max normalisation (1st/99th percentile in the brain)
-> crop to the brain with a margin (affine kept).

Each pair writes ``<stem>_image.nii.gz``, ``<stem>_label.nii.gz`` and ``<stem>_brain_mask.nii.gz`` atomically
(the label last, so a pair counts as done only when all three exist); a pair already done is skipped, so a
stopped run resumes. The datalist of prepared pairs and each step's seconds are written at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import MetaTensor
from monai.transforms import CropForegroundd

from common.data import VolumeError, atomic_path, nifti_stem, save_volume

from .bias_field import n4_bias_field
from .brain_extraction import atlas_tissue_priors, brain_mask_from_priors
from .intensity import percentiles
from .io import LoadVolumed
from .mask import head_mask
from .registration import RegistrationError, register

__all__ = ["prepare_pair", "prepare_pairs"]

logger = logging.getLogger("common")
OUTPUTS = ("image", "brain_mask", "label")  # written in this order: the label's file marks a finished pair
MIN_HEAD_ML = 300  # a brain-only image holds > 800 ml, a head > 2 l


def _normalised(volume: MetaTensor, brain: np.ndarray, lower: float, upper: float) -> MetaTensor:
    lo, hi = percentiles(volume[0].numpy()[brain], lower, upper)
    return ((volume - lo) / (hi - lo)).clamp(0, 1)


def _save(path: Path, volume: MetaTensor, protect: Sequence[str]) -> None:
    ornt = volume.meta.get("source_ornt")
    save_volume(path, volume[0].numpy(), volume.affine.numpy(), None if ornt is None else np.asarray(ornt), protect)


def prepare_pair(
    image: str | os.PathLike,
    label: str | os.PathLike,
    output_dir: str | os.PathLike,
    stages: Sequence[str] = ("affine",),
    n4: dict | None = None,
    brain: dict | None = None,
    registration: dict | None = None,
    percentile_range: Sequence[float] = (1.0, 99.0),
    margin: int = 8,
) -> dict:
    """Run the chain on one pair; returns its datalist entry with each step's seconds under ``seconds``.

    Args:
        image: the low-field / low-resolution scan (moved onto ``label``).
        label: the high-resolution scan (the reference grid).
        output_dir: where the three outputs go.
        stages: elastix stages of ``image`` onto ``label`` (add ``"bspline"`` for a deformable step).
        n4: :func:`common.transforms.n4_bias_field` settings (the thesis's by default).
        brain: :func:`common.transforms.atlas_tissue_priors` settings.
        registration: further :func:`common.transforms.register` settings.
        percentile_range: the clipped min-max normalisation's percentiles, taken in the brain.
        margin: voxels kept around the brain by the crop.

    Raises:
        RegistrationError: a scan that is not a head (foreground under ``MIN_HEAD_ML``), or a registration that
            failed or is implausible; names both files, and nothing is written.
    """
    n4, brain, registration = dict(n4 or {}), dict(brain or {}), dict(registration or {})
    out_dir, stem = Path(output_dir), nifti_stem(label)
    seconds: dict[str, float] = {}

    def timed(step, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[step] = seconds.get(step, 0.0) + round(time.perf_counter() - start, 2)
        return result

    d = timed("load", LoadVolumed(keys=("image", "label")), {"image": str(image), "label": str(label)})
    heads = {key: head_mask(d[key][0].numpy()) for key in ("image", "label")}
    for key, other in (("image", label), ("label", image)):
        ml = heads[key].sum() * abs(float(np.linalg.det(d[key].affine.numpy()[:3, :3]))) / 1000
        if ml < MIN_HEAD_ML:  # cheaper than N4 and an atlas registration that would fail after minutes
            raise RegistrationError(
                d[key].meta["filename_or_obj"],
                f"cannot be registered with {other}: its foreground is {ml:.0f} ml, not a head or brain "
                f"(at least {MIN_HEAD_ML} ml)",
            )
    # N4 fits in each scan's head mask (its default), computed once above
    hr = d["label"] / timed("n4", n4_bias_field, d["label"], mask=heads["label"], **n4)
    lr = d["image"] / timed("n4", n4_bias_field, d["image"], mask=heads["image"], **n4)
    priors = timed("brain_extraction", atlas_tissue_priors, hr, **brain)
    mask = brain_mask_from_priors(priors, head=head_mask(hr[0].numpy())).float()
    hr = hr / timed("n4_in_brain", n4_bias_field, hr, mask=mask, **n4)
    moved = timed("registration", register, hr, lr, stages=stages, fixed_mask=mask, **registration).moved
    moved = moved / timed("n4_in_brain", n4_bias_field, moved, mask=mask, **n4)
    inside = mask[0].numpy() > 0
    lower, upper = percentile_range
    start = time.perf_counter()
    pair = {
        "image": _normalised(moved, inside, lower, upper) * mask,
        "label": _normalised(hr, inside, lower, upper) * mask,
        "brain_mask": MetaTensor(mask.as_tensor().float(), meta=dict(hr.meta)),
    }
    pair = CropForegroundd(keys=list(OUTPUTS), source_key="brain_mask", margin=margin, allow_smaller=True)(pair)
    seconds["normalise_and_crop"] = round(time.perf_counter() - start, 2)
    entry = {key: str(out_dir / f"{stem}_{key}.nii.gz") for key in OUTPUTS}
    start = time.perf_counter()
    for key in OUTPUTS:
        _save(Path(entry[key]), pair[key], protect=(str(image), str(label)))
    seconds["write"] = round(time.perf_counter() - start, 2)
    entry["source_image"], entry["source_label"], entry["seconds"] = str(image), str(label), seconds
    return entry


def prepare_pairs(
    datalist: str | os.PathLike | Sequence[dict],
    output_dir: str | os.PathLike,
    output_datalist: str = "datalist_prepared.json",
    **kwargs,
) -> list[dict]:
    """:func:`prepare_pair` over a datalist of raw pairs (a JSON file with a ``training`` list, or a list of
    ``{"image", "label"}``); pairs already prepared in ``output_dir`` are skipped. Writes ``output_datalist``
    (``training``: the prepared pairs, ``seconds``: each pair's step times) in ``output_dir``.
    """
    if isinstance(datalist, (str, os.PathLike)):
        path = Path(datalist)
        try:
            entries = json.loads(path.read_text())["training"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise VolumeError(path, f"not a datalist with a 'training' list of image/label pairs ({err})") from err
    else:
        entries = list(datalist)
    out_dir = Path(output_dir)
    stems = [nifti_stem(e["label"]) for e in entries]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise VolumeError(out_dir, f"several pairs would write the same outputs (label stems {dup}); rename them")
    prepared = []
    for entry, stem in zip(entries, stems):
        done = {key: str(out_dir / f"{stem}_{key}.nii.gz") for key in OUTPUTS}
        if all(Path(p).is_file() for p in done.values()):
            logger.info("%s: already prepared, skipped", entry["label"])
            prepared.append({**done, "source_image": entry["image"], "source_label": entry["label"], "seconds": {}})
            continue
        result = prepare_pair(entry["image"], entry["label"], out_dir, **kwargs)
        logger.info("%s: prepared in %.0f s (%s)", entry["label"], sum(result["seconds"].values()),
                    ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()))
        prepared.append(result)
    training = [{k: e[k] for k in ("image", "label", "brain_mask")} for e in prepared]
    with atomic_path(out_dir / output_datalist) as tmp:
        tmp.write_text(json.dumps({"training": training, "seconds": {e["label"]: e["seconds"] for e in prepared}},
                                  indent=2))
    return prepared
