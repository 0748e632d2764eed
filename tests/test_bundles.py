"""The bundle contract (../shared/spec/bundles.md), checked for every folder under bundles/ through MONAI's own CLI.

A new bundle is covered the day it lands: each check is parametrised over the bundles found. Learned bundles
(with configs/train.json) also get evaluate.json on top of train.json, checkpoint export and a two-process CPU run
of multi_gpu_train.json (their training, resume and fault tests are in tests/test_bundle_reliability.py); the
overrides for those tiny runs come from the bundle's ``configs/test_overrides.json`` (small sizes only, never other
behaviour).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys

import nibabel as nib
import numpy as np
import pytest
import yaml

from bundle_cli import (
    BUNDLES, IDS, LEARNED, LEARNED_IDS, SCHEMA, bundle_cli, default_weights, fov_corners, infer, ok, overrides,
    train_args,
)
from conftest import REPO


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_bundle_files(bundle):
    for rel in ["LICENSE", "configs/metadata.json", "configs/inference.json", "configs/logging.conf",
                "large_files.yml", "docs/README.md", "docs/data_license.txt"]:
        assert (bundle / rel).is_file(), f"{bundle.name}: missing {rel}"
    if (bundle / "configs" / "train.json").is_file():
        for rel in ["configs/evaluate.json", "configs/multi_gpu_train.json", "models/model.pt"]:
            assert (bundle / rel).is_file(), f"{bundle.name}: a learned bundle needs {rel}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_large_files_hashes(bundle):
    """Every weights file in models/ is listed in large_files.yml, and each listed file has the listed sha256."""
    entries = yaml.safe_load((bundle / "large_files.yml").read_text()).get("large_files") or []
    listed = {e["path"] for e in entries}
    shipped = {f"models/{p.name}" for p in (bundle / "models").glob("*.pt")} if (bundle / "models").is_dir() else set()
    assert shipped <= listed, f"{bundle.name}: weights not in large_files.yml: {sorted(shipped - listed)}"
    for entry in entries:
        path = bundle / entry["path"]
        assert path.is_file(), f"{bundle.name}: large_files.yml lists a missing file {entry['path']}"
        assert entry["hash_type"] == "sha256"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["hash_val"], f"{path}: sha256 differs"


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_verify_metadata(bundle):
    assert SCHEMA.is_file(), f"offline schema copy missing: {SCHEMA}"
    ok(bundle_cli("verify_metadata", "--meta_file", str(bundle / "configs/metadata.json"), "--filepath", str(SCHEMA)))


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_verify_net_in_out(bundle):
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    if "network_def" not in config:
        pytest.skip("no network in this bundle")
    ok(bundle_cli("verify_net_in_out", "--net_id", "network_def", "--meta_file",
                  str(bundle / "configs/metadata.json"), "--config_file", str(bundle / "configs/inference.json"),
                  "--bundle_root", str(bundle), bundle=bundle))


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_ckpt_export(bundle, tmp_path):
    if not (bundle / "models" / "model.pt").is_file():
        pytest.skip("no trained weights in this bundle")
    out = tmp_path / "model.ts"
    ok(bundle_cli("ckpt_export", "--net_id", "network_def", "--filepath", str(out),
                  "--ckpt_file", str(default_weights(bundle)), "--meta_file", str(bundle / "configs/metadata.json"),
                  "--config_file", str(bundle / "configs/inference.json"), "--bundle_root", str(bundle),
                  "--use_trace", "True", bundle=bundle))
    assert out.stat().st_size > 0


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_inference_contract(bundle, small_volume, tmp_path):
    out_dir = tmp_path / "out"
    ok(infer(bundle, small_volume, out_dir))
    src = nib.load(str(small_volume / "crop_dev03.nii.gz"))
    out = nib.load(str(out_dir / "crop_dev03_sr.nii.gz"))
    assert out.get_data_dtype() == np.float32
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)  # the input's orientation
    # x2 on the in-plane RAS axes A and S: in this file's (A, S, L) order, the first two axes
    assert out.shape == (src.shape[0] * 2, src.shape[1] * 2, src.shape[2])
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0),
                               np.linalg.norm(src.affine[:3, :3], axis=0) / [2, 2, 1], atol=1e-6)
    # half-voxel rule: the HR grid covers exactly the LR field of view
    np.testing.assert_allclose(np.sort(fov_corners(out.affine, out.shape), 0),
                               np.sort(fov_corners(src.affine, src.shape), 0), atol=1e-5)
    # intensities in the input's units, not [0, 1]
    sr, lr = np.asarray(out.dataobj), np.asarray(src.dataobj, dtype=np.float32)
    assert np.isfinite(sr).all() and abs(np.percentile(sr, 99) - np.percentile(lr, 99)) < 0.2 * np.percentile(lr, 99)
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_embedded_sample_demo(bundle, tmp_path):
    """No --dataset_dir: the embedded MNI152 sample, degraded x2, gives SR + preview + metrics."""
    out_dir = tmp_path / "demo"
    ok(infer(bundle, None, out_dir))
    stem = "mni_icbm152_t1_tal_nlin_sym_09a_converted"
    for suffix in ["_sr.nii.gz", "_lr.nii.gz", "_preview.png", "_metrics.json"]:
        assert (out_dir / f"{stem}{suffix}").is_file(), suffix
    scores = json.loads((out_dir / f"{stem}_metrics.json").read_text())
    assert scores["sr"]["psnr_mask"] > 20 and scores["bspline"]["psnr_mask"] > 20 and scores["reference"] == "bspline"


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_evaluate(bundle, small_volume, tmp_path):
    """evaluate.json (on top of train.json for learned bundles) writes metric tables and report figures."""
    configs = [bundle / "configs" / name for name in ("train.json", "evaluate.json")]
    configs = [str(c) for c in configs if c.is_file()]
    if not configs or not configs[-1].endswith("evaluate.json"):
        pytest.skip("no evaluate.json")
    config_arg = configs[0] if len(configs) == 1 else json.dumps(configs)
    out_dir = tmp_path / "eval"
    ok(bundle_cli("run", "--config_file", config_arg, "--bundle_root", str(bundle), "--dataset_dir",
                    str(small_volume), "--output_dir", str(out_dir), *overrides(bundle)))
    table = json.loads((out_dir / "metrics_per_subject.json").read_text())
    assert table["subjects"][0]["subject"] == "crop_dev03" and table["mean"]["psnr_mask"] > 15
    for fig in ["bars.png", "three_view.png", "error_heatmap.png", "per_slice_psnr.png", "per_subject_psnr.png"]:
        assert (out_dir / fig).stat().st_size > 1000, fig
    for baseline in ("bspline", "cubic"):  # the reference interpolant and Keys cubic, beside the method
        assert json.loads((out_dir / f"{baseline}_per_subject.json").read_text())["mean"]["psnr_mask"] > 15


# inference settings evaluate.json may leave out: the U-Net's covariates are one person's (evaluation leaves them
# unknown for every person); progress lines are always on in evaluation
EVALUATE_MAY_OMIT = {"covariates", "progress"}


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_evaluate_inferer_takes_the_inference_settings(bundle):
    """evaluate.json's inferer takes every setting the inference inferer does, from a key of the same name with the
    same default, so ``--num_steps 4`` evaluates what inference would run, never the class default."""
    from monai.bundle import ConfigParser

    configs = [bundle / "configs" / name for name in ("train.json", "evaluate.json")]
    if not configs[-1].is_file():
        pytest.skip("no evaluate.json")
    evaluate, inference = ConfigParser(), ConfigParser()
    evaluate.read_config([str(c) for c in configs if c.is_file()])
    inference.read_config(str(bundle / "configs/inference.json"))
    if "validate#inferer" not in evaluate:
        pytest.skip("evaluate.json runs no network inferer")
    validate, infer_ = evaluate["validate#inferer"], inference["inferer"]
    assert validate["_target_"] == infer_["_target_"]
    for key, value in infer_.items():
        if key in EVALUATE_MAY_OMIT:
            continue
        assert validate.get(key) == value, f"validate#inferer {key}: {validate.get(key)!r}, inference: {value!r}"
        if isinstance(value, str) and value.startswith("@"):
            name = value[1:]
            assert name in evaluate, f"evaluate.json refers to @{name}, which it does not define"
            assert evaluate[name] == inference[name], f"{name}: {evaluate[name]!r} in evaluate, {inference[name]!r}"


@pytest.mark.parametrize("bundle", LEARNED, ids=LEARNED_IDS)
def test_multi_gpu_train_on_cpu(bundle, small_training_set, tmp_path):
    """multi_gpu_train.json on top of train.json, two processes with the gloo backend."""
    configs = json.dumps([str(bundle / "configs/train.json"), str(bundle / "configs/multi_gpu_train.json")])
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2")
    ckpt = tmp_path / "ckpt"
    ok(bundle_cli("run", "--config_file", configs, *train_args(bundle, small_training_set, ckpt), launcher=launcher))
    assert (ckpt / "model.pt").stat().st_size > 0


def test_edm25d_strip_and_downscaled_copies_wiring(small_training_set):
    """train.json's ``strip_prob`` computes the head depth in the cached preprocessing and ``downscaled_copies``
    adds block-averaged copies of the training volumes; a batch comes out of the training loader."""
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "brain_mri_edm25d_super_resolution"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    overrides = json.loads((bundle / "configs" / "test_overrides.json").read_text())["train"]
    overrides.update(bundle_root=str(bundle), dataset_dir=str(small_training_set), strip_prob=1.0,
                     downscaled_copies=[2])
    for key, value in overrides.items():
        parser[key] = value
    cache = parser.get_parsed_content("train#cache")
    assert [item.get("downscale") for item in parser.get_parsed_content("split")["training"]] == [None, None, 2, 2]
    assert all("head_depth" in cache._cache[i] for i in range(len(cache._cache)))
    assert cache._cache[2]["label"].shape[1] == cache._cache[0]["label"].shape[1] // 2
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["label"].shape == (2, 1, 16, 16) and batch["image"].shape == (2, 2, 16, 16)


ATTENTION_UNET = REPO / "bundles" / "brain_mri_attention_unet_super_resolution"


def paper_parameter_count(bundle) -> int:
    """Parameters of ``network_def`` with the bundle's configs/paper.json on top of its inference.json."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in ("inference.json", "paper.json")])
    parser["bundle_root"] = str(bundle)
    return sum(p.numel() for p in parser.get_parsed_content("network_def").parameters())


