"""The whole inference command a user runs, timed: ``python -m monai.bundle run`` on one LR NIfTI file, as a
subprocess, for the benchmark's ``--command_time`` column (issue 18: what a user waits for is start-up, loading,
sampling and writing, not only the network).

    python -m monai.bundle run --config_file <bundle>/configs/inference.json --bundle_root <bundle> \
        --dataset_dir <folder with the LR file> --output_dir <folder> --scale_factor [1, 2, 2] ...

The LR file is the benchmark's own degraded volume, on a grid whose affine is the HR affine with each axis's
spacing times the scale factor and its origin moved to the centre of the first block of HR voxels (the block
average's geometry, methods.md §0). The subprocess inherits the environment (``LD_PRELOAD`` jemalloc included)
with ``OMP_NUM_THREADS`` set to the benchmark's thread count. Its time and peak memory (maximum resident set) are
measured by a small launcher interpreter that spawns it and waits for it with ``os.wait4``: Linux gives a command started
straight from the benchmark the benchmark's own resident set as a floor of its ``ru_maxrss`` (exec records the
high-water mark of the forked address space it replaces), and ``getrusage(RUSAGE_CHILDREN)`` is a maximum over every
child the benchmark ever ran.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from common.data.io import nifti_stem

__all__ = [
    "BENCH_ONLY_KEYS",
    "bundle_configs",
    "cli_value",
    "inference_command",
    "lr_affine",
    "write_lr_volume",
    "CommandResult",
    "run_command",
    "time_inference_command",
]


REPO = Path(__file__).resolve().parents[2]

# spec keys of the benchmark itself, not config ids: ``config`` adds config files, ``label`` names a row
BENCH_ONLY_KEYS = ("config", "label")


def bundle_configs(name: str, overrides: dict, bundles_dir: Path = REPO / "bundles") -> tuple[Path, list[Path], dict]:
    """The bundle folder, its config files (``configs/inference.json``, then the ``config=`` extras: paths relative
    to the bundle folder, ``;``-separated) and the overrides that are config ids (bench-only keys removed).

    Args:
        name: a bundle name under ``bundles_dir``, or a bundle folder.
        overrides: the ``key=value`` pairs of a benchmark spec.
        bundles_dir: where bundle names are looked up.

    Raises:
        SystemExit: a config file is missing.
    """
    root = Path(name) if Path(name).is_dir() else Path(bundles_dir) / name
    configs = [root / "configs" / "inference.json"]
    configs += [root / c for c in str(overrides.get("config", "")).split(";") if c]
    for config in configs:
        if not config.is_file():
            raise SystemExit(f"error: {config}: no such bundle config")
    return root, configs, {k: v for k, v in overrides.items() if k not in BENCH_ONLY_KEYS}


def cli_value(value) -> str:
    """``value`` as ``monai.bundle run`` reads it back unchanged from its command line: a Python literal.

    MONAI's CLI parses values with python-fire, which evaluates Python literals and keeps other words as strings:
    JSON's ``true``/``false``/``null`` would come back as the strings "true"/"false"/"null" (truthy), and an
    unquoted string with a comma as a tuple. ``repr`` of a str, number, bool, None, list or dict of these is exact.
    """
    return repr(value)


def inference_command(
    name: str, overrides: dict, dataset_dir: str | Path, output_dir: str | Path, bundles_dir: Path = REPO / "bundles"
) -> list[str]:
    """The argv of the bundle's inference command on the NIfTI files of ``dataset_dir`` (the interpreter running
    this), with the spec's config-id overrides as ``--key value`` and its ``config=`` files in ``--config_file``."""
    root, configs, ids = bundle_configs(name, overrides, bundles_dir)
    config_file = str(configs[0]) if len(configs) == 1 else cli_value([str(c) for c in configs])
    argv = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--bundle_root", str(root),
            "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir)]
    for key, value in ids.items():
        argv += [f"--{key}", cli_value(value)]
    return argv


