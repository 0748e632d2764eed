"""Test-wide settings: one thread per process (two processes of two threads each are 3-10x slower here)."""

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

torch.set_num_threads(1)
# threads of the commands a test starts: both cores when the suite runs in one process, one under pytest-xdist
# (`make test` runs two workers on the two cores)
SUBPROCESS_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"

REPO = Path(__file__).resolve().parents[1]
MRI_DIR = REPO.parent / "shared" / "data" / "mri"


@pytest.fixture(scope="session")
def mri_dir() -> Path:
    """The real scans of ../shared/data/mri (skips when the folder is absent)."""
    if not (MRI_DIR / "manifest.json").exists():
        pytest.skip(f"real scans not found at {MRI_DIR}")
    return MRI_DIR


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
