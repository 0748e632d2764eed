"""The bundle contract (../shared/spec/bundles.md), checked for every folder under bundles/ through MONAI's own CLI.

A new bundle is covered the day it lands: each check is parametrised over the bundles found. Learned bundles
(with configs/train.json) also get a one-short-epoch training run, evaluate.json on top of it, checkpoint export
and a two-process CPU run of multi_gpu_train.json; the overrides for those tiny runs come from the bundle's
``configs/test_overrides.json`` (small sizes only, never other behaviour).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import REPO

SCHEMA = REPO.parent / "shared" / "spec" / "monai" / "meta_schema_20240725.json"
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
IDS = [b.name for b in BUNDLES]
LEARNED = [b for b in BUNDLES if (b / "configs" / "train.json").is_file()]
LEARNED_IDS = [b.name for b in LEARNED]


def _bundle_cli(*args: str, bundle: Path | None = None, timeout: int = 900, launcher: tuple = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    if bundle is not None:  # verify_net_in_out and ckpt_export need the bundle root importable (bundles.md)
        env["PYTHONPATH"] = os.pathsep.join([str(bundle), str(REPO), env.get("PYTHONPATH", "")])
    cmd = [*launcher, "-m", "monai.bundle", *args] if launcher else [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    # the error lines too: a launcher's summary can push a worker's own message out of the tail
    errors = [line for line in proc.stderr.splitlines()
              if any(k in line for k in ("Error", "error:", "terminate", "Abort", "Exception"))][:30]
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\nerror lines:\n" + "\n".join(errors)
    )


def _overrides(bundle: Path, section: str = "inference") -> list[str]:
    """CLI overrides of the bundle's configs/test_overrides.json section ("inference" or "train")."""
    path = bundle / "configs" / "test_overrides.json"
    if not path.is_file():
        return []
    args = []
    for key, value in json.loads(path.read_text()).get(section, {}).items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


