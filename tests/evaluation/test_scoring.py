"""The evaluation path: simulated LR kept in its units, and the bicubic baseline of :func:`common.evaluation.score_sr`."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import decollate_batch, list_data_collate

from common.evaluation.scoring import _item_units, score_sr
from common.transforms.degrade import BlockAverage
from common.transforms.pipelines import inference_preprocessing
from common.transforms.upsample import GridUpsample


@pytest.fixture
def hr_path(tmp_path):
    """A 12 x 16 x 16 head-like volume with a few voxels far above the 99th percentile (e.g. enhancement)."""
    rng = np.random.default_rng(0)
    vol = rng.uniform(50, 100, (12, 16, 16)).astype(np.float32)
    vol[:, :2] = 0.0
    vol[6, 8:10, 8:10] = 1000.0
    path = tmp_path / "hr.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 1.0, 1.0])), path)
    return path


@pytest.mark.parametrize("clip", [True, False])
def test_units_survive_clipping(hr_path, clip):
    item = inference_preprocessing((1, 2, 2), clip=clip)({"label": str(hr_path)})
    expected = BlockAverage((1, 2, 2))(torch.as_tensor(np.asarray(item["label"])))
    assert float(item["image"].max()) <= 1.0 or not clip
    assert ("image_units" in item) == clip
    item["pred"] = torch.zeros((1, 12, 16, 16))
    batch = decollate_batch(list_data_collate([item]))[0]
    _, lr = _item_units(batch)
    # clipped scaling cannot be inverted: without the kept copy the 1000-valued voxels would come back lower
    np.testing.assert_allclose(lr, np.asarray(expected)[0], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("mode", ["bspline", "cubic"])
def test_interpolation_baselines_score_equal(hr_path, mode):
    """An SR volume equal to a baseline scores as that baseline; the gains are over the cubic B-spline."""
    item = inference_preprocessing((1, 2, 2))({"label": str(hr_path)})
    lr = np.asarray(item["image_units"])[0]
    hr = np.asarray(item["label"])[0]
    up = GridUpsample((1, 2, 2), mode)(torch.from_numpy(lr)[None, None])[0, 0].numpy()
    scored = score_sr(up, hr, lr, (1, 2, 2), subject="s")
    assert scored.sr["psnr"] == pytest.approx(scored.baselines[mode]["psnr"])
    assert scored.gains(mode)["delta_psnr"] == pytest.approx(0.0, abs=1e-9)
    reference = scored.as_json()
    assert reference["reference"] == "bspline" and set(reference) >= {"bspline", "cubic", "sr"}
    expected = 0.0 if mode == "bspline" else scored.baselines["cubic"]["psnr"] - scored.baselines["bspline"]["psnr"]
    assert reference["delta_psnr"] == pytest.approx(expected, abs=1e-9)
    better = score_sr(hr, hr, lr, (1, 2, 2), subject="s")
    assert better.as_json()["delta_psnr_mask"] > 0
