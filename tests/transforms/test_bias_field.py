"""N4 bias-field correction on a real scan: a known smooth multiplicative field is removed."""

import numpy as np
import pytest
import torch

from common.transforms import N4_THESIS, LoadVolumed, N4BiasFieldCorrectiond, n4_bias_field


def _smooth_field(shape) -> np.ndarray:
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.exp(0.25 * g[0] + 0.2 * g[1] ** 2 - 0.15 * g[2] + 0.1 * g[0] * g[2]).astype(np.float32)


@pytest.fixture(scope="module")
def biased(mri_dir):
    """dev03 (skull-stripped: its non-zero voxels are the brain) times a smooth field of +-30 %."""
    scan = LoadVolumed(keys="image")({"image": str(mri_dir / "dev03_mr_gd_skullstripped_ce_t1.nii.gz")})["image"]
    field = torch.from_numpy(_smooth_field(scan.shape[1:]))[None]
    return scan, scan * field, scan[0].numpy() > 0


def test_thesis_defaults():
    assert N4_THESIS == {"shrink_factor": 4, "iterations": (150, 150, 150, 150), "convergence_threshold": 1e-7,
                         "wiener_filter_noise": 0.1, "bias_field_fwhm": 0.18}


def test_synthetic_field_removed(biased):
    scan, corrupted, brain = biased
    # the thesis's settings with a shorter schedule (3 levels of 20 iterations) to keep the test to seconds
    out = N4BiasFieldCorrectiond(keys="image", mask_key="mask", field_key="field", iterations=(20, 20, 20))(
        {"image": corrupted, "mask": torch.from_numpy(brain)[None]}
    )
    corrected = out["image"][0].numpy()
    original, biased_arr = scan[0].numpy(), corrupted[0].numpy()
    wm = brain & (original > np.percentile(original[brain], 70))  # the brightest tissue: white matter (and vessels)

    def cv(a):
        return a[wm].std() / a[wm].mean()

    def corr(a):
        return np.corrcoef(a[brain], original[brain])[0, 1]

    # the white-matter coefficient of variation falls back to within a quarter of the way to the biased one's
    assert cv(biased_arr) > cv(original) + 0.02
    assert cv(corrected) < cv(original) + 0.25 * (cv(biased_arr) - cv(original))
    assert corr(corrected) > corr(biased_arr) + 0.03
    assert out["image_field"].shape == scan.shape
    assert torch.allclose(out["image"].affine, scan.affine)


def test_empty_mask_is_an_error(biased):
    scan, _, _ = biased
    with pytest.raises(ValueError, match="mask is empty"):
        n4_bias_field(scan, mask=torch.zeros(scan.shape), iterations=(1,))
