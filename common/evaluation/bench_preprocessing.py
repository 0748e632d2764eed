"""Seconds per step of the ITK preparation chain (docs/preprocessing.md) on one scan: N4 with the thesis's
settings, atlas brain extraction, N4 inside the brain, registration of a thick-sliced copy onto the scan (rigid,
affine, affine + B-spline), normalisation and crop; prints one markdown table.

    python -m common.evaluation.bench_preprocessing \\
        --input ../shared/data/mri/dev06_myconnectome_siemens_skyra_3T_mprage.nii.gz --pad_to 256 256 256 --threads 2

Each elastix step includes the start of its own process (:func:`common.transforms.in_fresh_process`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
from monai.transforms import CropForegroundd, SpatialPad

from common.transforms import (
    LoadVolumed,
    ThickSlices,
    atlas_tissue_priors,
    brain_mask_from_priors,
    head_mask,
    n4_bias_field,
    percentiles,
    register,
    set_itk_threads,
)

__all__ = ["run", "main"]


def run(path: str, pad_to: Sequence[int] | None = None, slice_thickness: int = 4) -> list[tuple[str, float]]:
    """``(step, seconds)`` rows for one scan (zero-padded, centred, to at least ``pad_to``), plus the brain
    volume in ml as the last row."""
    rows = []

    def timed(step, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        rows.append((step, time.perf_counter() - start))
        return out

    x = LoadVolumed(keys="image")({"image": str(path)})["image"]
    if pad_to:
        x = SpatialPad([max(int(p), s) for p, s in zip(pad_to, x.shape[1:])])(x)
    y = x / timed("N4, thesis settings", n4_bias_field, x)
    priors = timed("atlas brain extraction (2 mm working grid)", atlas_tissue_priors, y)
    mask = brain_mask_from_priors(priors, head=head_mask(y[0].numpy()))
    y = y / timed("N4 inside the brain", n4_bias_field, y, mask=mask)
    moving = ThickSlices(axis=2, thickness=slice_thickness)(y)
    for stages in (("rigid",), ("affine",), ("affine", "bspline")):
        timed(f"registration {' + '.join(stages)} ({slice_thickness}-slice copy onto the scan)", register, y,
              moving, stages=stages, fixed_mask=mask)
    start = time.perf_counter()
    brain = mask[0].numpy() > 0
    lo, hi = percentiles(y[0].numpy()[brain])
    CropForegroundd(keys=["image", "mask"], source_key="mask", margin=8)(
        {"image": ((y - lo) / (hi - lo)).clamp(0, 1) * mask, "mask": mask}
    )
    rows.append(("normalisation in the brain + crop", time.perf_counter() - start))
    voxel_ml = abs(float(np.linalg.det(x.affine.numpy()[:3, :3]))) / 1000
    rows.append(("brain volume with CSF (ml)", float(brain.sum()) * voxel_ml))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.evaluation.bench_preprocessing",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="a T1 head scan (NIfTI)")
    ap.add_argument("--pad_to", nargs=3, type=int, default=None, help="zero-pad (centred) to at least this shape")
    ap.add_argument("--threads", type=int, default=None, help="ITK threads (default: ITK's)")
    args = ap.parse_args(argv)
    threads = set_itk_threads(args.threads)
    rows = run(args.input, args.pad_to)
    print(f"input: {args.input}; padded to: {args.pad_to or 'no'}; ITK threads: {threads}")
    print("| step | seconds |\n|---|---|")
    for step, value in rows:
        print(f"| {step} | {value:.1f} |")


if __name__ == "__main__":
    main()
