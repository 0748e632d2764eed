"""The benchmark command on a small synthetic volume with the interpolation bundle (no weights needed)."""

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.evaluation import bench, command_timing


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


def test_crop_keeps_the_central_box(hr_folder, tmp_path):
    """``crop``: the central box of each HR volume (an axis shorter than the box is kept whole), scored like a slab;
    the command run by ``command_time`` gets the same box (its shape is checked against the benchmark's)."""
    files = sorted(hr_folder.glob("*.nii.gz"))
    *_, row = bench.run(["brain_mri_interpolation_super_resolution"], files, crop=(6, 16, 40), command_time=True,
                        command_output=tmp_path / "out")
    assert row["shape"] == "6x16x20" and row["command_s"] > 0
    sr = nib.load(next((tmp_path / "out").rglob("s1_sr.nii.gz")))
    assert sr.shape == (6, 16, 20) and sr.affine[0, 3] == pytest.approx(2.0)  # the box starts at voxel 2 of axis 0


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


@pytest.mark.parametrize("value", [False, True, None, "linear", "a,b", "$@bundle_root + '/x.pt'", [1, 2, 2],
                                   [False, True], {"age": 40, "sex": None}, 0.5])
def test_cli_values_read_back_unchanged(value):
    """The command's overrides read back as given by MONAI's CLI parser (python-fire); JSON would not for booleans."""
    from fire.parser import DefaultParseValue

    assert DefaultParseValue(command_timing.cli_value(value)) == value
    assert DefaultParseValue(json.dumps([False, True])) == ["false", "true"]  # why not JSON: truthy strings


@pytest.mark.parametrize("scale", [(1, 2, 2), (2, 3, 1)])
def test_lr_affine_centres_the_blocks(scale):
    """Each LR voxel sits at the mean position of the HR voxels it averages (block average geometry)."""
    rng = np.random.default_rng(1)
    hr = np.eye(4)
    hr[:3] = rng.normal(size=(3, 4))
    lr = command_timing.lr_affine(hr, scale)
    for ijk in [(0, 0, 0), (2, 1, 3)]:
        block = np.stack(np.meshgrid(*[np.arange(i * f, (i + 1) * f) for i, f in zip(ijk, scale)], indexing="ij"), -1)
        centre = (hr[:3, :3] @ block.reshape(-1, 3).T).mean(1) + hr[:3, 3]
        np.testing.assert_allclose(lr[:3, :3] @ ijk + lr[:3, 3], centre, atol=1e-12)


def test_run_command_measures_each_command_alone(tmp_path):
    """os.wait4 gives each command its own peak memory (RUSAGE_CHILDREN would keep the largest so far), its exit
    code and its output."""
    big = command_timing.run_command([sys.executable, "-c", "b = b'x' * (300 << 20); print('big')"])
    small = command_timing.run_command([sys.executable, "-c", "import sys; print('small'); sys.exit(3)"])
    assert big.returncode == 0 and big.peak_rss_mb > 300 and "big" in big.log
    assert small.returncode == 3 and small.peak_rss_mb < 100 and "small" in small.log
    assert 0 < small.seconds < 30


@pytest.fixture
def oblique_folder(tmp_path):
    """The synthetic volume of ``hr_folder`` with anisotropic spacing and an origin away from zero."""
    rng = np.random.default_rng(0)
    vol = np.zeros((10, 24, 20), np.float32)
    vol[2:8, 4:20, 4:16] = rng.uniform(50, 100, (6, 16, 12))
    affine = np.diag([0.9, 1.1, 1.2, 1.0])
    affine[:3, 3] = [-10.0, 12.0, 30.0]
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "s1.nii.gz")
    return tmp_path


def test_command_time(oblique_folder, tmp_path):
    """``command_time``: each bundle's inference command runs on the written LR file, with the spec's overrides on
    its command line; it takes longer than the in-memory inferer call and writes the SR volume on the HR grid."""
    files = [oblique_folder / "s1.nii.gz"]
    out = tmp_path / "out"
    *_, bspline, linear = bench.run(["brain_mri_interpolation_super_resolution",
                                     "brain_mri_interpolation_super_resolution:mode=linear,label=lin"],
                                    files, pad_to=(16, 16, 32), command_time=True, command_output=out)
    for row in (bspline, linear):
        assert row["command_s"] > row["s_per_volume"] > 0 and row["command_rss_mb"] > 0
        assert row["network_calls"] == 1
    written = [nib.load(str(out / folder / "s1_sr.nii.gz")) for folder in
               ("0_brain_mri_interpolation_super_resolution", "1_lin")]
    hr_affine = nib.load(str(files[0])).affine.copy()
    hr_affine[:3, 3] -= hr_affine[:3, :3] @ [3, 0, 6]  # the centred padding of 10x24x20 to 16x24x32
    for img in written:
        assert img.shape == (16, 24, 32)
        np.testing.assert_allclose(img.affine, hr_affine, atol=1e-4)
    assert not np.allclose(*(np.asarray(img.dataobj) for img in written))  # mode=linear reached the command
    table = bench.format_table([bspline, linear])
    assert "| s command |" in table and "command peak RSS MiB" in table and "s command min" not in table
    plain = [{k: v for k, v in row.items() if not k.startswith("command")} for row in (bspline, linear)]
    assert "s command" not in bench.format_table(plain) and "network calls" in bench.format_table(plain)


