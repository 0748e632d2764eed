"""The training and validation pipelines (common.transforms.pipelines) and downscaled training copies."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from common.transforms.pipelines import training_preprocessing, validation_preprocessing


@pytest.fixture
def hr_file(tmp_path):
    data = np.zeros((6, 21, 18), np.float32)
    data[:, 3:18, 3:15] = np.linspace(100, 400, 15 * 12).reshape(15, 12)
    path = tmp_path / "hr.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def test_training_and_validation_preprocessing(hr_file):
    d = training_preprocessing((1, 2, 2))({"label": str(hr_file)})
    assert d["image"].shape == (1, 6, 10, 9) and d["label"].shape == d["image_up"].shape == (1, 6, 20, 18)
    assert 0 <= d["label"].min() and d["label"].max() <= 1 and d["slice_foreground"].shape == (6,)
    assert "head_depth" not in d
    depth = training_preprocessing((1, 2, 2), head_depth=True)({"label": str(hr_file)})["head_depth"]
    assert depth.shape == d["label"].shape and float(depth.max()) > 0 and float(depth[0, 0, 0, 0]) == 0
    v = validation_preprocessing((1, 2, 2), num_slices=2)({"label": str(hr_file)})
    assert v["image"].shape == (1, 2, 10, 9) and v["label"].shape == (1, 2, 20, 18)


def test_downscaled_copies(hr_file):
    from common.data.datalists import with_downscaled_copies

    split = {"training": [{"label": str(hr_file), "subject": "hr"}], "validation": [{"label": "v"}]}
    out = with_downscaled_copies(split, [2])
    assert [it.get("downscale") for it in out["training"]] == [None, 2] and out["validation"] == split["validation"]
    assert out["training"][1]["subject"] == "hr_down2" and with_downscaled_copies(split, []) == split
    with pytest.raises(ValueError, match="downscale"):
        with_downscaled_copies(split, [1])
    full, half = (training_preprocessing((1, 2, 2))(it) for it in out["training"])
    assert half["label"].shape == (1, 3, 10, 8)  # (6, 21, 18) block-averaged by 2: (3, 10, 9), then the LR grid
    torch.testing.assert_close(half["label"].affine[:3, :3], 2 * full["label"].affine[:3, :3])


def test_pairs_off_one_grid_are_refused_naming_both_files(tmp_path):
    import re

    from common.data import VolumeError
    from common.transforms import pair_training_preprocessing

    vol = np.random.default_rng(0).random((12, 14, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "hr.nii.gz"))
    nib.save(nib.Nifti1Image(vol[:, :, ::2], np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / "lr.nii.gz"))
    nib.save(nib.Nifti1Image(vol * 2, np.eye(4)), str(tmp_path / "lr_registered.nii.gz"))
    pipeline = pair_training_preprocessing()
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps a transform's error, the cause kept
        pipeline({"image": str(tmp_path / "lr.nii.gz"), "label": str(tmp_path / "hr.nii.gz")})
    assert isinstance(err.value.__cause__, VolumeError)
    assert re.search(r"lr.nii.gz: is not on the voxel grid of .*hr.nii.gz", str(err.value.__cause__))
    out = pipeline({"image": str(tmp_path / "lr_registered.nii.gz"), "label": str(tmp_path / "hr.nii.gz")})
    assert out["image"].shape == out["label"].shape == (1, 12, 14, 16) and "slice_foreground" in out
