"""elastix registration on a real scan: a known rigid motion of a differently degraded copy is recovered."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

from common.transforms import (
    LoadVolumed,
    RegisterToReferenced,
    RegistrationError,
    RicianNoise,
    ThickSlices,
    displacement_field,
    from_itk,
    rough_brain_mask,
    to_itk,
    warp,
)


@pytest.fixture(scope="module")
def reference(mri_dir):
    """dev06 (full head) at 2 mm, scaled to [0, ~1]."""
    scan = LoadVolumed(keys="image")({"image": str(mri_dir / "dev06_myconnectome_siemens_skyra_3T_mprage.nii.gz")})
    x = Spacing(pixdim=(2.0, 2.0, 2.0), mode="bilinear")(scan["image"])
    return x / float(np.percentile(x.numpy(), 99))


def _rigid(image, seed: int):
    """A random rigid transform (up to 8 degrees, 8 mm) about the image centre, in ITK's world frame."""
    import itk

    rng = np.random.default_rng(seed)
    rigid = itk.Euler3DTransform[itk.D].New()
    rigid.SetRotation(*np.deg2rad(rng.uniform(-8, 8, 3)))
    rigid.SetTranslation(rng.uniform(-8, 8, 3).tolist())
    size = np.array(itk.size(image))
    direction = itk.array_from_matrix(image.GetDirection())
    centre = np.array(image.GetOrigin()) + direction @ (np.array(image.GetSpacing()) * (size - 1) / 2)
    rigid.SetCenter(centre.tolist())
    return rigid


def test_known_rigid_motion_recovered(reference):
    import itk

    fixed_image = to_itk(reference)
    rigid = _rigid(fixed_image, seed=3)
    interpolator = itk.LinearInterpolateImageFunction.New(fixed_image)
    moved = itk.resample_image_filter(fixed_image, transform=rigid, use_reference_image=True,
                                      reference_image=fixed_image, interpolator=interpolator)
    # degraded differently: 6 mm slices and Rician noise
    moving = RicianNoise(0.03, seed=1)(ThickSlices(axis=2, thickness=3)(from_itk(moved, like=reference)))
    # a mask of the moving scan follows the same transform with nearest neighbour
    mask = MetaTensor((moving > 0.3).float(), affine=moving.affine)
    out = RegisterToReferenced(keys="image", ref_key="label", follow_keys="mask", stages=("rigid",), resolutions=3,
                               iterations=300)({"image": moving, "label": reference, "mask": mask})
    assert out["image"].shape == reference.shape
    assert torch.allclose(out["image"].affine, reference.affine)
    # fixed point p maps to p + d(p) in the moving image; the rigid motion must take that back to p
    field = displacement_field(out["image_transform"], reference)
    brain = rough_brain_mask(reference[0].numpy(), spacing=2.0)
    index = np.argwhere(brain)[::20]
    residual = []
    for i in index:
        p = np.array(fixed_image.TransformIndexToPhysicalPoint([int(v) for v in i]))
        q = np.array(rigid.TransformPoint((p + field[:, i[0], i[1], i[2]]).tolist()))
        residual.append(np.sum((q - p) ** 2))
    rms = float(np.sqrt(np.mean(residual)))
    assert rms < 0.5 * 2.0, f"RMS residual {rms:.2f} mm over {len(index)} brain voxels"
    # warp() applies the kept transform again: elastix's own moved image, and the mask moved with it
    np.testing.assert_allclose(warp(moving, out["image_transform"]).numpy(), out["image"].numpy(), atol=1e-4)
    moved_mask = out["mask"]
    assert moved_mask.shape == reference.shape and set(np.unique(moved_mask.numpy())) <= {0.0, 1.0}
    volume = abs(float(np.linalg.det(moving.affine.numpy()[:3, :3]))) * float(mask.sum())
    moved_volume = abs(float(np.linalg.det(reference.affine.numpy()[:3, :3]))) * float(moved_mask.sum())
    assert abs(moved_volume - volume) / volume < 0.03


@pytest.mark.parametrize("kind", ["empty", "not a head"])
def test_failed_registration_names_both_files(reference, kind):
    moving = torch.zeros_like(reference)
    if kind == "not a head":
        moving[:, 5:15, 5:15, 5:15] = 1.0  # a 2 cm cube in a corner
    moving = MetaTensor(moving.as_tensor(), affine=reference.affine, meta={"filename_or_obj": "/data/moving.nii.gz"})
    fixed = MetaTensor(reference.as_tensor(), affine=reference.affine, meta={"filename_or_obj": "/data/fixed.nii.gz"})
    with pytest.raises(RegistrationError, match=r"/data/moving.nii.gz.*onto /data/fixed.nii.gz"):
        RegisterToReferenced(keys="image", ref_key="label", stages=("rigid",), resolutions=2, iterations=50)(
            {"image": moving, "label": fixed}
        )
