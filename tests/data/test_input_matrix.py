"""The input matrix of docs/bundle_contract.md at the library level: each bad file is refused with its path and
problem, each good one is read with its geometry, and a folder with some bad files is processed in part and
reported (common.data.io, common.data.datalists, common.data.BadInputSkippingDataset)."""

import os
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from common.data import BadInputSkippingDataset, VolumeError, inference_datalist, list_nifti, load_volume
from common.data.io import save_volume
from common.transforms import LoadVolumed
from input_cases import BAD, GOOD, write_duplicate_stems


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(0)
    return (rng.random((8, 10, 12)) * 500 + 10).astype(np.float32)


@pytest.mark.parametrize("case", sorted(BAD), ids=sorted(BAD))
def test_bad_file_is_refused_naming_it(case, base, tmp_path):
    writer, problem = BAD[case]
    path = writer(tmp_path, base)
    with pytest.raises(VolumeError, match=problem) as err:
        load_volume(path, min_shape=(2, 2, 2), scale_factor=(1, 2, 2))
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("case", sorted(GOOD), ids=sorted(GOOD))
def test_good_file_is_read_with_its_geometry(case, base, tmp_path):
    path = GOOD[case](tmp_path, base)
    src = nib.load(str(path))
    vol = load_volume(path)
    assert vol.data.shape == tuple(sorted(base.shape)) or sorted(vol.data.shape) == sorted(base.shape)
    # the same voxel holds the same value at the same world position (RAS reorientation keeps the geometry)
    stored = np.asarray(src.dataobj, dtype=np.float64).reshape(src.shape[:3])
    index = np.array([2, 3, 4])
    world = src.affine @ np.append(index, 1.0)
    ras_index = np.round(np.linalg.solve(vol.affine, world)[:3]).astype(int)
    np.testing.assert_allclose(vol.data[tuple(ras_index)], stored[tuple(index)], rtol=1e-6)
    out = save_volume(tmp_path / "back" / "out.nii.gz", vol.data, vol.affine, vol.source_ornt)
    np.testing.assert_allclose(nib.load(str(out)).affine, src.affine, atol=1e-6)


def test_int64_keeps_values_beyond_float32_integers(base, tmp_path):
    path = GOOD["int64"](tmp_path, base)
    stored = np.asarray(nib.load(str(path)).dataobj)
    assert stored.dtype == np.int64 and stored.max() > 2**24
    np.testing.assert_allclose(load_volume(path).data.max(), stored.max(), rtol=1e-7)


def test_folder_listing_skips_other_and_hidden_files(base, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.nii.gz").mkdir()  # a folder with a NIfTI name
    nib.save(nib.Nifti1Image(base, np.eye(4)), str(tmp_path / ".a_sr.nii.gz.x1y2.nii.gz"))  # a killed write
    nib.save(nib.Nifti1Image(base, np.eye(4)), str(tmp_path / "a.nii.gz"))
    assert [p.name for p in list_nifti(tmp_path)] == ["a.nii.gz"]


def test_duplicate_stems_both_refused(base, tmp_path):
    write_duplicate_stems(tmp_path, base)
    items = inference_datalist(str(tmp_path))
    assert len(items) == 2 and all("same stem" in it["error"] and "twin_sr.nii.gz" in it["error"] for it in items)


def test_output_folder_checks(base, tmp_path):
    nib.save(nib.Nifti1Image(base, np.eye(4)), str(tmp_path / "a.nii.gz"))
    with pytest.raises(VolumeError, match="is the input folder"):
        inference_datalist(str(tmp_path), output_dir=str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VolumeError, match="cannot write") as err:
        inference_datalist(str(tmp_path), output_dir=str(blocker / "out"))
    assert str(err.value).startswith(str(blocker / "out"))
    assert inference_datalist(str(tmp_path), output_dir=str(tmp_path / "out")) == [{"image": str(tmp_path / "a.nii.gz")}]


def test_folder_with_bad_files_is_processed_in_part(base, tmp_path, capsys):
    good = GOOD["lpi"](tmp_path, base)
    bad = [writer(tmp_path, base) for writer, _ in BAD.values()]
    write_duplicate_stems(tmp_path, base)
    data = inference_datalist(str(tmp_path))
    ds = BadInputSkippingDataset(data, LoadVolumed("image", min_shape=(2, 2, 2), scale_factor=(1, 2, 2)))
    loaded = [item["image"].meta["filename_or_obj"] for item in ds]
    assert loaded == [str(good)]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad) + 2 == len(ds.errors)
    assert {e.path for e in ds.errors} >= {str(p) for p in bad}
    with pytest.raises(SystemExit) as stop:
        ds.raise_if_failed()
    assert stop.value.code == 1
    assert f"{len(errors)} of {len(data)} inputs" in capsys.readouterr().err
    with pytest.raises(VolumeError):  # fail_fast: the first bad file stops the iteration
        list(BadInputSkippingDataset(data, LoadVolumed("image"), fail_fast=True))


def test_a_bug_is_not_taken_for_a_bad_file(base, tmp_path):
    """Only bad input is skipped; any other exception stops the run with its traceback."""
    nib.save(nib.Nifti1Image(base, np.eye(4)), str(tmp_path / "a.nii.gz"))

    def broken(item):
        raise KeyError("a bug")

    with pytest.raises(Exception) as err:
        list(BadInputSkippingDataset(inference_datalist(str(tmp_path)), broken))
    assert isinstance(err.value.__cause__, KeyError)


def test_write_killed_midway_leaves_no_output(tmp_path):
    """SIGKILL inside the atomic write: the target never appears; the hidden leftover is never read as input."""
    code = (
        "import os, signal, sys\n"
        "from common.data.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    target = tmp_path / "a_sr.nii.gz"
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert leftovers and all(p.name.startswith(".") for p in leftovers)
    with pytest.raises(VolumeError, match="no NIfTI"):
        list_nifti(tmp_path)
