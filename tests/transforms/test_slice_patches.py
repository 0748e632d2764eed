"""2.5D slice patches (common.transforms.slices) and the HR crop to the LR grid."""

from __future__ import annotations

import pytest
import torch

from common.transforms.pipelines import CropHRToLRd
from common.transforms.slices import RandSlicePatchd, SliceForegroundd


def _slice_volume(n=6, size=(8, 10)):
    """Slice i holds the value i / 10 everywhere (so every slice is foreground above 0.1 except slice 0, 1)."""
    vol = torch.arange(n, dtype=torch.float32).view(1, n, 1, 1).expand(1, n, *size) / 10
    return {"label": vol.clone(), "image_up": vol.clone() + 0.5}


@pytest.mark.parametrize("offsets", [(-1, 0), (-1, 0, 1)])
def test_rand_slice_patch_neighbours_and_alignment(offsets):
    data = SliceForegroundd("label")(_slice_volume())
    t = RandSlicePatchd(patch_size=(4, 4), offsets=offsets, scale_factor=(1, 2, 2), num_samples=40)
    t.set_random_state(0)
    out = t(data)
    assert len(out) == 40
    for item in out:
        assert item["image"].shape == (len(offsets), 4, 4) and item["label"].shape == (1, 4, 4)
        i = round(item["label"][0, 0, 0].item() * 10)
        assert i >= 2  # slices 0 and 1 are below the foreground threshold
        sources = [min(max(i + o, 0), 5) for o in offsets]
        torch.testing.assert_close(item["image"][:, 0, 0], torch.tensor(sources, dtype=torch.float32) / 10 + 0.5)


def test_rand_slice_patch_aligned_start_and_padding():
    vol = torch.arange(12 * 14, dtype=torch.float32).view(1, 1, 12, 14).expand(1, 3, 12, 14) / 1000 + 0.2
    t = RandSlicePatchd(patch_size=(6, 6), scale_factor=(2, 2), pos_fraction=0.0)
    t.set_random_state(1)
    for _ in range(20):
        item = t({"label": vol, "image_up": vol})
        first = round((item["label"][0, 0, 0].item() - 0.2) * 1000)
        row, col = divmod(first, 14)
        assert row % 2 == 0 and col % 2 == 0
    small = RandSlicePatchd(patch_size=(16, 16))({"label": vol, "image_up": vol})
    assert small["label"].shape == (1, 16, 16) and small["label"][0, 15, 15] == 0


def test_crop_hr_to_lr():
    out = CropHRToLRd((1, 2, 2))({"image": torch.zeros(1, 3, 4, 5), "label": torch.zeros(1, 3, 9, 11)})
    assert out["label"].shape == (1, 3, 8, 10)