def test_attention_unet_paper_configuration_is_the_thesis_network():
    """configs/paper.json builds the thesis's U-Net (channels 64-128, 3 residual blocks, cross-attention from the
    third stage): 7,967,605 parameters."""
    assert paper_parameter_count(ATTENTION_UNET) == 7_967_605


def test_attention_unet_gan_trains_and_checkpoints_both_networks(small_training_set, tmp_path):
    """gan.json on top of train.json: a tiny WGAN-GP run whose checkpoint holds both networks and optimisers."""
    import torch

    configs = json.dumps([str(ATTENTION_UNET / "configs" / c) for c in ("train.json", "gan.json")])
    ckpt = tmp_path / "ckpt"
    ok(bundle_cli("run", "--config_file", configs, *train_args(ATTENTION_UNET, small_training_set, ckpt),
                  "--init_weights", "$None", "--critic_channels", "8", "--critic_layers", "2", "--n_critic", "2",
                  "--patch_size", "[32, 32]", "--iterations", "4"))
    (checkpoint,) = ckpt.glob("checkpoint_epoch=*.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert {"network", "optimizer", "critic", "critic_optimizer"} <= set(state)
    assert (ckpt / "model.pt").stat().st_size > 0


def test_attention_unet_gmm_option_wiring(small_training_set, tmp_path):
    """train.json's ``gmm_prob``: the cached preprocessing fits each volume's tissue mixture in the datalist's
    ``brain_mask`` and a batch comes out of the training loader."""
    import nibabel as nib
    import numpy as np
    from monai.bundle import ConfigParser

    items = []
    for path in sorted(small_training_set.glob("*.nii.gz")):
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        mask = tmp_path / path.name.replace(".nii.gz", "_brain.nii.gz")
        nib.save(nib.Nifti1Image((data > np.percentile(data, 60)).astype(np.float32), img.affine), str(mask))
        items.append({"label": str(path), "brain_mask": str(mask)})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items[:2], "validation": items[2:]}))
    parser = ConfigParser()
    parser.read_config(str(ATTENTION_UNET / "configs" / "train.json"))
    settings = json.loads((ATTENTION_UNET / "configs" / "test_overrides.json").read_text())["train"]
    settings.update(bundle_root=str(ATTENTION_UNET), dataset_dir=str(small_training_set), datalist=str(datalist),
                    gmm_prob=1.0)
    for key, value in settings.items():
        parser[key] = value
    cache = parser.get_parsed_content("train#cache")
    assert all({"tissue", "tissue_stats"} <= set(cache._cache[i]) for i in range(len(cache._cache)))
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["label"].shape == (2, 1, 16, 16) and batch["image"].shape == (2, 3, 16, 16)


