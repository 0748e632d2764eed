"""The real-input figure (common.evaluation.real_input) with the interpolation bundle on a small volume."""

import json

import nibabel as nib
import numpy as np
import pytest

from common.evaluation.real_input import main


def test_real_input_figure(tmp_path):
    rng = np.random.default_rng(0)
    vol = np.zeros((6, 12, 10), np.float32)
    vol[1:5, 2:10, 2:8] = rng.uniform(50, 100, (4, 8, 6))
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "lr.nii.gz")
    out = tmp_path / "fig.png"
    result = main(["--bundle", "brain_mri_interpolation_super_resolution:mode=bspline", "--input",
                   str(tmp_path / "lr.nii.gz"), "--output", str(out)])
    assert out.stat().st_size > 1000 and json.dumps(result)
    dc = result["data_consistency"]
    # the bundle in B-spline mode is the B-spline row itself; neither reproduces the block average exactly
    assert dc["sr"] == pytest.approx(dc["bspline"]) and dc["sr"] > 0
    linear = main(["--bundle", "brain_mri_interpolation_super_resolution:mode=nearest", "--input",
                   str(tmp_path / "lr.nii.gz"), "--output", str(tmp_path / "n.png")])
    assert linear["data_consistency"]["sr"] == pytest.approx(0.0, abs=1e-6)  # nearest, then block average: LR again
