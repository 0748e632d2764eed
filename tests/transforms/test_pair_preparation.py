"""The preparation chain over a datalist of real-scan pairs, run through ``monai.bundle run``: outputs on the
reference grid, a resumed run skips finished pairs, a pair that cannot be registered stops with one error."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Spacing

from bundle_cli import bundle_cli, ok, overrides, train_args
from conftest import REPO

from common.evaluation.command_timing import cli_value
from common.transforms import LoadVolumed, RegistrationError, RicianNoise, ThickSlices, prepare_pairs

# small settings: the thesis's N4 schedule and full-resolution registration take minutes per 256^3 scan
FAST = {
    "n4": {"iterations": [10, 10], "shrink_factor": 2},
    "brain": {"working_spacing": 3.0, "iterations": 80},
    "registration": {"resolutions": 2, "iterations": 150},
}


BUNDLE = REPO / "bundles" / "brain_mri_attention_unet_super_resolution"
# one xdist worker runs this module: its prepared pair (minutes of N4 and registration) is made once
pytestmark = pytest.mark.xdist_group("pair_preparation")


@pytest.fixture(scope="module")
def raw_pair(tmp_path_factory, mri_dir):
    """dev06 at 2.5 mm as the HR scan, and a separately acquired scan simulated from it: moved (a rigid shift of
    two voxels), degraded with another kernel (thick slices) and Rician noise."""
    folder = tmp_path_factory.mktemp("raw_pair")
    scan = LoadVolumed(keys="image")({"image": str(mri_dir / "dev06_myconnectome_siemens_skyra_3T_mprage.nii.gz")})
    hr = Spacing(pixdim=(2.5, 2.5, 2.5), mode="bilinear")(scan["image"])
    lr = RicianNoise(20.0, seed=0)(ThickSlices(axis=2, thickness=2)(hr.roll(2, dims=1)))
    for name, vol in (("hr", hr), ("lr", lr)):
        nib.save(nib.Nifti1Image(vol[0].numpy(), vol.affine.numpy()), str(folder / f"{name}.nii.gz"))
    (folder / "raw.json").write_text(json.dumps({"training": [{"image": str(folder / "lr.nii.gz"),
                                                              "label": str(folder / "hr.nii.gz")}]}))
    return folder


@pytest.fixture(scope="module")
def prepared(raw_pair, tmp_path_factory):
    """The attention U-Net bundle's configs/prepare.json (the thesis chain's entry point) at small settings."""
    out = tmp_path_factory.mktemp("prepared")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "prepare.json"),
               "--bundle_root", str(BUNDLE), "--datalist", str(raw_pair / "raw.json"), "--output_dir", str(out)]
    for key, value in FAST.items():
        command += [f"--{key}", json.dumps(value)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_prepare_through_bundle_run_then_resume(raw_pair, prepared):
    listing = json.loads((prepared / "datalist_prepared.json").read_text())
    (entry,) = listing["training"]
    image, label, mask = (nib.load(entry[k]) for k in ("image", "label", "brain_mask"))
    assert image.shape == label.shape == mask.shape
    np.testing.assert_allclose(image.affine, label.affine, atol=1e-5)
    hr = nib.load(str(raw_pair / "hr.nii.gz"))
    # the crop keeps world coordinates: the crop's first voxel is a voxel of the HR grid
    offset = np.linalg.inv(hr.affine) @ label.affine[:, 3]
    np.testing.assert_allclose(offset[:3], np.round(offset[:3]), atol=1e-4)
    lab, img, brain = (np.asarray(x.dataobj) for x in (label, image, mask))
    assert lab.min() >= 0 and lab.max() <= 1 and set(np.unique(brain)) == {0.0, 1.0}
    assert np.corrcoef(img[brain > 0], lab[brain > 0])[0, 1] > 0.8  # moved onto the reference, not left shifted
    steps = listing["seconds"][entry["label"]]
    assert {"n4", "brain_extraction", "n4_in_brain", "registration", "write"} <= set(steps)
    # resumed: the finished pair is skipped, its files untouched
    before = {k: (prepared / f"hr_{k}.nii.gz").stat().st_mtime_ns for k in ("image", "label")}
    again = prepare_pairs(raw_pair / "raw.json", prepared, **FAST)
    assert again[0]["seconds"] == {}
    assert before == {k: (prepared / f"hr_{k}.nii.gz").stat().st_mtime_ns for k in ("image", "label")}


def test_prepared_pair_trains_and_the_model_infers_on_a_finer_grid(raw_pair, prepared, tmp_path):
    """A few training steps on the prepared pair (no simulation: the LR scan is the conditioning), then inference
    on the raw LR scan resampled to 2.0 mm (a non-integer factor 1.25 from 2.5 mm) with the trained weights."""
    (pair,) = json.loads((prepared / "datalist_prepared.json").read_text())["training"]
    datalist = tmp_path / "pairs.json"
    datalist.write_text(json.dumps({"training": [pair], "validation": [pair]}))
    ckpt = tmp_path / "ckpt"
    configs = json.dumps([str(BUNDLE / "configs" / c) for c in ("train.json", "real_pairs.json")])
    ok(bundle_cli("run", "--config_file", configs, *train_args(BUNDLE, prepared, ckpt), "--datalist", str(datalist),
                  "--final_model_path", str(ckpt / "model_pairs.pt"), "--iterations", "3"))
    assert (ckpt / "model_pairs.pt").stat().st_size > 0 and (ckpt / "best_model.pt").is_file()
    # the simulated-pairs config refuses the same datalist instead of ignoring its LR scans
    refused = bundle_cli("run", "--config_file", str(BUNDLE / "configs" / "train.json"),
                         *train_args(BUNDLE, prepared, tmp_path / "refused"), "--datalist", str(datalist))
    assert refused.returncode != 0 and "real LR/HR pairs" in refused.stderr

    lr_only = tmp_path / "lr_input"
    lr_only.mkdir()
    (lr_only / "lr.nii.gz").write_bytes((raw_pair / "lr.nii.gz").read_bytes())
    network = {k: v for k, v in json.loads((BUNDLE / "configs" / "test_overrides.json").read_text())["train"].items()
               if k in json.loads((BUNDLE / "configs" / "inference.json").read_text())}
    network_args = [a for k, v in network.items() for a in (f"--{k}", cli_value(v))]
    configs = json.dumps([str(BUNDLE / "configs" / c) for c in ("inference.json", "real_pairs_inference.json")])
    ok(bundle_cli("run", "--config_file", configs, "--bundle_root", str(BUNDLE), "--dataset_dir", str(lr_only),
                  "--output_dir", str(tmp_path / "out"), "--model_path", str(ckpt / "model_pairs.pt"),
                  "--output_spacing", "[2.0, 2.0, 2.0]", *overrides(BUNDLE), *network_args))
    lr, sr = nib.load(str(raw_pair / "lr.nii.gz")), nib.load(str(tmp_path / "out" / "lr_sr.nii.gz"))
    np.testing.assert_allclose(sr.header.get_zooms()[:3], (2.0, 2.0, 2.0), atol=1e-4)
    # the same field of view in 2.0 mm voxels (LR 2.5 x 2.5 x 5 mm): the first voxel centre kept, the last one
    # reached to within a voxel
    np.testing.assert_allclose(sr.affine[:3, 3], lr.affine[:3, 3], atol=1e-3)
    extent = (np.array(lr.shape) - 1) * np.array(lr.header.get_zooms()[:3])
    np.testing.assert_allclose((np.array(sr.shape) - 1) * 2.0, extent, atol=2.0)
    assert np.isfinite(np.asarray(sr.dataobj)).all()


def test_unregistrable_pair_names_both_files_and_writes_nothing(raw_pair, tmp_path):
    hr = nib.load(str(raw_pair / "hr.nii.gz"))
    cube = np.zeros(hr.shape, dtype=np.float32)
    cube[2:8, 2:8, 2:8] = 100.0  # not a head
    nib.save(nib.Nifti1Image(cube, hr.affine), str(tmp_path / "cube.nii.gz"))
    pairs = [{"image": str(tmp_path / "cube.nii.gz"), "label": str(raw_pair / "hr.nii.gz")}]
    with pytest.raises(RegistrationError, match=r"cube.nii.gz: cannot be registered with .*hr.nii.gz"):
        prepare_pairs(pairs, tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