DDPM = REPO / "bundles" / "brain_mri_ddpm3d_super_resolution"


def test_ddpm_paper_configuration_parameter_count():
    """configs/paper.json builds the MONAI GenerativeModels 3D DDPM U-Net (channels 256-256-512, attention at the
    deepest level, 2 residual blocks) with the concat conditioning's 2 input channels: 189,822,209 parameters."""
    assert paper_parameter_count(DDPM) == 189_822_209


@pytest.mark.parametrize(
    "configs, expected",
    [(("inference.json",), ("ddim", 1, 100, 2)), (("inference.json", "paper.json"), ("ddpm", 1000, None, 1)),
     (("inference.json", "cascade.json"), ("ddim", 1, 100, 2)),
     (("train.json", "evaluate.json"), ("ddim", 1, 100, 2))],
)
def test_ddpm_samplers_of_each_configuration(configs, expected):
    """The CPU default is the CCDF start (1 DDIM step from the conditioning diffused to t0 = 100) averaged over an
    antithetic pair (the validation choice on the card) wherever the bundle samples, in the cascade per stage
    (one chain); paper.json keeps one sample of the seed's 1000 ancestral steps from noise."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(DDPM / "configs" / c) for c in configs])
    parser["bundle_root"] = str(DDPM)
    key = {"cascade.json": "stage_inferer", "evaluate.json": "validate#inferer"}.get(configs[-1], "inferer")
    inferer = parser.get_parsed_content(key)
    sampler, nfe, t0, num_samples = expected
    assert (inferer.sampler, inferer.num_evaluations, inferer.start_timestep) == (sampler, nfe, t0)
    assert (inferer.num_samples, inferer.antithetic) == (num_samples, True)
    if configs[-1] == "cascade.json":
        assert parser.get_parsed_content("inferer").num_samples == 1  # chains: --num_chains
    if t0 is not None:
        assert [int(t) for t in inferer.scheduler().timesteps] == [t0]
    assert inferer.channels_last


def test_ddpm_cascade_geometry_equals_a_direct_x4(small_volume, tmp_path):
    """cascade.json (two x2 in-plane stages) writes the x4 grid a direct x4 would: shape, spacing and the LR field
    of view; each stage's weights also answer the inference contract alone (test_inference_contract runs stage 2's
    models/model.pt, this runs stage 1's)."""
    cascade = tmp_path / "cascade"
    ok(infer(DDPM, small_volume, cascade, "--config_file",
             json.dumps([str(DDPM / "configs" / c) for c in ("inference.json", "cascade.json")])))
    src = nib.load(str(small_volume / "crop_dev03.nii.gz"))
    out = nib.load(str(cascade / "crop_dev03_sr.nii.gz"))
    assert out.shape == (src.shape[0] * 4, src.shape[1] * 4, src.shape[2])  # (A, S, L) file order: A and S in-plane
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0),
                               np.linalg.norm(src.affine[:3, :3], axis=0) / [4, 4, 1], atol=1e-6)
    np.testing.assert_allclose(np.sort(fov_corners(out.affine, out.shape), 0),
                               np.sort(fov_corners(src.affine, src.shape), 0), atol=1e-5)
    assert np.isfinite(np.asarray(out.dataobj)).all()

    stage1 = tmp_path / "stage1"
    ok(infer(DDPM, small_volume, stage1, "--model_path", str(DDPM / "models" / "model_x4_stage1.pt")))
    out1 = nib.load(str(stage1 / "crop_dev03_sr.nii.gz"))
    assert out1.shape == (src.shape[0] * 2, src.shape[1] * 2, src.shape[2])
    np.testing.assert_allclose(np.sort(fov_corners(out1.affine, out1.shape), 0),
                               np.sort(fov_corners(src.affine, src.shape), 0), atol=1e-5)


