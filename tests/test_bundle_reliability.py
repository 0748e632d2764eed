"""docs/bundle_contract.md's reliability contract, walked for every bundle through MONAI's CLI: bad input (the
whole run refused, or a folder processed in part with one error line per bad file), trusted weights,
determinism per seed, a training run killed with SIGKILL that resumes to the same weights, damaged checkpoints,
and an inference killed mid-volume. The file-level cases are in tests/input_cases.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_cli import (
    BUNDLES, IDS, LEARNED, LEARNED_IDS, bundle_cli, fov_corners, infer, ok, overrides, sr_outputs, train_args,
)
from input_cases import BAD, GOOD, write_duplicate_stems

# the diffusion bundles draw noise: another seed must give another sample
STOCHASTIC = {"brain_mri_ddpm3d_super_resolution", "brain_mri_edm25d_super_resolution",
              "brain_mri_edm3d_super_resolution", "brain_mri_score_sde_super_resolution"}
CLI_GOOD = ["lpi", "oblique", "anisotropic", "trailing_singleton", "int64"]


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def base_crop(mri_dir) -> np.ndarray:
    """A 16 x 32 x 32 crop through the brain of a real scan (RAS order, float32)."""
    img = nib.load(str(mri_dir / "dev03_mr_gd_skullstripped_ce_t1.nii.gz"))
    return np.asarray(img.dataobj, dtype=np.float32)[80:96, 78:110, 54:86]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, base_crop) -> tuple[Path, list[Path], dict[Path, str]]:
    """Every good kind of CLI_GOOD, every bad kind of input_cases.BAD, two inputs with one stem, a text file."""
    folder = tmp_path_factory.mktemp("mixed")
    good = [GOOD[name](folder, base_crop) for name in CLI_GOOD]
    bad = {writer(folder, base_crop): problem for writer, problem in BAD.values()}
    for path in write_duplicate_stems(folder, base_crop):
        bad[path] = "same stem"
    (folder / "README.txt").write_text("not an image")
    return folder, good, bad


RUN_LEVEL = [("missing_folder", "no such folder"), ("empty_folder", "no NIfTI"),
             ("output_is_input", "is the input folder"), ("unwritable_output", "cannot write")]
# every case on one bundle; on the others the one that proves their configs pass the output folder to the check
RUN_LEVEL_CASES = [(b, case, expect) for b in BUNDLES for case, expect in RUN_LEVEL
                   if b.name == "brain_mri_interpolation_super_resolution" or case == "output_is_input"]


@pytest.mark.parametrize("bundle, case, expect", RUN_LEVEL_CASES, ids=[f"{b.name}-{c}" for b, c, _ in RUN_LEVEL_CASES])
def test_run_level_refusals(bundle, case, expect, tmp_path, base_crop):
    """What concerns the whole run stops it before any volume is read: one error line, exit 1, nothing written."""
    folder = tmp_path / "in"
    out_dir = tmp_path / "out"
    if case != "missing_folder":
        folder.mkdir()
    if case in ("output_is_input", "unwritable_output"):
        nib.save(nib.Nifti1Image(base_crop, np.eye(4)), str(folder / "a.nii.gz"))
    if case == "output_is_input":
        out_dir = folder
    elif case == "unwritable_output":
        (tmp_path / "file").write_text("a file, not a folder")
        out_dir = tmp_path / "file" / "out"
    proc = infer(bundle, folder, out_dir)
    errors = _error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
    named = out_dir if case in ("output_is_input", "unwritable_output") else folder
    assert errors[0].startswith(f"error: {named}: ") and "Traceback" not in proc.stderr
    if case == "output_is_input":
        assert sorted(p.name for p in folder.iterdir()) == ["a.nii.gz"]


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_folder_with_bad_files(bundle, mixed_folder, tmp_path):
    """Good volumes are written with their geometry, each bad one gets one error line, the run exits 1."""
    folder, good, bad = mixed_folder
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    out_dir = tmp_path / "out"
    proc = infer(bundle, folder, out_dir)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = _error_lines(proc)
    assert len(errors) == len(bad), "\n".join(errors)
    for path, problem in bad.items():
        mine = [e for e in errors if e.startswith(f"error: {path}: ")]
        assert len(mine) == 1 and problem in mine[0], (path, mine)
    assert f"failed: {len(bad)} of {len(bad) + len(good)} inputs" in proc.stderr
    written = sorted(p.name for p in out_dir.iterdir())
    # nothing partial, nothing hidden
    assert written == sorted(name for p in good for name in sr_outputs(bundle, p.name.split(".")[0]))
    for path in good:
        src, out = nib.load(str(path)), nib.load(str(out_dir / f"{path.name.split('.')[0]}_sr.nii.gz"))
        src_shape = src.shape[:3]
        assert out.get_data_dtype() == np.float32 and len(out.shape) == 3
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine), path.name
        assert np.prod(out.shape) == 4 * np.prod(src_shape), path.name  # x2 on two axes
        np.testing.assert_allclose(np.sort(fov_corners(out.affine, out.shape), 0),
                                   np.sort(fov_corners(src.affine, src_shape), 0), atol=1e-4, err_msg=path.name)
        assert np.isfinite(np.asarray(out.dataobj)).all()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # inputs untouched


def test_fail_fast_stops_at_the_first_bad_file(mixed_folder, tmp_path):
    bundle = next(b for b in BUNDLES if b.name == "brain_mri_interpolation_super_resolution")
    folder, good, bad = mixed_folder
    proc = infer(bundle, folder, tmp_path / "out", "--fail_fast", "true")
    errors = _error_lines(proc)
    first_bad = min(bad, key=lambda p: p.name)
    assert proc.returncode == 1 and errors == [e for e in errors if e.startswith(f"error: {first_bad}: ")]
    assert len(errors) == 1, proc.stderr[-2000:]


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_same_seed_same_output(bundle, base_crop, tmp_path):
    """Bit-identical outputs for one seed; another sample for another seed where the method draws noise."""
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(base_crop, np.eye(4)), str(tmp_path / "in" / "crop.nii.gz"))
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        ok(infer(bundle, tmp_path / "in", tmp_path / name, "--seed", str(seed)))
        runs[name] = np.asarray(nib.load(str(tmp_path / name / "crop_sr.nii.gz")).dataobj)
    assert np.array_equal(runs["a"], runs["b"])
    assert np.array_equal(runs["a"], runs["c"]) == (bundle.name not in STOCHASTIC)


def _bundle_copy(bundle: Path, dest: Path) -> Path:
    copy = dest / bundle.name
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("output", "eval", "runs", "__pycache__"))
    return copy


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if (b / "models" / "model.pt").is_file()],
                         ids=[b.name for b in BUNDLES if (b / "models" / "model.pt").is_file()])
def test_changed_or_damaged_weights_are_refused(bundle, small_volume, tmp_path):
    copy = _bundle_copy(bundle, tmp_path)
    for weights in sorted((copy / "models").glob("*.pt")):  # whichever file the default inference loads
        state = torch.load(weights, weights_only=True)
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key] + 1e-3  # a changed file that still loads
        torch.save(state, weights)
    proc = infer(copy, small_volume, tmp_path / "out")
    errors = _error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: {copy / 'models'}/") and ".pt: " in errors[0]
    assert "differs from" in errors[0] and "large_files.yml" in errors[0]
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((bundle / "models" / "model.pt").read_bytes()[:4096])
    proc = infer(bundle, small_volume, tmp_path / "out2", "--model_path", str(truncated))
    errors = _error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1 and "not a readable" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _train_cmd(bundle: Path, data: Path, ckpt: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/train.json"),
            *train_args(bundle, data, ckpt), "--epochs", str(epochs)]


@pytest.mark.parametrize("bundle", LEARNED, ids=LEARNED_IDS)
def test_training_killed_resumes_to_the_same_weights(bundle, small_training_set, tmp_path):
    """SIGKILL during epoch 2 of 3, resume: the final weights equal an uninterrupted run's, bit for bit (CPU)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    whole = tmp_path / "whole"
    done = subprocess.run(_train_cmd(bundle, small_training_set, whole, 3), capture_output=True, text=True, env=env)
    ok(done)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(bundle, small_training_set, killed, 3), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoint_epoch=1.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(float(np.random.default_rng().uniform(0.0, 0.3)))  # somewhere in the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_train_cmd(bundle, small_training_set, killed, 3), capture_output=True, text=True, env=env)
    ok(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(killed / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a damaged newest checkpoint is refused, naming it and the previous one; nothing is overwritten
    latest = max(killed.glob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    latest.write_bytes(latest.read_bytes()[:1000])
    final = (killed / "model.pt").read_bytes()
    proc = subprocess.run(_train_cmd(bundle, small_training_set, killed, 4), capture_output=True, text=True, env=env)
    errors = _error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1 and errors[0].startswith(f"error: {latest}: "), proc.stderr[-2000:]
    assert "not a readable" in errors[0] and "delete it to resume from the previous one" in errors[0]
    assert (killed / "model.pt").read_bytes() == final


@pytest.mark.parametrize("bundle", LEARNED, ids=LEARNED_IDS)
def test_training_and_evaluation_refuse_a_bad_file(bundle, small_training_set, tmp_path):
    """Training and evaluation are fail-fast (a mean or a training set without one file is not what was asked)."""
    folder = tmp_path / "data"
    shutil.copytree(small_training_set, folder)
    bad = folder / "zz_truncated.nii.gz"
    bad.write_bytes(next(folder.iterdir()).read_bytes()[:2000])
    proc = subprocess.run(_train_cmd(bundle, folder, tmp_path / "ckpt", 1), capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    errors = _error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1 and errors[0].startswith(f"error: {bad}: "), proc.stderr[-2000:]
    configs = json.dumps([str(bundle / "configs/train.json"), str(bundle / "configs/evaluate.json")])
    out = tmp_path / "eval"
    proc = bundle_cli("run", "--config_file", configs, "--bundle_root", str(bundle), "--dataset_dir", str(folder),
                      "--output_dir", str(out), *overrides(bundle))
    errors = _error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1 and errors[0].startswith(f"error: {bad}: "), proc.stderr[-2000:]
    assert not out.exists() or not list(out.glob("*.json"))


def test_inference_killed_mid_volume_leaves_no_output(small_volume, tmp_path):
    """SIGKILL while a volume is being super-resolved: no output file, and the next run is not confused."""
    bundle = next(b for b in BUNDLES if b.name == "brain_mri_score_sde_super_resolution")
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(small_volume), "--output_dir", str(out_dir),
           "--num_steps", "16"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the sampler's progress lines: the volume is being processed
        if "sampler step" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out_dir.exists() or not [p for p in out_dir.iterdir() if not p.name.startswith(".")]
    ok(infer(bundle, small_volume, out_dir))
    assert (out_dir / "crop_dev03_sr.nii.gz").is_file()