@pytest.fixture(scope="module")
def small_volume(tmp_path_factory, mri_dir) -> Path:
    """A crop of a real scan, stored in a non-RAS orientation (A, S, L axis order) with an origin offset."""
    img = nib.load(str(mri_dir / "dev03_mr_gd_skullstripped_ce_t1.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)[76:100, 70:118, 50:90]  # 24 x 48 x 40, through the brain
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    target = nib.orientations.axcodes2ornt(("A", "S", "L"))
    xform = nib.orientations.ornt_transform(ras, target)
    affine = np.diag([0.9, 0.9, 1.1, 1.0])
    affine[:3, 3] = [-10.0, 12.0, 30.0]
    out_affine = affine @ nib.orientations.inv_ornt_aff(xform, data.shape)
    folder = tmp_path_factory.mktemp("small_input")
    nib.save(nib.Nifti1Image(nib.orientations.apply_orientation(data, xform).astype(np.int16), out_affine),
             str(folder / "crop_dev03.nii.gz"))
    return folder


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_bundle_files(bundle):
    for rel in ["LICENSE", "configs/metadata.json", "configs/inference.json", "configs/logging.conf",
                "large_files.yml", "docs/README.md", "docs/data_license.txt"]:
        assert (bundle / rel).is_file(), f"{bundle.name}: missing {rel}"
    if (bundle / "configs" / "train.json").is_file():
        for rel in ["configs/evaluate.json", "configs/multi_gpu_train.json", "models/model.pt"]:
            assert (bundle / rel).is_file(), f"{bundle.name}: a learned bundle needs {rel}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_large_files_hashes(bundle):
    """Every weights file in models/ is listed in large_files.yml, and each listed file has the listed sha256."""
    entries = yaml.safe_load((bundle / "large_files.yml").read_text()).get("large_files") or []
    listed = {e["path"] for e in entries}
    shipped = {f"models/{p.name}" for p in (bundle / "models").glob("*.pt")} if (bundle / "models").is_dir() else set()
    assert shipped <= listed, f"{bundle.name}: weights not in large_files.yml: {sorted(shipped - listed)}"
    for entry in entries:
        path = bundle / entry["path"]
        assert path.is_file(), f"{bundle.name}: large_files.yml lists a missing file {entry['path']}"
        assert entry["hash_type"] == "sha256"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["hash_val"], f"{path}: sha256 differs"


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_verify_metadata(bundle):
    assert SCHEMA.is_file(), f"offline schema copy missing: {SCHEMA}"
    _ok(_bundle_cli("verify_metadata", "--meta_file", str(bundle / "configs/metadata.json"), "--filepath", str(SCHEMA)))


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_verify_net_in_out(bundle):
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    if "network_def" not in config:
        pytest.skip("no network in this bundle")
    _ok(_bundle_cli("verify_net_in_out", "--net_id", "network_def", "--meta_file",
                    str(bundle / "configs/metadata.json"), "--config_file", str(bundle / "configs/inference.json"),
                    "--bundle_root", str(bundle), bundle=bundle))


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_ckpt_export(bundle, tmp_path):
    if not (bundle / "models" / "model.pt").is_file():
        pytest.skip("no trained weights in this bundle")
    out = tmp_path / "model.ts"
    _ok(_bundle_cli("ckpt_export", "--net_id", "network_def", "--filepath", str(out),
                    "--ckpt_file", str(bundle / "models/model.pt"), "--meta_file", str(bundle / "configs/metadata.json"),
                    "--config_file", str(bundle / "configs/inference.json"), "--bundle_root", str(bundle),
                    "--use_trace", "True", bundle=bundle))
    assert out.stat().st_size > 0


def _fov_corners(affine: np.ndarray, shape) -> np.ndarray:
    """World positions of the outer corners of the field of view (voxel edges, not centres)."""
    lo = affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    hi = affine @ np.array([s - 0.5 for s in shape] + [1.0])
    return np.stack([lo[:3], hi[:3]])


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_inference_contract(bundle, small_volume, tmp_path):
    out_dir = tmp_path / "out"
    proc = _bundle_cli("run", "--config_file", str(bundle / "configs/inference.json"), "--bundle_root", str(bundle),
                       "--dataset_dir", str(small_volume), "--output_dir", str(out_dir), *_overrides(bundle))
    _ok(proc)
    src = nib.load(str(small_volume / "crop_dev03.nii.gz"))
    out = nib.load(str(out_dir / "crop_dev03_sr.nii.gz"))
    assert out.get_data_dtype() == np.float32
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)  # the input's orientation
    # x2 on the in-plane RAS axes A and S: in this file's (A, S, L) order, the first two axes
    assert out.shape == (src.shape[0] * 2, src.shape[1] * 2, src.shape[2])
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0),
                               np.linalg.norm(src.affine[:3, :3], axis=0) / [2, 2, 1], atol=1e-6)
    # half-voxel rule: the HR grid covers exactly the LR field of view
    np.testing.assert_allclose(np.sort(_fov_corners(out.affine, out.shape), 0),
                               np.sort(_fov_corners(src.affine, src.shape), 0), atol=1e-5)
    # intensities in the input's units, not [0, 1]
    sr, lr = np.asarray(out.dataobj), np.asarray(src.dataobj, dtype=np.float32)
    assert np.isfinite(sr).all() and abs(np.percentile(sr, 99) - np.percentile(lr, 99)) < 0.2 * np.percentile(lr, 99)
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
@pytest.mark.parametrize(
    "case, expect",
    [("missing_folder", "no such folder"), ("empty_folder", "no NIfTI"), ("not_3d", "not a 3D image"),
     ("nan", "NaN"), ("too_small", "smaller than"), ("unreadable", "unreadable")],
)
def test_inference_bad_input(bundle, case, expect, tmp_path):
    folder = tmp_path / "in"
    if case != "missing_folder":
        folder.mkdir()
    bad = folder / "bad.nii.gz"
    if case == "not_3d":
        nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), str(bad))
    elif case == "nan":
        data = np.ones((16, 32, 32), np.float32)
        data[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(bad))
    elif case == "too_small":
        nib.save(nib.Nifti1Image(np.ones((1, 1, 1), np.float32), np.eye(4)), str(bad))
    elif case == "unreadable":
        bad.write_bytes(b"\x1f\x8b broken gzip")
    out_dir = tmp_path / "out"
    proc = _bundle_cli("run", "--config_file", str(bundle / "configs/inference.json"), "--bundle_root", str(bundle),
                       "--dataset_dir", str(folder), "--output_dir", str(out_dir), *_overrides(bundle))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
    assert str(folder if case in ("missing_folder", "empty_folder") else bad) in errors[0]
    assert "Traceback" not in proc.stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing partial left behind


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_embedded_sample_demo(bundle, tmp_path):
    """No --dataset_dir: the embedded MNI152 sample, degraded x2, gives SR + preview + metrics."""
    out_dir = tmp_path / "demo"
    _ok(_bundle_cli("run", "--config_file", str(bundle / "configs/inference.json"), "--bundle_root", str(bundle),
                    "--output_dir", str(out_dir), *_overrides(bundle)))
    stem = "mni_icbm152_t1_tal_nlin_sym_09a_converted"
    for suffix in ["_sr.nii.gz", "_lr.nii.gz", "_preview.png", "_metrics.json"]:
        assert (out_dir / f"{stem}{suffix}").is_file(), suffix
    scores = json.loads((out_dir / f"{stem}_metrics.json").read_text())
    assert scores["sr"]["psnr_mask"] > 20 and scores["bspline"]["psnr_mask"] > 20 and scores["reference"] == "bspline"


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_evaluate(bundle, small_volume, tmp_path):
    """evaluate.json (on top of train.json for learned bundles) writes metric tables and report figures."""
    configs = [bundle / "configs" / name for name in ("train.json", "evaluate.json")]
    configs = [str(c) for c in configs if c.is_file()]
    if not configs or not configs[-1].endswith("evaluate.json"):
        pytest.skip("no evaluate.json")
    config_arg = configs[0] if len(configs) == 1 else json.dumps(configs)
    out_dir = tmp_path / "eval"
    _ok(_bundle_cli("run", "--config_file", config_arg, "--bundle_root", str(bundle), "--dataset_dir",
                    str(small_volume), "--output_dir", str(out_dir), *_overrides(bundle)))
    table = json.loads((out_dir / "metrics_per_subject.json").read_text())
    assert table["subjects"][0]["subject"] == "crop_dev03" and table["mean"]["psnr_mask"] > 15
    for fig in ["bars.png", "three_view.png", "error_heatmap.png", "per_slice_psnr.png", "per_subject_psnr.png"]:
        assert (out_dir / fig).stat().st_size > 1000, fig
    for baseline in ("bspline", "cubic"):  # the reference interpolant and Keys cubic, beside the method
        assert json.loads((out_dir / f"{baseline}_per_subject.json").read_text())["mean"]["psnr_mask"] > 15


