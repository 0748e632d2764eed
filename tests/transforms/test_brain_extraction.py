"""Atlas brain extraction on real scans: against the published brain of a skull-stripped scan, and within human
bounds on a full head."""

import numpy as np
import torch

from common.transforms import (
    TISSUES,
    AtlasBrainMaskd,
    LoadVolumed,
    brain_mask_from_priors,
    head_mask,
    mni152_atlas,
)


def _load(mri_dir, name):
    return LoadVolumed(keys="image")({"image": str(mri_dir / f"{name}.nii.gz")})["image"]


def _ml(mask, volume) -> float:
    return float(mask.sum()) * abs(float(np.linalg.det(volume.affine.numpy()[:3, :3]))) / 1000.0


def test_atlas_maps():
    atlas = mni152_atlas()
    prob = sum(atlas[k] for k in TISSUES)
    assert float(prob.max()) <= 1.0 + 1e-5 and float(prob.min()) >= 0.0
    # CSF lies where neither GM nor WM is: MNI (0, 0, 0), in the third ventricle
    index = np.round(np.linalg.inv(atlas["csf"].affine.numpy()) @ [0.0, 0.0, 0.0, 1.0])[:3].astype(int)
    assert float(atlas["csf"][(0, *index)]) > 0.5


def test_skull_stripped_scan_matches_its_published_brain(mri_dir):
    """dev08b was brain-extracted by its publishers (C-STAR): its non-zero voxels are the reference brain."""
    scan = _load(mri_dir, "dev08b_cstar_stroke_t1_brain_8bit")
    out = AtlasBrainMaskd(keys="image", skull_stripped=True, iterations=100, working_spacing=3.0)({"image": scan})
    mask, reference = out["brain_mask"][0].numpy() > 0, scan[0].numpy() > 0
    dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    assert dice > 0.93, f"Dice {dice:.3f} with the published brain"
    assert {f"prior_{k}" for k in TISSUES} <= set(out)


def test_full_head_within_human_bounds(mri_dir):
    scan = _load(mri_dir, "dev06_myconnectome_siemens_skyra_3T_mprage")  # adult man, full head and neck
    out = AtlasBrainMaskd(keys="image", iterations=100, apply=True)({"image": scan})
    with_csf = out["brain_mask"][0].numpy() > 0
    head = head_mask(scan[0].numpy())
    assert 1100 < _ml(with_csf, scan) < 1900  # adult intracranial volumes lie in 1.2-1.8 l
    assert not (with_csf & ~head).any()
    assert float(out["image"][0][~torch.from_numpy(with_csf)].abs().max()) == 0.0  # applied: the rest is zeroed
    priors = {k: out[f"prior_{k}"] for k in TISSUES}
    tissue = brain_mask_from_priors(priors, keep_csf=False)[0].numpy() > 0
    assert 0.6 * with_csf.sum() < tissue.sum() < with_csf.sum()