def test_command_repeats_report_the_median_and_range(oblique_folder, monkeypatch):
    """``command_repeats``: the command runs that many times; the row has the median, the minimum and the maximum
    of the runs' wall times and the largest peak memory."""
    runs = iter([(3.0, 100.0), (1.0, 300.0), (2.0, 200.0)])
    real = command_timing.run_command

    def scripted(argv, env=None, cwd=None):  # the real command, with scripted figures in place of its own
        result = real(argv, env=env, cwd=cwd)
        seconds, rss = next(runs)
        return command_timing.CommandResult(seconds, rss, result.returncode, result.log)

    monkeypatch.setattr(command_timing, "run_command", scripted)
    *_, row = bench.run(["brain_mri_interpolation_super_resolution"], [oblique_folder / "s1.nii.gz"],
                        pad_to=(16, 16, 32), command_time=True, command_repeats=3)
    assert (row["command_s"], row["command_s_min"], row["command_s_max"]) == (2.0, 1.0, 3.0)
    assert row["command_rss_mb"] == 300.0
    assert "| s command | s command min | s command max |" in bench.format_table([row])
    with pytest.raises(ValueError, match="repeats"):
        bench.run(["brain_mri_interpolation_super_resolution"], [oblique_folder / "s1.nii.gz"],
                  pad_to=(16, 16, 32), command_time=True, command_repeats=0)


def test_network_calls_and_share_of_peak(hr_folder):
    """The counter counts the network's calls (the 2D U-Net: one per slice batch of the 10 slices); with a peak,
    GFLOP/s become a share of the peak of the bundle's dtype (amp: bf16)."""
    peak = {"fp32": 50.0, "bf16": 200.0}
    rows = bench.run(["brain_mri_attention_unet_super_resolution:slice_batch=4,progress=false",
                      "brain_mri_attention_unet_super_resolution:slice_batch=8,progress=false",
                      "brain_mri_interpolation_super_resolution"],
                     sorted(hr_folder.glob("*.nii.gz")), pad_to=(10, 32, 32), count_flops=True, peak=peak)
    batch4, batch8, interpolation = rows[-3:]
    assert [batch4["network_calls"], batch8["network_calls"], interpolation["network_calls"]] == [3, 2, 1]
    assert batch4["s_per_call"] == pytest.approx(batch4["s_per_volume"] / 3)
    assert batch4["peak_dtype"] == "bf16" and interpolation["peak_dtype"] == "fp32"
    assert batch4["peak_pct"] == pytest.approx(batch4["gflop_per_s"] / 2) and batch4["gflop_per_s"] > 0
    assert interpolation["peak_pct"] == pytest.approx(interpolation["gflop_per_s"] * 2)
    assert "% of peak" in bench.format_table(rows)


def test_matmul_peak_gflops():
    peak = bench.matmul_peak_gflops(size=128, repeats=2)
    assert set(peak) == {"fp32", "bf16"} and all(0 < v < 1e5 for v in peak.values())


def test_inference_command_line():
    """Bench-only keys stay off the command line: ``config=`` files join inference.json in --config_file (a list),
    ``label=`` names the row only; the other overrides are ``--key value``."""
    from fire.parser import DefaultParseValue

    argv = command_timing.inference_command("brain_mri_edm25d_super_resolution", {
        "config": "configs/regression.json", "label": "regression", "num_steps": 4, "amp": False}, "in", "out")
    options = dict(zip(argv[4::2], argv[5::2]))
    assert argv[1:4] == ["-m", "monai.bundle", "run"] and "--label" not in options and "--config" not in options
    assert [Path(c).name for c in DefaultParseValue(options["--config_file"])] == ["inference.json", "regression.json"]
    assert DefaultParseValue(options["--num_steps"]) == 4 and DefaultParseValue(options["--amp"]) is False
    assert (options["--dataset_dir"], options["--output_dir"]) == ("in", "out")
    assert command_timing.inference_command("brain_mri_interpolation_super_resolution", {}, "in", "out")[5].endswith(
        "configs/inference.json")


def test_help_lists_the_speed_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(f in out for f in ("--command_time", "--command_output", "--peak"))
