"""Normalisation and its inverse, head masks, slice stacks, paired patches, datalists, the embedded sample."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.data import (
    RandPairedPatchd,
    build_datalist,
    embedded_sample_path,
    inference_datalist,
    slice_stack,
)
from common.degrade import BlockAverage
from common.io import VolumeError, load_volume
from common.transforms import PercentileNormalize, PercentileNormalized, head_mask, invert_normalization


def test_percentile_normalisation_and_inverse():
    x = MetaTensor(torch.linspace(0, 100, 1001).reshape(1, 7, 11, 13))
    y = PercentileNormalize()(x)
    lo, hi = y.meta["norm_lo"], y.meta["norm_hi"]
    np.testing.assert_allclose([lo, hi], [1.0, 99.0], atol=1e-3)
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0
    inside = (x > lo) & (x < hi)
    torch.testing.assert_close(invert_normalization(y, lo, hi)[inside], x[inside])


def test_reference_key_statistics_apply_to_all_keys():
    hr = MetaTensor(torch.rand(1, 8, 8, 8) * 50)
    lr = BlockAverage((1, 2, 2))(hr)
    out = PercentileNormalized(keys=["image", "label"], ref_key="image")({"image": lr, "label": hr})
    assert out["image"].meta["norm_hi"] == out["label"].meta["norm_hi"]


def test_head_mask_finds_the_head():
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    head = np.where(r < 0.7, 100.0, 0.0) + np.random.default_rng(0).normal(0, 2, r.shape)
    head[(r > 0.3) & (r < 0.35)] = 5.0  # a dark ring inside (CSF-like) must not split the mask
    mask = head_mask(head)
    assert mask[r < 0.65].all()
    assert not mask[r > 0.8].any()


@pytest.mark.parametrize("thickness", [1, 2, 5])
def test_head_mask_of_a_slab_inside_the_head(thickness):
    """A crop cut by the field of view (a thin slab of brain) is all head: no erosion from the crop's edges."""
    rng = np.random.default_rng(0)
    slab = rng.uniform(60, 100, (thickness, 32, 32))
    slab[:, 10:14, 10:14] = 5.0  # a dark sulcus inside stays in the mask
    assert head_mask(slab).all()
    with_air = np.pad(slab, ((0, 0), (8, 8), (8, 8)))
    mask = head_mask(with_air)
    assert mask[:, 8:-8, 8:-8].all() and not mask[:, :4].any()


def test_slice_stack_neighbours():
    vol = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 3, 4)
    prev = slice_stack(vol, (-1, 0))
    assert prev.shape == (5, 2, 3, 4)
    np.testing.assert_array_equal(prev[:, :, 0, 0].numpy(), [[0, 0], [0, 1], [1, 2], [2, 3], [3, 4]])
    both = slice_stack(vol[None], (-1, 0, 1))
    np.testing.assert_array_equal(both[4, :, 0, 0].numpy(), [3, 4, 4])


@pytest.mark.parametrize("ndim", [2, 3])
def test_paired_patches_stay_aligned(ndim):
    factors = (1, 2, 2)[-ndim:]
    hr = torch.rand(1, *([16] * ndim))
    lr = BlockAverage(factors)(hr)
    sampler = RandPairedPatchd("image", "label", lr_patch_size=[4] * ndim, scale_factor=factors, num_samples=3)
    sampler.set_random_state(0)
    for item in sampler({"image": lr, "label": hr}):
        assert item["label"].shape[1:] == tuple(4 * f for f in factors)
        torch.testing.assert_close(BlockAverage(factors)(item["label"]), item["image"])


def test_datalists(tmp_path):
    for name in ["a", "b", "c"]:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "notes.txt").write_text("not an image")
    cov = tmp_path / "cov.csv"
    cov.write_text("subject,age,sex\na,30,F\nb,40,M\n")
    dl = build_datalist(tmp_path, val_subjects=["c"], covariates=cov)
    assert [it["subject"] for it in dl["training"]] == ["a", "b"]
    assert dl["training"][1]["age"] == "40" and dl["validation"][0]["subject"] == "c"
    assert len(build_datalist(tmp_path, num_val=1)["validation"]) == 1
    with pytest.raises(VolumeError, match="not found"):
        build_datalist(tmp_path, val_subjects=["zzz"])
    assert [d["image"].endswith(".nii.gz") for d in inference_datalist(str(tmp_path))] == [True] * 3
    with pytest.raises(VolumeError, match="smaller"):
        inference_datalist(str(tmp_path), min_shape=(8, 8, 8))


def test_embedded_sample_is_the_mni_template(mri_dir):
    path = embedded_sample_path()
    vol = load_volume(path)
    manifest = json.loads((mri_dir / "manifest.json").read_text())
    tmpl = next(v for v in manifest["volumes"] if v["file"].startswith("tmpl_mni152"))
    assert vol.data.shape == tuple(tmpl["shape"])
    assert inference_datalist(None)[0]["label"] == str(path)
