"""The benchmark command on a small synthetic volume with the interpolation bundle (no weights needed)."""

import nibabel as nib
import numpy as np
import pytest

from common.evaluation import bench


@pytest.fixture
def hr_folder(tmp_path):
    rng = np.random.default_rng(0)
    vol = np.zeros((10, 24, 20), np.float32)
    vol[2:8, 4:20, 4:16] = rng.uniform(50, 100, (6, 16, 12))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "s1.nii.gz")
    return tmp_path


def test_parse_bundle_spec():
    assert bench.parse_bundle_spec("b:mode=cubic,num_steps=4,scale_factor=[1,2,2]") == (
        "b", {"mode": "cubic", "num_steps": 4, "scale_factor": [1, 2, 2]})


@pytest.mark.parametrize("pad_to, shape", [(None, "10x24x20"), ((16, 16, 32), "16x24x32")])
def test_run_rows(hr_folder, pad_to, shape):
    files = sorted(hr_folder.glob("*.nii.gz"))
    ref, keys, bspline, linear = bench.run(["brain_mri_interpolation_super_resolution:mode=bspline",
                                            "brain_mri_interpolation_super_resolution:mode=linear"], files, pad_to=pad_to)
    assert [ref["bundle"], keys["bundle"]] == ["interpolation: cubic B-spline", "interpolation: Keys cubic"]
    assert bspline["shape"] == linear["shape"] == ref["shape"] == shape
    # the gains are over the cubic B-spline: the B-spline bundle gains nothing, and equals the reference row
    assert bspline["delta_psnr_mask"] == pytest.approx(0.0, abs=1e-6) and ref["delta_psnr_mask"] == 0.0
    assert bspline["psnr_mask"] == pytest.approx(ref["psnr_mask"])
    assert keys["delta_psnr_mask"] == pytest.approx(keys["psnr_mask"] - ref["psnr_mask"]) != 0.0
    assert linear["psnr"] != bspline["psnr"] and bspline["peak_rss_mb"] > 0 and "s_per_volume" not in ref
    table = bench.format_table([ref, keys, bspline, linear])
    assert table.count("\n") == 5 and "Δ PSNR vs B-spline" in table and "| n/a |" in table