def test_ddpm_degradations_and_cascade_stage_wiring(small_training_set):
    """train.json's ``degradations`` trains on one LR copy per named degradation and ``target_downscale`` makes the
    targets a cascade's first stage (HR block-averaged by it); a batch of (cond, x_t) pairs comes out."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(DDPM / "configs" / "train.json"))
    overrides = json.loads((DDPM / "configs" / "test_overrides.json").read_text())["train"]
    overrides.update(bundle_root=str(DDPM), dataset_dir=str(small_training_set), degradations=["spline", "block"],
                     target_downscale=[1, 2, 2])
    for key, value in overrides.items():
        parser[key] = value
    training = parser.get_parsed_content("split")["training"]
    half = len(training) // 2  # the training side of the default split of the three crops, once per degradation
    assert half >= 1 and sorted(item["degradation"] for item in training) == ["block"] * half + ["spline"] * half
    assert all(item["downscale"] == [1, 2, 2] for item in training)
    cache = parser.get_parsed_content("train#cache")
    full = nib.load(str(next(small_training_set.glob("*.nii.gz")))).shape  # 16 x 64 x 64 crops
    assert {tuple(item["label"].shape[1:]) for item in cache._cache} == {(full[0], full[1] // 2, full[2] // 2)}
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["label"].shape == (2, 1, 16, 32, 32) and batch["image_up"].shape == (2, 1, 16, 32, 32)


EDM3D = REPO / "bundles" / "brain_mri_edm3d_super_resolution"


def test_edm3d_distill_json_trains_a_student_from_the_shipped_weights(small_training_set, tmp_path):
    """distill.json on top of train.json: the student starts from models/model.pt (the teacher), the stock trainer
    changes it, and its weights, with the teacher's keys, are written to ``final_model_path``."""
    import torch

    configs = json.dumps([str(EDM3D / "configs/train.json"), str(EDM3D / "configs/distill.json")])
    ckpt = tmp_path / "ckpt"
    ok(bundle_cli("run", "--config_file", configs, *train_args(EDM3D, small_training_set, ckpt)))
    student = torch.load(ckpt / "model.pt", weights_only=True)
    teacher = torch.load(EDM3D / "models" / "model.pt", weights_only=True)
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[key], teacher[key]) for key in teacher)


