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


@pytest.mark.parametrize("names", [["spline", "block"], ["block"]])
def test_degradation_copies_simulate_each_named_lr(hr_file, names):
    from common.data.datalists import with_degradation_copies
    from common.transforms.degrade import degradation_by_name

    split = {"training": [{"label": str(hr_file), "subject": "hr"}], "validation": [{"label": "v"}]}
    out = with_degradation_copies(split, names)
    assert [it["degradation"] for it in out["training"]] == names and out["validation"] == split["validation"]
    assert [it["subject"] for it in out["training"]] == [f"hr_{n}" for n in names]
    assert with_degradation_copies(split, []) == split
    with pytest.raises(ValueError, match="differ"):
        with_degradation_copies(split, ["block", "block"])
    for item, name in zip(out["training"], names):
        d = training_preprocessing((1, 2, 2))(item)  # the pipeline's own degradation (block) is overridden
        raw = nib.load(str(hr_file)).get_fdata(dtype=np.float32)[None]
        expected = degradation_by_name(name, (1, 2, 2))(torch.from_numpy(raw))
        lo, hi = np.percentile(expected.numpy(), [1, 99])
        torch.testing.assert_close(d["image"].as_tensor(), ((expected - lo) / (hi - lo)).clamp(0, 1))
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps a transform's error, the cause kept
        training_preprocessing((1, 2, 2))({**out["training"][0], "degradation": "bicubic"})
    assert "unknown degradation 'bicubic'" in str(err.value.__cause__)


def test_downscaled_split_is_a_cascade_stage(hr_file):
    """Every item's HR block-averaged in-plane first: the earlier stage of an x2-then-x2 cascade learns HR/4 -> HR/2."""
    from common.data.datalists import downscaled_split

    split = {"training": [{"label": str(hr_file)}], "validation": [{"label": str(hr_file)}]}
    assert downscaled_split(split, None) == split and downscaled_split(split, [1, 1, 1]) == split
    with pytest.raises(ValueError, match="positive"):
        downscaled_split(split, [1, 0, 2])
    out = downscaled_split(split, [1, 2, 2])
    assert all(it["downscale"] == [1, 2, 2] for items in out.values() for it in items)
    full = training_preprocessing((1, 2, 2))(split["training"][0])
    stage = training_preprocessing((1, 2, 2))(out["training"][0])
    assert stage["label"].shape == (1, 6, 10, 8) and stage["image"].shape == (1, 6, 5, 4)  # (6, 21, 18) -> (6, 10, 9)
    torch.testing.assert_close(stage["label"].affine[:3, :3], full["label"].affine[:3, :3] @ torch.diag(
        torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)))
    v = validation_preprocessing((1, 2, 2), num_slices=2)(out["validation"][0])
    assert v["label"].shape == (1, 2, 10, 8) and v["image"].shape == (1, 2, 5, 4)


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