@pytest.fixture(scope="module")
def small_training_set(tmp_path_factory, mri_dir) -> Path:
    """Three small HR crops of different real scans (the training command's --dataset_dir)."""
    folder = tmp_path_factory.mktemp("small_train")
    for name in ["dev01_siemens_trio_3T_mprage", "dev02_rorden_chris_t1", "dev03_mr_gd_skullstripped_ce_t1"]:
        img = nib.load(str(mri_dir / f"{name}.nii.gz"))
        c = [s // 2 for s in img.shape[:3]]
        data = np.asarray(img.dataobj, dtype=np.float32)[c[0] - 8 : c[0] + 8, c[1] - 32 : c[1] + 32, c[2] - 32 : c[2] + 32]
        nib.save(nib.Nifti1Image(data, img.affine), str(folder / f"crop_{name}.nii.gz"))
    return folder


def _train_args(bundle: Path, data: Path, ckpt: Path) -> list[str]:
    return ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--ckpt_dir", str(ckpt),
            "--final_model_path", str(ckpt / "model.pt"), *_overrides(bundle, "train")]


@pytest.mark.parametrize("bundle", LEARNED, ids=LEARNED_IDS)
def test_train_short_run_and_resume(bundle, small_training_set, tmp_path):
    ckpt = tmp_path / "ckpt"
    _ok(_bundle_cli("run", "--config_file", str(bundle / "configs/train.json"), *_train_args(bundle, small_training_set, ckpt)))
    assert (ckpt / "model.pt").stat().st_size > 0
    assert any(p.suffix == ".pt" and p.name != "model.pt" for p in ckpt.rglob("*.pt")), "no resumable checkpoint"
    # a second run resumes from the latest checkpoint instead of starting over
    proc = _bundle_cli("run", "--config_file", str(bundle / "configs/train.json"), *_train_args(bundle, small_training_set, ckpt))
    _ok(proc)
    assert "resum" in (proc.stdout + proc.stderr).lower()


@pytest.mark.parametrize("bundle", LEARNED, ids=LEARNED_IDS)
def test_multi_gpu_train_on_cpu(bundle, small_training_set, tmp_path):
    """multi_gpu_train.json on top of train.json, two processes with the gloo backend."""
    configs = json.dumps([str(bundle / "configs/train.json"), str(bundle / "configs/multi_gpu_train.json")])
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2")
    ckpt = tmp_path / "ckpt"
    _ok(_bundle_cli("run", "--config_file", configs, *_train_args(bundle, small_training_set, ckpt), launcher=launcher))
    assert (ckpt / "model.pt").stat().st_size > 0


def test_edm25d_strip_and_downscaled_copies_wiring(small_training_set):
    """train.json's ``strip_prob`` computes the head depth in the cached preprocessing and ``downscaled_copies``
    adds block-averaged copies of the training volumes; a batch comes out of the training loader."""
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "brain_mri_edm25d_super_resolution"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    overrides = json.loads((bundle / "configs" / "test_overrides.json").read_text())["train"]
    overrides.update(bundle_root=str(bundle), dataset_dir=str(small_training_set), strip_prob=1.0,
                     downscaled_copies=[2])
    for key, value in overrides.items():
        parser[key] = value
    cache = parser.get_parsed_content("train#cache")
    assert [item.get("downscale") for item in parser.get_parsed_content("split")["training"]] == [None, None, 2, 2]
    assert all("head_depth" in cache._cache[i] for i in range(len(cache._cache)))
    assert cache._cache[2]["label"].shape[1] == cache._cache[0]["label"].shape[1] // 2
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["label"].shape == (2, 1, 16, 16) and batch["image"].shape == (2, 2, 16, 16)