@pytest.mark.parametrize("distilled, weights, num_steps, sigma_min",
                         [(True, "model_2step.pt", 2, 0.1), (False, "model.pt", 3, 0.0774),
                          # what `--distilled false` delivers: python-fire keeps the word as a (truthy) string
                          ("true", "model_2step.pt", 2, 0.1), ("false", "model.pt", 3, 0.0774)])
def test_edm3d_distilled_switch(distilled, weights, num_steps, sigma_min):
    """``distilled`` picks the weights and the grid they are for together, in inference and in evaluation, and the
    grids are the ones distill.json trains the student (and runs the teacher) with."""
    from monai.bundle import ConfigParser

    for configs, weights_key, inferer in ((("inference.json",), "model_path", "inferer"),
                                          (("train.json", "evaluate.json"), "final_model_path", "validate#inferer")):
        parser = ConfigParser()
        parser.read_config([str(EDM3D / "configs" / c) for c in configs])
        parser["bundle_root"], parser["distilled"] = str(EDM3D), distilled
        assert parser.get_parsed_content(weights_key).endswith(f"/models/{weights}")
        assert parser.get_parsed_content(f"{inferer}#num_steps") == num_steps
        assert parser.get_parsed_content(f"{inferer}#sigma_min") == pytest.approx(sigma_min)
    distill = json.loads((EDM3D / "configs" / "distill.json").read_text())
    role = "student" if weights == "model_2step.pt" else "teacher"
    assert (distill[f"{role}_num_steps"], distill[f"{role}_sigma_min"]) == (num_steps, pytest.approx(sigma_min))