def test_per_subject_rows(hr_folder):
    """``per_subject``: one row per volume above each mean row (baselines included); the mean is their mean."""
    vol = nib.load(hr_folder / "s1.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(vol.dataobj)[::-1].copy(), np.eye(4)), hr_folder / "s2.nii.gz")
    files = sorted(hr_folder.glob("*.nii.gz"))
    rows = bench.run(["brain_mri_interpolation_super_resolution:mode=linear"], files, per_subject=True)
    assert [(r["bundle"].split(":")[0], r["subject"]) for r in rows] == [
        ("interpolation", "s1"), ("interpolation", "s2"), ("interpolation", "mean"),
    ] * 2 + [("brain_mri_interpolation_super_resolution", s) for s in ("s1", "s2", "mean")]
    linear = rows[-3:]
    assert linear[2]["psnr_mask"] == pytest.approx((linear[0]["psnr_mask"] + linear[1]["psnr_mask"]) / 2)
    assert linear[2]["volumes"] == 2
    means = bench.run(["brain_mri_interpolation_super_resolution:mode=linear"], files)
    assert [r["subject"] for r in means] == ["mean"] * 3


def test_extra_config_files(tmp_path):
    """``config=`` merges a bundle's extra config after inference.json (the 2.5D regression baseline)."""
    parser = bench.load_bundle("brain_mri_edm25d_super_resolution", {"config": "configs/regression.json",
                                                                     "model_path": str(tmp_path / "w.pt")})
    assert type(parser.get_parsed_content("network_def")).__name__ == "RegressionSR"
    with pytest.raises(SystemExit, match="nope.json"):
        bench.load_bundle("brain_mri_edm25d_super_resolution", {"config": "configs/nope.json"})


def test_edge_gains_split_the_mask():
    """SR = the reference interpolation in the 2-voxel boundary band and closer to HR inside: no gain at the edge, a gain inside."""
    rng = np.random.default_rng(0)
    hr = np.zeros((12, 12, 12), np.float32)
    hr[1:11, 1:11, 1:11] = rng.uniform(0.2, 1.0, (10, 10, 10))
    mask = hr > 0
    bicubic = hr + rng.normal(0, 0.05, hr.shape).astype(np.float32)
    depth_inner = np.zeros_like(mask)
    depth_inner[3:9, 3:9, 3:9] = True  # depth > 2 inside the 10-voxel cube
    sr = np.where(depth_inner, hr + (bicubic - hr) / 2, bicubic)
    gains = bench.edge_gains({"SR": sr, "bspline": bicubic, "HR": hr}, mask, 2)
    assert gains["delta_psnr_edge"] == pytest.approx(0.0, abs=1e-9)
    assert gains["delta_psnr_inner"] == pytest.approx(20 * np.log10(2), abs=1e-3)  # half the error: +6.02 dB
    table = bench.format_table([{"bundle": "b", **gains}])
    assert "Δ PSNR edge" in table and "+6.02" in table
    # a mask with no voxel outside (a crop inside the head) has no boundary band
    inside = bench.edge_gains({"SR": sr, "bspline": bicubic, "HR": hr}, np.ones_like(mask), 2)
    assert "delta_psnr_edge" not in inside and "delta_psnr_inner" in inside


def test_mean_row_of_different_shapes():
    rows = [{"bundle": "b", "subject": s, "shape": shape, "psnr": p, "peak_rss_mb": m}
            for s, shape, p, m in (("a", "4x4x4", 20.0, 10.0), ("b", "8x8x8", 30.0, 5.0))]
    mean = bench._mean_row("b", rows)
    assert mean == {"bundle": "b", "subject": "mean", "volumes": 2, "shape": "various", "psnr": 25.0,
                    "peak_rss_mb": 10.0}
    assert bench._mean_row("b", rows[:1])["shape"] == "4x4x4"


def test_tissue_dice_columns_with_a_brain(tmp_path, mri_dir):
    """``brain_mask="nonzero"`` on a skull-stripped real crop: SR and baselines get a tissue Dice per class."""
    img = nib.load(str(mri_dir / "dev08b_cstar_stroke_t1_brain_8bit.nii.gz"))
    crop = np.asarray(img.dataobj, dtype=np.float32)[50:70, 30:130, 30:110]
    nib.save(nib.Nifti1Image(crop, img.affine), tmp_path / "brain.nii.gz")
    ref, keys, linear = bench.run(["brain_mri_interpolation_super_resolution:mode=linear"],
                                  [tmp_path / "brain.nii.gz"], brain_mask="nonzero")
    for row in (ref, keys, linear):
        assert all(0.3 < row[f"tissue_dice_{k}"] < 1.0 for k in ("csf", "gm", "wm")), row
    assert "Dice GM" in bench.format_table([ref, keys, linear])
    plain = bench.run(["brain_mri_interpolation_super_resolution:mode=linear"], [tmp_path / "brain.nii.gz"])
    assert "tissue_dice_gm" not in plain[-1] and "Dice GM" not in bench.format_table(plain)


def test_atlas_brain_mask_needs_whole_volumes(tmp_path):
    """``brain_mask="atlas"`` registers the atlas onto whole volumes: a slab or a padded volume is refused."""
    with pytest.raises(ValueError, match="whole volumes"):
        bench.run(["brain_mri_interpolation_super_resolution"], [tmp_path / "x.nii.gz"], slices=8,
                  brain_mask="atlas")


def test_labels_and_zoomed_crop_figure(hr_folder, tmp_path):
    """A ``label=`` override names the bundle's row; ``figure`` draws HR, the B-spline and each bundle."""
    rows = bench.run(["brain_mri_interpolation_super_resolution:mode=linear,label=linear",
                      "brain_mri_interpolation_super_resolution:mode=nearest,label=nearest"],
                     sorted(hr_folder.glob("*.nii.gz")), figure=str(tmp_path / "crops.png"))
    assert [r["bundle"] for r in rows[-2:]] == ["linear", "nearest"]
    assert (tmp_path / "crops.png").stat().st_size > 1000
