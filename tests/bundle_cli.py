"""Running the bundles through MONAI's own CLI in tests: the bundles found, the command, its checks and the
tiny sizes of each bundle's configs/test_overrides.json. Shared by tests/test_bundles.py and
tests/test_bundle_reliability.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import REPO, SUBPROCESS_THREADS

from common.evaluation.command_timing import cli_value

SCHEMA = REPO.parent / "shared" / "spec" / "monai" / "meta_schema_20240725.json"
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
IDS = [b.name for b in BUNDLES]
LEARNED = [b for b in BUNDLES if (b / "configs" / "train.json").is_file()]
LEARNED_IDS = [b.name for b in LEARNED]


def default_weights(bundle: Path) -> Path:
    """The weights file the bundle's inference.json loads by default (its ``model_path``, e.g. a student's)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return Path(parser.get_parsed_content("model_path"))


def bundle_cli(*args: str, bundle: Path | None = None, timeout: int = 900, launcher: tuple = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=SUBPROCESS_THREADS)
    if bundle is not None:  # verify_net_in_out and ckpt_export need the bundle root importable (bundles.md)
        env["PYTHONPATH"] = os.pathsep.join([str(bundle), str(REPO), env.get("PYTHONPATH", "")])
    cmd = [*launcher, "-m", "monai.bundle", *args] if launcher else [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    # the error lines too: a launcher's summary can push a worker's own message out of the tail
    errors = [line for line in proc.stderr.splitlines()
              if any(k in line for k in ("Error", "error:", "terminate", "Abort", "Exception"))][:30]
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\nerror lines:\n" + "\n".join(errors)
    )


def overrides(bundle: Path, section: str = "inference") -> list[str]:
    """CLI overrides of the bundle's configs/test_overrides.json section ("inference" or "train")."""
    path = bundle / "configs" / "test_overrides.json"
    if not path.is_file():
        return []
    args = []
    for key, value in json.loads(path.read_text()).get(section, {}).items():
        args += [f"--{key}", cli_value(value)]
    return args


def sr_outputs(bundle: Path, stem: str) -> list[str]:
    """The files the inference command writes for input ``stem`` at the bundle's default ``num_samples``: the SR
    volume, plus the per-voxel standard deviation when the default averages several samples."""
    samples = json.loads((bundle / "configs" / "inference.json").read_text()).get("num_samples", 1)
    return [f"{stem}_sr.nii.gz"] + ([f"{stem}_sr_std.nii.gz"] if int(samples) > 1 else [])


def fov_corners(affine: np.ndarray, shape) -> np.ndarray:
    """World positions of the outer corners of the field of view (voxel edges, not centres)."""
    lo = affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    hi = affine @ np.array([s - 0.5 for s in shape] + [1.0])
    return np.stack([lo[:3], hi[:3]])


def infer(bundle: Path, dataset_dir, out_dir, *extra: str) -> subprocess.CompletedProcess:
    """The bundle's inference command at its test sizes (``dataset_dir`` None: the embedded sample)."""
    args = ["run", "--config_file", str(bundle / "configs/inference.json"), "--bundle_root", str(bundle),
            "--output_dir", str(out_dir), *overrides(bundle), *extra]
    if dataset_dir is not None:
        args += ["--dataset_dir", str(dataset_dir)]
    return bundle_cli(*args)


def train_args(bundle: Path, data: Path, ckpt: Path) -> list[str]:
    return ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--ckpt_dir", str(ckpt),
            "--final_model_path", str(ckpt / "model.pt"), *overrides(bundle, "train")]
