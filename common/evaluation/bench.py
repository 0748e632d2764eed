"""The benchmark command: run chosen bundles on HR volumes under a stated degradation and print one table.

    python -m common.evaluation.bench --bundles brain_mri_edm25d_super_resolution \
        "brain_mri_interpolation_super_resolution:mode=linear" --data ../shared/data/mri \
        --subjects dev03_mr_gd_skullstripped_ce_t1 --degradation block --scale 1 2 2 --slices 96 --per_subject

Each bundle runs through its own inference config (its ``network`` and ``inferer``), so the numbers are those of
what users run. A ``:key=value,key=value`` suffix overrides config ids. Quality comes from the one metric path
(:func:`common.evaluation.score_sr`): PSNR/SSIM on the HR's [0, 1] scale over non-empty slices and inside the head
mask, with the gain over the grid-aligned cubic B-spline of the same LR input (the stronger interpolant; Keys cubic
convolution is printed as a row of its own). Rows are means over the volumes; ``--per_subject`` adds one row per
volume above each mean. Time is the inferer call alone; memory is the
process's peak resident set during it (Linux VmHWM, reset before each volume); network calls are the calls of the
bundle's ``network`` module during that call. ``--edge`` splits the head-mask
gain into the mask's boundary band (voxels within ``edge_width`` of the outside: where a skull-stripped brain
meets its zero background) and the interior.

What a user waits for (issue 18), with one command (slow: every bundle's command runs ``--command_repeats``
times per volume)::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \\
        python -m common.evaluation.bench --bundles ... \\
        --data ../shared/data/mri --pad_to 256 256 256 --threads 2 --flops --peak --command_time --command_repeats 5

``--command_time`` also runs each bundle's whole inference command (``python -m monai.bundle run``: start-up,
loading, sampling, writing) on the same LR volume written as NIfTI, and reports its wall time (the median of
``--command_repeats`` runs, with their minimum and maximum) and its own peak memory
(:mod:`common.evaluation.command_timing`); ``--peak`` measures the best fp32 and bf16 matmul GFLOP/s of this CPU at
the benchmark's threads and reports each bundle's GFLOP/s as a share of the peak of the dtype it runs (bf16 when
its config says ``amp``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import SpatialPad
from torch.utils.flop_counter import FlopCounterMode

from common.data.io import list_nifti, load_volume, nifti_stem
from common.evaluation import figures, metrics
from common.evaluation.command_timing import bundle_configs, time_inference_command, write_lr_volume
from common.evaluation.scoring import BASELINES, REFERENCE, score_sr
from common.transforms import degrade
from common.transforms.intensity import PercentileNormalize, invert_normalization
from common.transforms.brain_extraction import atlas_tissue_priors, brain_mask_from_priors
from common.transforms.mask import head_mask, mask_depth

__all__ = [
    "DEGRADATIONS",
    "parse_bundle_spec",
    "load_bundle",
    "peak_rss_reset",
    "peak_rss_mb",
    "predict",
    "predict_with_calls",
    "matmul_peak_gflops",
    "run",
    "edge_gains",
    "format_table",
    "main",
]


DEGRADATIONS = degrade.DEGRADATIONS


REPO = Path(__file__).resolve().parents[2]


def parse_bundle_spec(spec: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, overrides); values are JSON when they parse, else strings."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for pair in filter(None, re.split(r",(?![^\[]*\])", rest)):
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def load_bundle(name: str, overrides: dict, bundles_dir: Path = REPO / "bundles") -> ConfigParser:
    """Parse a bundle's inference config with overrides (as ``monai.bundle run`` would) and run its initialize.

    The override ``config`` names extra config files of the bundle merged after ``inference.json`` (paths
    relative to the bundle folder, ``;``-separated), e.g. ``config=configs/regression.json``.
    """
    root, configs, overrides = bundle_configs(name, overrides, bundles_dir)
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser["bundle_root"] = str(root)
    for key, value in overrides.items():
        parser[key] = value
    parser.get_parsed_content("initialize")
    return parser


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def predict(parser: ConfigParser, lr01: torch.Tensor, count_flops: bool = False) -> tuple[torch.Tensor, float, float]:
    """The bundle's ``network`` and ``inferer`` on one LR volume (1, x, y, z) in [0, 1]: the SR volume (1, X, Y, Z),
    the seconds of the inferer call, and its FLOPs (one extra counted pass; NaN unless ``count_flops``)."""
    return predict_with_calls(parser, lr01, count_flops)[:3]


def predict_with_calls(
    parser: ConfigParser, lr01: torch.Tensor, count_flops: bool = False
) -> tuple[torch.Tensor, float, float, int]:
    """:func:`predict`, and the number of calls of the bundle's ``network`` module during the timed inferer call
    (a forward pre-hook: every denoiser evaluation, window or slice batch the inferer makes)."""
    network, inferer = parser.get_parsed_content("network"), parser.get_parsed_content("inferer")
    device = parser.get_parsed_content("device")
    network.eval()
    x = lr01[None].to(device)
    flops, calls = math.nan, [0]
    with torch.no_grad():
        if count_flops:
            try:
                with FlopCounterMode(display=False) as counter:
                    inferer(x, network)
                flops = float(counter.get_total_flops())
            except RuntimeError as err:  # e.g. DPS's autograd.grad inside the counter (torch cannot count it)
                print(f"warning: FLOPs not counted ({str(err).splitlines()[0]})", file=sys.stderr)
        hook = network.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
        try:
            t0 = time.perf_counter()
            pred = inferer(x, network)
            seconds = time.perf_counter() - t0
        finally:
            hook.remove()
    return torch.as_tensor(pred)[0].float().cpu(), seconds, flops, calls[0]


def matmul_peak_gflops(size: int = 2048, repeats: int = 3) -> dict[str, float]:
    """The best GFLOP/s of a ``size``² fp32 and bf16 matmul at torch's current thread count (``repeats`` timed
    calls after one warm-up, the fastest taken): the achievable peak that bundle GFLOP/s are compared with.

    Args:
        size: side of the square matrices (2048: 17 GFLOP per call, within a few % of the larger sizes' rate).
        repeats: timed calls per dtype.
    """
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(size, size).to(dtype) for _ in range(2))
        a @ b
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        peak[name] = 2 * size**3 / best / 1e9
    return peak


def _quality(summary: dict, reference: dict) -> dict:
    """The table's quality columns of one summary, with its gains over the ``reference`` summary."""
    return {
        "psnr": summary["psnr"], "ssim2d": summary["ssim2d"],
        "psnr_mask": summary["psnr_mask"], "ssim2d_mask": summary["ssim2d_mask"],
        "delta_psnr_mask": summary["psnr_mask"] - reference["psnr_mask"],
        "delta_ssim2d_mask": summary["ssim2d_mask"] - reference["ssim2d_mask"],
        **{k: summary[k] for k, _, _ in TISSUE_COLUMNS if summary.get(k) is not None},
    }


def _mean_row(name: str, per_volume: list[dict]) -> dict:
    """One row for ``per_volume`` (means; the largest peak memories); subject "mean" when there are several, a text
    field (shape, dtype) "various" when the volumes' differ."""
    row = {"bundle": name, "subject": "mean" if len(per_volume) > 1 else per_volume[0]["subject"],
           "volumes": len(per_volume)}
    for key in per_volume[0]:
        if key not in ("subject", "bundle"):
            values = [v[key] for v in per_volume]
            if isinstance(values[0], str):
                row[key] = values[0] if len(set(values)) == 1 else "various"
            else:
                row[key] = max(values) if key in ("peak_rss_mb", "command_rss_mb") else float(np.mean(values))
    return row


def _rows(name: str, per_volume: list[dict], per_subject: bool) -> list[dict]:
    """The mean row of ``per_volume``, preceded by the volumes' own rows when ``per_subject`` and there are several."""
    return (per_volume if per_subject and len(per_volume) > 1 else []) + [_mean_row(name, per_volume)]


def run(
    bundles: Sequence[str],
    files: Sequence[Path],
    degradation: str = "block",
    scale: Sequence[int] = (1, 2, 2),
    slices: int | None = None,
    count_flops: bool = False,
    pad_to: Sequence[int] | None = None,
    edge_width: float | None = None,
    per_subject: bool = False,
    brain_mask: str | None = None,
    figure: str | None = None,
    figure_subject: str | None = None,
    figure_box: Sequence[int] | None = None,
    command_time: bool = False,
    command_output: str | Path | None = None,
    peak: dict[str, float] | None = None,
    crop: Sequence[int] | None = None,
    command_repeats: int = 1,
) -> list[dict]:
    """Benchmark rows: first the interpolation baselines of :data:`common.evaluation.BASELINES` (scored on the same
    LR inputs as the bundles, no timings), then one row per bundle (means over the volumes), each preceded by one
    row per volume when ``per_subject``. Gains are over the cubic B-spline. ``pad_to`` zero-pads each HR volume,
    centred, to at least that shape (e.g. 256³ for speed and memory at a fixed size); ``edge_width`` (voxels) adds
    the gains in the head mask's boundary band and interior (:func:`edge_gains`); ``brain_mask="nonzero"`` takes
    each HR volume's non-zero voxels as its brain (skull-stripped references), ``"atlas"`` the atlas brain mask of
    the HR volume (:func:`common.transforms.atlas_tissue_priors`, about a minute each; whole, unpadded volumes), and
    either adds the tissue Dice columns. ``figure`` writes :func:`common.evaluation.figures.zoomed_crops` of the
    central sagittal slice of ``figure_subject`` (default: the first volume): HR, the cubic B-spline and each
    bundle (a ``label=...`` override names a bundle's row and column).

    Every bundle row has its ``network_calls`` and seconds per call. ``command_time`` also runs each bundle's
    inference command on each LR volume (:func:`common.evaluation.command_timing.time_inference_command`, with
    ``OMP_NUM_THREADS`` = torch's threads) ``command_repeats`` times for ``command_s`` (the median; with its
    ``command_s_min`` and ``command_s_max`` when repeated) and ``command_rss_mb``; its outputs are kept under
    ``command_output`` when given (a folder ``<position>_<label>`` per bundle, ``<subject>_sr.nii.gz`` in it).
    ``peak`` (:func:`matmul_peak_gflops`) adds ``peak_pct``: GFLOP/s (``count_flops``) as a % of the peak of the
    dtype the bundle runs (``peak_dtype``: bf16 when its config's ``amp`` is set, else fp32). ``crop`` keeps the
    central box of that RAS shape of each HR volume (after ``slices``; an axis shorter than the box is kept whole):
    a small region for samplers too slow for whole slabs (e.g. 1000 DDPM steps on CPU)."""
    if brain_mask == "atlas" and (slices or pad_to or crop):
        raise ValueError("brain_mask='atlas' registers the atlas onto whole volumes: drop slices, crop and pad_to")
    rows, baseline_rows = [], {mode: [] for mode in BASELINES}
    brains: dict[Path, np.ndarray] = {}  # one atlas registration per volume, shared by the bundles
    figure_subject = figure_subject or (nifti_stem(files[0]) if files else None)
    panels: dict[str, np.ndarray] = {}
    work = tempfile.TemporaryDirectory(prefix="bench_") if command_time else None
    lr_files: dict[Path, Path] = {}  # each LR volume is written once, for every bundle's command
    for b, spec in enumerate(bundles):
        name, overrides = parse_bundle_spec(spec)
        label = str(overrides.pop("label", spec))
        overrides.setdefault("scale_factor", list(scale))
        parser = load_bundle(name, overrides)
        dtype = "bf16" if parser.get_parsed_content("amp", default=False) else "fp32"  # bf16 autocast
        if work:  # the command's outputs: a folder per bundle, named by its position and label
            outputs = Path(command_output or Path(work.name, "sr"), f"{b}_" + re.sub(r"[^\w.=-]+", "_", label))
        per_volume = []
        for path in files:
            vol = load_volume(path)
            hr = torch.from_numpy(vol.data)[None]
            offset = np.zeros(3)  # of the first kept HR voxel, for the affine of the LR file
            if slices:
                start = max((hr.shape[1] - slices) // 2, 0)
                hr, offset[0] = hr[:, start : start + slices], start
            if crop:
                starts = [max((s - int(c)) // 2, 0) for s, c in zip(hr.shape[1:], crop)]
                hr = hr[(slice(None), *(slice(a, a + int(c)) for a, c in zip(starts, crop)))]
                offset += starts
            if pad_to:
                target = [max(int(p), s) for p, s in zip(pad_to, hr.shape[1:])]
                offset -= [(t - s) // 2 for t, s in zip(target, hr.shape[1:])]  # SpatialPad's centring
                hr = SpatialPad(target)(hr).as_tensor()
            lr = DEGRADATIONS[degradation](scale)(hr)
            # the bundle's own input scaling: 1st/99th percentiles, clipped unless its config says "clip": false
            lr01 = PercentileNormalize(clip=bool(parser.get("clip", True)))(lr)
            lo, hi = np.percentile(lr.numpy(), [1, 99])
            peak_rss_reset()
            pred, seconds, flops, calls = predict_with_calls(parser, lr01, count_flops)
            peak_rss = peak_rss_mb()
            sr = invert_normalization(pred.numpy(), float(lo), float(hi))
            subject = nifti_stem(path)
            brain = hr[0].numpy() > 0 if brain_mask == "nonzero" else None
            if brain_mask == "atlas":
                if path not in brains:
                    priors = atlas_tissue_priors(MetaTensor(hr.float(), affine=torch.as_tensor(vol.affine)))
                    brains[path] = brain_mask_from_priors(priors, head=head_mask(hr[0].numpy()))[0].numpy() > 0
                brain = brains[path]
            scored = score_sr(sr, hr, lr, scale, DEGRADATIONS[degradation](scale), subject=subject, brain_mask=brain)
            shape = "x".join(str(s) for s in sr.shape[-3:])
            per_volume.append(
                {
                    "bundle": label, "subject": subject, "shape": shape, **_quality(scored.sr, scored.reference),
                    "s_per_volume": seconds, "s_per_slice": seconds / sr.shape[1 if sr.ndim == 4 else 0],
                    "peak_rss_mb": peak_rss, "gflop_per_s": flops / seconds / 1e9,
                    "network_calls": calls, "s_per_call": seconds / calls if calls else math.nan,
                }
            )
            if peak:
                per_volume[-1].update(peak_dtype=dtype, peak_pct=100 * per_volume[-1]["gflop_per_s"] / peak[dtype])
            if work:
                if path not in lr_files:
                    affine = np.array(vol.affine, dtype=np.float64)
                    affine[:3, 3] += affine[:3, :3] @ offset
                    lr_files[path] = write_lr_volume(lr[0].numpy(), affine, scale,
                                                     Path(work.name, "lr", str(len(lr_files)), f"{subject}.nii.gz"))
                timing = time_inference_command(name, overrides, lr_files[path], outputs, torch.get_num_threads(),
                                                repeats=command_repeats)
                if timing.pop("command_shape") != shape:
                    raise RuntimeError(f"{label}: the command's SR shape differs from the benchmark's {shape}")
                per_volume[-1].update(timing)
            if edge_width:
                per_volume[-1].update(edge_gains(scored.volumes, scored.mask, edge_width))
            if figure and subject == figure_subject:
                if not panels:
                    panels = {"HR": scored.volumes["HR"], BASELINES[REFERENCE]: scored.volumes[REFERENCE]}
                panels[label] = scored.volumes["SR"]
            if b == 0:  # the baselines depend only on the LR input: score them once
                for mode in BASELINES:
                    baseline_rows[mode].append(
                        {"bundle": f"interpolation: {BASELINES[mode]}", "subject": subject, "shape": shape,
                         **_quality(scored.baselines[mode], scored.reference)}
                    )
        rows += _rows(label, per_volume, per_subject)
    if figure and panels:
        figures.zoomed_crops(panels, figure, box=figure_box, title=f"{figure_subject}, central sagittal slice")
    if work:
        work.cleanup()
    head = [r for mode in BASELINES if baseline_rows[mode]
            for r in _rows(f"interpolation: {BASELINES[mode]}", baseline_rows[mode], per_subject)]
    return head + rows


def edge_gains(volumes: dict, mask: np.ndarray, width: float) -> dict:
    """PSNR gains of ``volumes["SR"]`` over the reference baseline ``volumes["bspline"]`` (both against
    ``volumes["HR"]``, [0, 1] scale) in the band of ``mask`` within ``width`` voxels of its outside and in the rest
    of the mask."""
    depth = mask_depth(mask)
    out = {}
    for name, region in (("edge", mask & (depth <= width)), ("inner", depth > width)):
        if region.any():
            sr, ref = (metrics.psnr(volumes[k], volumes["HR"], mask=region) for k in ("SR", REFERENCE))
            out[f"delta_psnr_{name}"] = sr - ref
    return out


COLUMNS = [
    ("bundle", "bundle", "{}"), ("subject", "subject", "{}"), ("shape", "SR shape", "{}"),
    ("psnr", "PSNR", "{:.2f}"), ("ssim2d", "SSIM", "{:.4f}"),
    ("psnr_mask", "PSNR mask", "{:.2f}"), ("ssim2d_mask", "SSIM mask", "{:.4f}"),
    ("delta_psnr_mask", "Δ PSNR vs B-spline", "{:+.2f}"), ("delta_ssim2d_mask", "Δ SSIM vs B-spline", "{:+.4f}"),
    ("command_s", "s command", "{:.1f}"), ("command_s_min", "s command min", "{:.1f}"),
    ("command_s_max", "s command max", "{:.1f}"), ("s_per_volume", "s/volume", "{:.2f}"),
    ("network_calls", "network calls", "{:.0f}"), ("s_per_call", "s/call", "{:.4f}"),
    ("s_per_slice", "s/slice", "{:.4f}"),
    ("gflop_per_s", "GFLOP/s", "{:.1f}"), ("peak_dtype", "dtype", "{}"), ("peak_pct", "% of peak", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MiB", "{:.0f}"), ("command_rss_mb", "command peak RSS MiB", "{:.0f}"),
]
# shown only when a row has them (--command_time, --command_repeats, --peak; no baseline-only table has network
# calls)
OPTIONAL_COLUMNS = {"command_s", "command_s_min", "command_s_max", "network_calls", "s_per_call", "peak_dtype",
                    "peak_pct", "command_rss_mb"}


EDGE_COLUMNS = [("delta_psnr_edge", "Δ PSNR edge", "{:+.2f}"), ("delta_psnr_inner", "Δ PSNR interior", "{:+.2f}")]
TISSUE_COLUMNS = [("tissue_dice_csf", "Dice CSF", "{:.3f}"), ("tissue_dice_gm", "Dice GM", "{:.3f}"),
                  ("tissue_dice_wm", "Dice WM", "{:.3f}")]


def format_table(rows: list[dict]) -> str:
    """Markdown table of benchmark rows (the optional, edge/interior and tissue Dice columns when a row has them)."""
    optional = OPTIONAL_COLUMNS | {key for key, _, _ in EDGE_COLUMNS + TISSUE_COLUMNS}
    columns = [c for c in COLUMNS + EDGE_COLUMNS + TISSUE_COLUMNS
               if c[0] not in optional or any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.evaluation.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", nargs="+", required=True, help="bundle names (or folders), with :key=value overrides")
    ap.add_argument("--data", required=True, help="folder of HR NIfTI volumes")
    ap.add_argument("--subjects", nargs="*", help="file stems to use (default: all in --data)")
    ap.add_argument("--degradation", choices=sorted(DEGRADATIONS), default="block")
    ap.add_argument("--scale", nargs="+", type=int, default=[1, 2, 2], help="reduction factor per RAS axis")
    ap.add_argument("--slices", type=int, default=None, help="central sagittal slices to keep (default: all)")
    ap.add_argument("--crop", nargs=3, type=int, default=None,
                    help="keep the central box of this RAS shape of each HR volume (after --slices), e.g. 16 96 96")
    ap.add_argument("--pad_to", nargs=3, type=int, default=None,
                    help="zero-pad each HR volume (centred) to at least this RAS shape, e.g. 256 256 256")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--flops", action="store_true", help="count FLOPs (one extra pass) to report GFLOP/s")
    ap.add_argument("--edge", type=float, default=None, metavar="WIDTH",
                    help="also report the gain in the head mask's boundary band of this width (voxels) and inside it")
    ap.add_argument("--brain_mask", choices=["nonzero", "atlas"], default=None,
                    help="nonzero: each HR volume's non-zero voxels are its brain (skull-stripped references); atlas: "
                         "the atlas brain mask of each HR volume (about a minute each); adds the tissue Dice (CSF, "
                         "GM, WM) of SR and of each baseline against HR")
    ap.add_argument("--figure", default=None, help="write a PNG of zoomed crops (HR, B-spline, each bundle)")
    ap.add_argument("--figure_subject", default=None, help="the volume of --figure (default: the first)")
    ap.add_argument("--figure_box", nargs=3, type=int, default=None, metavar=("ROW", "COL", "SIZE"),
                    help="the crop in the sagittal plane's array (default: a centred square)")
    ap.add_argument("--per_subject", action="store_true", help="one row per volume above each bundle's mean row")
    ap.add_argument("--command_time", action="store_true",
                    help="also time each bundle's whole inference command (python -m monai.bundle run: start-up, "
                         "loading, sampling, writing) on the LR volume written as NIfTI, with its peak memory (slow)")
    ap.add_argument("--command_repeats", type=int, default=1,
                    help="runs of each command with --command_time: the median is reported, with min and max")
    ap.add_argument("--command_output", default=None,
                    help="keep the commands' outputs here (a folder per bundle; default: a removed temporary folder)")
    ap.add_argument("--peak", action="store_true",
                    help="measure this CPU's best fp32 and bf16 matmul GFLOP/s at --threads; with --flops, each "
                         "bundle's GFLOP/s as a %% of the peak of its dtype")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops() if args.peak else None
    files = list_nifti(args.data)
    if args.subjects:
        files = [f for f in files if nifti_stem(f) in set(args.subjects)]
        missing = set(args.subjects) - {nifti_stem(f) for f in files}
        if missing:
            raise SystemExit(f"error: {args.data}: subjects not found: {sorted(missing)}")
    rows = run(args.bundles, files, args.degradation, args.scale, args.slices, args.flops, args.pad_to, args.edge,
               args.per_subject, args.brain_mask, args.figure, args.figure_subject, args.figure_box,
               args.command_time, args.command_output, peak, args.crop, args.command_repeats)
    print(f"degradation: {args.degradation} x{args.scale}; slices: {args.slices or 'all'}; crop: {args.crop or 'no'}; "
          f"padded to: {args.pad_to or 'no'}; "
          f"volumes: {', '.join(nifti_stem(f) for f in files)}; torch threads: {torch.get_num_threads()}"
          + (f"; matmul peak GFLOP/s: fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f}" if peak else "")
          + (f"; allocator: {os.environ['LD_PRELOAD']}" if os.environ.get("LD_PRELOAD") else "")
          + (f" with MALLOC_CONF={os.environ['MALLOC_CONF']}" if os.environ.get("MALLOC_CONF") else ""))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
