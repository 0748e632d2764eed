"""A bundle on a real low-resolution scan (no reference): input, cubic B-spline and SR in three planes.

    python -m common.evaluation.real_input --bundle brain_mri_edm25d_super_resolution \
        --input ../shared/data/mri_lowres/lr01_siemens_prismafit_3T_t1_2mm.nii.gz \
        --output bundles/brain_mri_edm25d_super_resolution/docs/real_lr01.png

Without a reference only data consistency can be measured: ``‖A(SR) − LR‖ / ‖LR‖`` with ``A`` the block average
the bundles assume (methods.md §0), on the [0, 1] scale the network sees, beside the same number for the B-spline
(which is not data-consistent either: it interpolates, it does not invert the average). The bundle runs through its
own inference config (:func:`common.evaluation.bench.predict`), with ``:key=value`` overrides as in the benchmark.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.data.io import load_volume, nifti_stem
from common.evaluation import figures, metrics
from common.evaluation.bench import load_bundle, parse_bundle_spec, predict
from common.transforms.degrade import BlockAverage
from common.transforms.intensity import PercentileNormalize
from common.transforms.upsample import GridUpsample

__all__ = ["real_input_figure", "main"]


def real_input_figure(
    spec: str, path: str | Path, output: str | Path, scale: Sequence[int] = (1, 2, 2), threads: int | None = None
) -> dict:
    """Super-resolve the LR volume at ``path`` with the bundle ``spec`` and write the three-plane figure ``output``
    (rows: input by nearest neighbour, cubic B-spline, SR). Returns the data consistencies and the seconds taken.

    Args:
        spec: bundle name or folder, with ``:key=value`` overrides (see :func:`common.evaluation.bench.run`).
        path: a real LR NIfTI volume.
        output: the PNG to write (atomically).
        scale: SR factor per RAS axis.
        threads: torch threads (torch's default when None).
    """
    if threads:
        torch.set_num_threads(threads)
    name, overrides = parse_bundle_spec(spec)
    overrides.setdefault("scale_factor", list(scale))
    parser = load_bundle(name, overrides)
    volume = load_volume(path)
    lr = torch.from_numpy(volume.data)[None]
    lr01 = torch.as_tensor(PercentileNormalize(clip=bool(parser.get("clip", True)))(lr))
    sr, seconds, _ = predict(parser, lr01)
    upsampled = {mode: GridUpsample(scale, mode)(lr01[None])[0] for mode in ("nearest", "bspline")}
    average = BlockAverage(scale)
    consistency = {
        key: metrics.data_consistency(vol[0], lr01[0], lambda v: average(torch.as_tensor(v)[None])[0])
        for key, vol in (("sr", sr), ("bspline", upsampled["bspline"]))
    }
    stem = nifti_stem(path)
    label = Path(name).name
    figures.three_view(
        {
            f"input {tuple(lr.shape[1:])} (nearest)": upsampled["nearest"][0].numpy(),
            f"cubic B-spline (DC {consistency['bspline']:.4f})": upsampled["bspline"][0].numpy(),
            f"SR (DC {consistency['sr']:.4f})": sr[0].numpy(),
        },
        output,
        spacing=[float(np.linalg.norm(volume.affine[:3, a])) / f for a, f in enumerate(scale)],  # the HR grid's
        title=f"{label} on {stem}, x{'x'.join(str(f) for f in scale)}; DC = ‖A(·) − LR‖/‖LR‖",
    )
    return {"bundle": spec, "input": stem, "data_consistency": consistency, "seconds": seconds, "figure": str(output)}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m common.evaluation.real_input", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="bundle name or folder, with :key=value overrides")
    ap.add_argument("--input", required=True, help="a real low-resolution NIfTI volume")
    ap.add_argument("--output", required=True, help="the PNG to write")
    ap.add_argument("--scale", nargs=3, type=int, default=[1, 2, 2], help="SR factor per RAS axis")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    result = real_input_figure(args.bundle, args.input, args.output, args.scale, args.threads)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
