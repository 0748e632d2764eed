"""Percentile scaling and its inverse (common.transforms.intensity)."""

import numpy as np
import torch
from monai.data import MetaTensor

from common.transforms.degrade import BlockAverage
from common.transforms.intensity import PercentileNormalize, PercentileNormalized, invert_normalization


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