EDM25D = REPO / "bundles" / "brain_mri_edm25d_super_resolution"


def test_edm25d_student_json_fine_tunes_the_attention_free_student_from_the_shipped_weights(
        small_training_set, tmp_path):
    """student.json on top of train.json: the network without attention starts from models/model.pt (its other
    tensors, at the shipped size), trains at σ = 5 only, and its weights are the teacher's minus the attention."""
    import torch

    configs = json.dumps([str(EDM25D / "configs/train.json"), str(EDM25D / "configs/student.json")])
    ckpt = tmp_path / "ckpt"
    args = train_args(EDM25D, small_training_set, ckpt)
    for key in ("--channels", "--cond_channels"):  # the shipped weights' size, not the tiny test network's
        i = args.index(key)
        del args[i : i + 2]
    ok(bundle_cli("run", "--config_file", configs, *args, "--patch_size", "[32, 32]"))
    student = torch.load(ckpt / "model.pt", weights_only=True)
    teacher = torch.load(EDM25D / "models" / "model.pt", weights_only=True)
    assert set(student) == {k for k in teacher if ".attn." not in k} and len(student) < len(teacher)
    assert any(not torch.equal(student[key], teacher[key]) for key in student)
    student_config = json.loads((EDM25D / "configs" / "student.json").read_text())
    assert math.exp(student_config["p_mean"]) == pytest.approx(5.0) and student_config["p_std"] == 0


@pytest.mark.parametrize("student, weights", [(True, "model_student.pt"), ("true", "model_student.pt"),
                                              (False, "model.pt"), ("false", "model.pt")])
def test_edm25d_student_switch(student, weights):
    """``student`` picks the weights and the network they fit together (no attention for the student), in inference
    and in evaluation; the paper and regression configurations, listed last as override files are, keep their own."""
    from monai.bundle import ConfigParser

    attention = "model_student.pt" not in weights
    for configs, weights_key in ((("inference.json",), "model_path"),
                                 (("train.json", "evaluate.json"), "eval_weights")):
        parser = ConfigParser()
        parser.read_config([str(EDM25D / "configs" / c) for c in configs])
        parser["bundle_root"], parser["student"] = str(EDM25D), student
        assert parser.get_parsed_content(weights_key).endswith(f"/models/{weights}")
        assert parser.get_parsed_content("attention_levels") == [False] * 4 + [attention]
        assert parser.get_parsed_content("mid_attention") is attention
    last = ((("inference.json", "regression.json"), "model_path", "model_regression.pt"),
            (("train.json", "evaluate.json", "regression.json"), "eval_weights", "model_regression.pt"),
            (("train.json", "evaluate.json", "paper.json"), "eval_weights", "model_paper.pt"))
    for configs, weights_key, own in last:
        parser = ConfigParser()
        parser.read_config([str(EDM25D / "configs" / c) for c in configs])
        parser["bundle_root"] = str(EDM25D)
        assert parser.get_parsed_content(weights_key).endswith(f"/models/{own}")
        assert parser.get_parsed_content("attention_levels")[-1] is True
