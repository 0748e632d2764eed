"""The MONAI Deploy application (common.deploy.app) against ``monai.bundle run``, bundle by bundle.

The application runs in the SDK's own environment, named by ``DEPLOY_PYTHON`` (``make test`` sets it to
.venv-deploy/bin/python after ``make deploy-install``); the bundle command runs in this one. Without
``DEPLOY_PYTHON`` the application tests skip; with it set, a broken Deploy environment fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from bundle_cli import BUNDLES, IDS, default_weights, infer, ok, sr_outputs
from conftest import REPO, SUBPROCESS_THREADS

DICOM_SERIES = REPO.parent / "shared" / "data" / "dicom" / "saganon_siemens_skyra_3T_sag_mprage"
DICOM_TWIN = REPO.parent / "shared" / "data" / "mri" / "dev09_saganon_siemens_skyra_3T_mprage_3y.nii.gz"
INTERPOLATION = REPO / "bundles" / "brain_mri_interpolation_super_resolution"
EDM25D = REPO / "bundles" / "brain_mri_edm25d_super_resolution"


@pytest.fixture(scope="module")
def deploy_python() -> str:
    python = os.environ.get("DEPLOY_PYTHON")
    if not python:
        pytest.skip("DEPLOY_PYTHON is not set: `make test` sets it after `make deploy-install`")
    assert Path(python).is_file(), f"DEPLOY_PYTHON={python} does not exist: run `make deploy-install`"
    return python


def run_app(python: str, bundle: Path, input_dir, output_dir, *sets: str, timeout: int = 900):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=SUBPROCESS_THREADS)
    cmd = [python, "-m", "common.deploy", "--bundle", str(bundle), "--input", str(input_dir),
           "--output", str(output_dir)]
    for kv in sets:
        cmd += ["--set", kv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def bundle_test_sets(bundle: Path) -> list[str]:
    """The bundle's test sizes (configs/test_overrides.json "inference") as ``--set key=<json>``."""
    path = bundle / "configs" / "test_overrides.json"
    values = json.loads(path.read_text()).get("inference", {}) if path.is_file() else {}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]



def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith(("error:", "failed:"))]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_application_equals_bundle_run(deploy_python, bundle, small_volume, tmp_path):
    """Voxel for voxel (tolerance 0) and the same affine: the app replays the bundle's own config per volume."""
    sets = bundle_test_sets(bundle)
    app = run_app(deploy_python, bundle, small_volume, tmp_path / "app", *sets)
    assert app.returncode == 0, app.stderr[-3000:]
    ok(infer(bundle, small_volume, tmp_path / "cli"))
    written = sorted(p.name for p in (tmp_path / "app").iterdir())
    assert written == sorted(sr_outputs(bundle, "crop_dev03"))  # with a standard deviation if K > 1 by default
    for name in written:
        a, b = nib.load(tmp_path / "app" / name), nib.load(tmp_path / "cli" / name)
        assert a.get_data_dtype() == np.float32
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.affine, b.affine)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


@pytest.mark.slow
def test_uncertainty_outputs_equal_bundle_run(deploy_python, small_volume, tmp_path):
    """``--num_samples 2``: the mean and the per-voxel standard deviation, both equal to the bundle command's."""
    sets = [*bundle_test_sets(EDM25D), "num_samples=2"]
    app = run_app(deploy_python, EDM25D, small_volume, tmp_path / "app", *sets)
    assert app.returncode == 0, app.stderr[-3000:]
    ok(infer(EDM25D, small_volume, tmp_path / "cli", "--num_samples", "2"))
    for name in ["crop_dev03_sr.nii.gz", "crop_dev03_sr_std.nii.gz"]:
        a, b = nib.load(tmp_path / "app" / name), nib.load(tmp_path / "cli" / name)
        np.testing.assert_array_equal(a.affine, b.affine)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def _dicom_paths():
    if not (DICOM_SERIES.is_dir() and DICOM_TWIN.is_file()):
        pytest.skip(f"the DICOM series or its NIfTI twin is absent ({DICOM_SERIES}, {DICOM_TWIN})")


VOLUME_FROM_SERIES = """
import json, sys
from pathlib import Path
import numpy as np
from common.deploy import operators  # the SDK, with its CUDA runtime preloaded
from monai.deploy.core import Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
series, out = Path(sys.argv[1]), Path(sys.argv[2])
app = Application([sys.argv[0]])
studies = DICOMDataLoaderOperator(app, input_folder=series, name="l").load_data_to_studies(series)
image = DICOMSeriesToVolumeOperator(app, name="t").convert_to_image(
    DICOMSeriesSelectorOperator(app, name="s").filter(None, studies))
class Port:
    def receive(self, name): return image
    def emit(self, value, name): self.value = value
port, report = Port(), operators.RunReport()
operators.DICOMImageToVolumeOperator(app, series_path=series, report=report, name="v").compute(port, port, None)
vol = port.value
np.savez(out, data=vol.data, affine=vol.affine)
"""


