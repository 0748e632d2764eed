"""NIfTI I/O: orientation round trips, dtype handling, atomic writes, bad input, and the LR <-> HR affine rule."""

import nibabel as nib
import numpy as np
import pytest

from common.data.io import (
    VolumeError,
    atomic_path,
    check_nifti_header,
    hr_affine,
    list_nifti,
    load_volume,
    lr_affine,
    save_volume,
    scale_affine,
)

ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("A", "S", "R"), ("P", "I", "L")]


def _write(path, data, axcodes=("R", "A", "S"), zooms=(1.0, 1.5, 2.0), dtype=np.int16):
    """A NIfTI whose voxel axes follow ``axcodes``, with an oblique-free affine and an origin offset."""
    ornt = nib.orientations.axcodes2ornt(axcodes)
    affine = np.eye(4)
    for i, (axis, flip) in enumerate(ornt.astype(int)):
        affine[:3, i] = 0
        affine[axis, i] = flip * zooms[i]
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    nib.save(nib.Nifti1Image(data.astype(dtype), affine), str(path))
    return affine


def _world(affine, index):
    return (affine @ np.append(np.asarray(index, float), 1.0))[:3]


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64])
def test_load_is_ras_and_save_restores_input(tmp_path, axcodes, dtype):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 200, size=(6, 7, 8))
    affine = _write(tmp_path / "in.nii.gz", data, axcodes, dtype=dtype)
    vol = load_volume(tmp_path / "in.nii.gz")
    assert vol.data.dtype == np.float32
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    # the same voxel value sits at the same world position in both
    i, j, k = 1, 2, 3
    world = _world(affine, (i, j, k))
    ras_index = np.round(np.linalg.solve(vol.affine, np.append(world, 1))[:3]).astype(int)
    assert vol.data[tuple(ras_index)] == data[i, j, k]
    out = save_volume(tmp_path / "out.nii.gz", vol.data, vol.affine, vol.source_ornt)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data.astype(np.float32))


@pytest.mark.parametrize(
    "shape, content, problem",
    [
        ((5, 5), None, "not a 3D image"),
        ((5, 5, 5, 2), None, "not a 3D image"),
        ((5, 5, 5), "nan", "NaN"),
        ((2, 5, 5), None, "smaller than"),
    ],
)
def test_bad_input_names_file_and_problem(tmp_path, shape, content, problem):
    data = np.ones(shape, np.float32)
    if content == "nan":
        data[1, 1, 1] = np.nan
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(VolumeError, match=problem) as err:
        load_volume(path, min_shape=(3, 3, 3))
    assert str(path) in str(err.value)


def test_unreadable_and_missing(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti at all")
    with pytest.raises(VolumeError, match="unreadable") as err:
        check_nifti_header(broken)
    assert str(broken) in str(err.value)
    with pytest.raises(VolumeError, match="no such file"):
        load_volume(tmp_path / "missing.nii")
    with pytest.raises(VolumeError, match="no such folder"):
        list_nifti(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no NIfTI"):
        list_nifti(tmp_path / "empty")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_an_input(tmp_path):
    path = tmp_path / "in.nii.gz"
    _write(path, np.zeros((4, 4, 4)))
    before = path.read_bytes()
    with pytest.raises(VolumeError, match="overwrite an input"):
        save_volume(path, np.ones((4, 4, 4)), np.eye(4), protect=[path])
    assert path.read_bytes() == before


@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 2, 2), (1, 1, 4), (3, 1, 2)])
def test_lr_affine_half_voxel_rule(factors):
    hr = np.diag([0.9, 1.1, 1.3, 1.0])
    hr[:3, 3] = [5.0, -7.0, 2.0]
    lr = lr_affine(hr, factors)
    # LR voxel i is centred on the mean of the HR voxel centres it covers
    for i in range(3):
        covered = [np.array(factors) * i + np.array(off) for off in np.ndindex(*factors)]
        centre = np.mean([_world(hr, c) for c in covered], axis=0)
        np.testing.assert_allclose(_world(lr, (i, i, i)), centre, atol=1e-12)
    # both directions: hr_affine undoes lr_affine; spacing halves and the origin shifts back
    np.testing.assert_allclose(hr_affine(lr, factors), hr, atol=1e-12)
    np.testing.assert_allclose(np.abs(np.diag(lr))[:3], np.abs(np.diag(hr))[:3] * np.array(factors))


def test_hr_affine_from_lr_for_x2():
    lr = np.diag([1.0, 2.0, 2.0, 1.0])
    hr = hr_affine(lr, (1, 2, 2))
    np.testing.assert_allclose(np.diag(hr)[:3], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(hr[:3, 3], [0.0, -0.5, -0.5])  # HR voxel 0 is half an HR voxel before LR voxel 0
    with pytest.raises(ValueError):
        scale_affine(lr, (1, 0, 2))
