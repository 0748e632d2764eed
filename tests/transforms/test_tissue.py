"""The 3-class tissue model: recovered on a known mixture, segmenting a real brain, and the GMM augmentation."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.transforms import LoadVolumed, RandGMMIntensityd, TissueSegmentd, fit_tissue_model


@pytest.fixture(scope="module")
def mixture():
    """A (1, 30, 30, 30) volume of three classes with known means and stds inside a spherical mask."""
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 4, size=(30, 30, 30))
    means, stds = np.array([0.2, 0.55, 0.85]), np.array([0.04, 0.05, 0.03])
    x = means[labels - 1] + stds[labels - 1] * rng.standard_normal(labels.shape)
    g = np.indices(labels.shape) - 14.5
    mask = (g**2).sum(0) < 14**2
    x[~mask] = 0.0
    return MetaTensor(torch.from_numpy(x.astype(np.float32))[None], affine=torch.eye(4)), mask, labels, means, stds


def test_fit_recovers_known_mixture(mixture):
    x, mask, labels, means, stds = mixture
    model = fit_tissue_model(x, mask)
    np.testing.assert_allclose(model.means, means, atol=0.01)
    np.testing.assert_allclose(model.stds, stds, atol=0.01)
    assert (model.labels[mask] == labels[mask]).mean() > 0.97
    assert (model.labels[~mask] == 0).all()


def test_real_brain_segmentation(mri_dir):
    scan = LoadVolumed(keys="image")({"image": str(mri_dir / "dev08b_cstar_stroke_t1_brain_8bit.nii.gz")})["image"]
    out = TissueSegmentd(keys="image", prior_key=None)({"image": scan, "brain_mask": scan > 0})
    labels, x = out["tissue"][0].numpy(), scan[0].numpy()
    fractions = [(labels == k).sum() / (labels > 0).sum() for k in (1, 2, 3)]
    assert all(0.1 < f < 0.6 for f in fractions), fractions  # each tissue a sizeable part of an adult brain
    assert x[labels == 1].mean() < x[labels == 2].mean() < x[labels == 3].mean()


def test_gmm_identity_when_ranges_are_zero(mixture):
    x, mask, *_ = mixture
    aug = RandGMMIntensityd(keys="image", mean_shift=(0, 0), std_scale=(1, 1))
    aug.set_random_state(0)
    out = aug({"image": x, "brain_mask": torch.from_numpy(mask)[None]})["image"]
    torch.testing.assert_close(out.as_tensor(), x.as_tensor(), atol=1e-6, rtol=0)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, x.affine)


def test_gmm_keeps_zscores_and_class_order(mixture):
    x, mask, *_ = mixture
    model = fit_tissue_model(x, mask)
    for seed in range(5):
        aug = RandGMMIntensityd(keys="image", mean_shift=(-0.2, 0.2), std_scale=(0.7, 1.3))
        aug.set_random_state(seed)
        out = aug({"image": x, "brain_mask": torch.from_numpy(mask)[None]})["image"][0].numpy()
        new_means, new_stds = [], []
        for k in range(3):
            sel = model.labels == k + 1
            z_before = (x[0].numpy()[sel] - model.means[k]) / model.stds[k]
            new_means.append(out[sel].mean())
            new_stds.append(out[sel].std())
            z_after = (out[sel] - new_means[k]) / new_stds[k]
            z_before_centred = (z_before - z_before.mean()) / z_before.std()
            np.testing.assert_allclose(z_after, z_before_centred, atol=1e-3)
        assert np.all(np.diff(new_means) > 0), f"seed {seed}: class order lost {new_means}"
        np.testing.assert_array_equal(out[~mask], 0.0)  # outside the brain unchanged


def test_gmm_deterministic_per_seed(mixture):
    x, mask, *_ = mixture
    outs = []
    for _ in range(2):
        aug = RandGMMIntensityd(keys="image", mean_shift=(-0.1, 0.1))
        aug.set_random_state(7)
        outs.append(aug({"image": x, "brain_mask": torch.from_numpy(mask)[None]})["image"])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], x)