def lr_affine(hr_affine: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """The affine of the block-averaged grid: each voxel axis ``scale`` times longer, the origin at the centre of the
    first block of HR voxels (HR voxel ``(f - 1) / 2`` on each axis)."""
    hr_affine = np.asarray(hr_affine, dtype=np.float64)
    f = np.asarray(scale, dtype=np.float64)
    out = hr_affine.copy()
    out[:3, :3] = hr_affine[:3, :3] * f
    out[:3, 3] = hr_affine[:3, 3] + hr_affine[:3, :3] @ ((f - 1) / 2)
    return out


def write_lr_volume(lr: np.ndarray, hr_affine: np.ndarray, scale: Sequence[int], path: str | Path) -> Path:
    """Write the LR volume ``lr`` (x, y, z; intensities as simulated, not rescaled) as float32 NIfTI on
    :func:`lr_affine` of ``hr_affine``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(lr, dtype=np.float32), lr_affine(hr_affine, scale)), str(path))
    return path


@dataclass
class CommandResult:
    """One finished command: ``seconds`` of wall time from start to exit, ``peak_rss_mb`` its own maximum resident
    set (MiB), its ``returncode`` and the ``log`` (stdout then stderr)."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    log: str


# argv: the result file, then the command. Spawned from this small interpreter, the command's ru_maxrss starts from
# the launcher's few MiB, not from the benchmark's resident set; its time excludes the launcher's start.
_LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    f.write(f"{seconds} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_command(argv: Sequence[str], env: dict | None = None, cwd: str | Path | None = None) -> CommandResult:
    """Run ``argv`` to its end and measure its wall time and its own peak resident set (Linux ``ru_maxrss``, KiB,
    from ``os.wait4`` in a launcher: see the module's docstring). Output goes to a temporary file, not a pipe, so a
    chatty command (progress bars) cannot block on a full pipe."""
    with tempfile.TemporaryDirectory(prefix="command_") as tmp:
        result, log = Path(tmp, "result"), Path(tmp, "log")
        with log.open("w") as out:
            launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, str(result), *argv], stdout=out,
                                      stderr=subprocess.STDOUT, env=env, cwd=cwd)
        text = log.read_text(errors="replace")
        if not result.is_file():  # the launcher itself failed (e.g. no such program): its traceback is the log
            return CommandResult(math.nan, math.nan, launcher.returncode or 1, text)
        seconds, maxrss, code = result.read_text().split()
    return CommandResult(float(seconds), int(maxrss) / 1024, int(code), text)


def time_inference_command(
    name: str,
    overrides: dict,
    lr_path: str | Path,
    output_dir: str | Path,
    threads: int,
    bundles_dir: Path = REPO / "bundles",
    repeats: int = 1,
) -> dict:
    """Run the bundle's inference command on the one LR file ``lr_path`` (alone in its folder) ``repeats`` times
    and check that each run wrote ``<output_dir>/<stem>_sr.nii.gz``.

    Args:
        name: bundle name or folder.
        overrides: the spec's ``key=value`` pairs (bench-only keys are handled, not passed).
        lr_path: the LR NIfTI file; its folder is the command's ``--dataset_dir`` and must hold nothing else.
        output_dir: the command's ``--output_dir``.
        threads: ``OMP_NUM_THREADS`` of the command (the benchmark's torch threads).
        bundles_dir: where bundle names are looked up.
        repeats: runs, one after the other (a single run on these shared 2-core machines varies by 1-4 s in
            20 s: the median of several is the figure to quote).

    Returns:
        ``command_s`` (median wall seconds), ``command_s_min`` and ``command_s_max`` (over the runs; when
        ``repeats`` > 1), ``command_rss_mb`` (the largest peak resident set of a run, MiB) and ``command_shape``
        (the written SR volume's shape, e.g. "16x24x32").

    Raises:
        RuntimeError: the command failed or wrote no SR file (with the end of its log).
    """
    lr_path = Path(lr_path)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # ``common`` is imported from the repository, whatever folder the benchmark was started in
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    argv = inference_command(name, overrides, lr_path.parent, output_dir, bundles_dir)
    sr_path = Path(output_dir) / f"{nifti_stem(lr_path)}_sr.nii.gz"
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    results = []
    for _ in range(int(repeats)):
        sr_path.unlink(missing_ok=True)  # a kept output of an earlier run must not pass for this one's
        result = run_command(argv, env=env, cwd=REPO)
        if result.returncode != 0 or not sr_path.is_file():
            raise RuntimeError(f"{' '.join(argv)}\nexit {result.returncode}, wrote {sr_path}: {sr_path.is_file()}\n"
                               f"{result.log[-3000:]}")
        results.append(result)
    shape = "x".join(str(s) for s in nib.load(str(sr_path)).shape[:3])
    seconds = [r.seconds for r in results]
    timing = {"command_s": statistics.median(seconds), "command_rss_mb": max(r.peak_rss_mb for r in results),
              "command_shape": shape}
    if len(results) > 1:
        timing.update(command_s_min=min(seconds), command_s_max=max(seconds))
    return timing
