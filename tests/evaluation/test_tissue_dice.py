"""Tissue Dice: 1 for a volume against itself, falling as blur grows."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from common.evaluation import dice_per_class, tissue_dice
from common.transforms import LoadVolumed


def test_dice_per_class_known_values():
    a = np.array([1, 1, 2, 2, 3, 0])
    b = np.array([1, 2, 2, 2, 0, 0])
    out = dice_per_class(a, b)
    assert out["csf"] == pytest.approx(2 / 3) and out["gm"] == pytest.approx(0.8) and out["wm"] == 0.0
    assert dice_per_class(np.zeros(3), np.zeros(3))["csf"] is None
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(np.zeros(3), np.zeros(4))


def test_dice_falls_as_blur_grows(mri_dir):
    scan = LoadVolumed(keys="image")({"image": str(mri_dir / "dev08b_cstar_stroke_t1_brain_8bit.nii.gz")})["image"]
    x = scan[0].numpy()
    brain = x > 0
    assert tissue_dice(x, x, brain) == {"csf": 1.0, "gm": 1.0, "wm": 1.0}
    means = [np.mean(list(tissue_dice(gaussian_filter(x, s), x, brain).values())) for s in (0.5, 1.0, 2.0)]
    assert 1.0 > means[0] > means[1] > means[2], means