def test_dicom_series_volume_has_the_twins_geometry(deploy_python, tmp_path):
    """The volume the application builds from the real series: the NIfTI twin's voxels and RAS affine."""
    _dicom_paths()
    from common.data.io import load_volume

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([deploy_python, "-c", VOLUME_FROM_SERIES, str(DICOM_SERIES), str(tmp_path / "v.npz")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built, twin = np.load(tmp_path / "v.npz"), load_volume(DICOM_TWIN)
    assert built["data"].shape == twin.data.shape
    np.testing.assert_array_equal(built["data"], twin.data)
    # the twin's header stores the affine in float32: agreement to 1e-4 mm is all it can show
    np.testing.assert_allclose(built["affine"], twin.affine, atol=1e-4)


@pytest.mark.slow
def test_dicom_series_application_equals_bundle_run_on_twin(deploy_python, tmp_path):
    """A clinical series in directly: the output equals the bundle command's on the NIfTI twin."""
    _dicom_paths()
    app = run_app(deploy_python, INTERPOLATION, DICOM_SERIES, tmp_path / "app")
    assert app.returncode == 0, app.stderr[-3000:]
    twin_dir = tmp_path / "twin"
    twin_dir.mkdir()
    (twin_dir / DICOM_TWIN.name).symlink_to(DICOM_TWIN)
    ok(infer(INTERPOLATION, twin_dir, tmp_path / "cli"))
    from common.data.io import load_volume

    a = load_volume(tmp_path / "app" / f"{DICOM_SERIES.name}_sr.nii.gz")
    b = load_volume(tmp_path / "cli" / f"{DICOM_TWIN.name.removesuffix('.nii.gz')}_sr.nii.gz")
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_bad_files_are_reported_and_the_good_ones_written(deploy_python, small_volume, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(small_volume / "crop_dev03.nii.gz", folder)
    (folder / "broken.nii.gz").write_bytes(b"not a gzip stream")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(folder / "empty.nii"))
    proc = run_app(deploy_python, INTERPOLATION, folder, tmp_path / "out")
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert any(line.startswith(f"error: {folder / 'broken.nii.gz'}: ") for line in lines), lines
    assert any(line.startswith(f"error: {folder / 'empty.nii'}: constant volume") for line in lines), lines
    assert lines[-1].startswith("failed: 2 of 3 inputs"), lines
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["crop_dev03_sr.nii.gz"]


def test_wrong_weights_hash_stops_before_any_output(deploy_python, small_volume, tmp_path):
    bundle = tmp_path / EDM25D.name
    shutil.copytree(EDM25D, bundle, ignore=shutil.ignore_patterns("output", "eval", "runs"))
    listed = bundle / "large_files.yml"
    text = listed.read_text()
    weights = default_weights(bundle)  # the file the app loads (the student's since EDM 2.5D 0.4.0)
    real = next(e["hash_val"] for e in yaml.safe_load(text)["large_files"] if bundle / e["path"] == weights)
    listed.write_text(text.replace(real, "0" * 64, 1))
    proc = run_app(deploy_python, bundle, small_volume, tmp_path / "out")
    assert proc.returncode == 1
    assert error_lines(proc) == [
        f"error: {weights}: sha256 {real} differs from {'0' * 64} listed in {listed}: "
        "the file was changed or damaged; restore it, or pass your own weights with --model_path"
    ]
    assert not any((tmp_path / "out").glob("*.nii*"))


def test_output_folder_equal_to_input_folder_is_refused(deploy_python, small_volume):
    proc = run_app(deploy_python, INTERPOLATION, small_volume, small_volume)
    assert proc.returncode == 1
    assert error_lines(proc) == [f"error: {small_volume}: the output folder is the input folder: the next run "
                                 "would read the outputs as inputs; choose another --output_dir"]


def test_package_imports_without_the_sdk():
    """``common.deploy`` and its app module import in the main environment; only running the app needs the SDK."""
    code = "import common.deploy.app, sys; print('holoscan' in sys.modules, 'monai.deploy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_input_format(tmp_path, small_volume):
    from common.data.io import VolumeError
    from common.deploy.app import input_format

    assert input_format(small_volume) == "nifti"
    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # no suffix: the preamble tells
    assert input_format(dicom) == "dicom"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match="neither NIfTI"):
        input_format(other)
    with pytest.raises(VolumeError, match="no such folder"):
        input_format(tmp_path / "missing")
