"""Paired LR/HR patches (common.transforms.patches)."""

import pytest
import torch

from common.transforms.degrade import BlockAverage
from common.transforms.patches import RandPairedPatchd


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
