"""EDM training pieces: the prepare_batch target, slice sampling, clipping, resume, final weights."""

from __future__ import annotations

import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from common.edm_training import (
    CropHRToLRd,
    EDMPrepareBatch,
    EngineCheckpointSaver,
    FinalWeightsSaver,
    GradientClipping,
    RandSlicePatchd,
    ResumeFromLatest,
    SliceForegroundd,
    checkpoint_to_weights,
    latest_checkpoint,
    repeat_dataset,
    training_preprocessing,
    validation_preprocessing,
)
from common.inferers import SRDenoiser
from common.networks import AdaGNUNet


def _denoiser(p_mean=-1.2):
    torch.manual_seed(0)
    model = AdaGNUNet(2, 3, 1, channels=(8, 16), cond_channels=16, num_res_blocks=1)
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return SRDenoiser(model, num_cond=2, p_mean=p_mean)


def _batch(b=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 2, size, size, generator=g), "label": torch.rand(b, 1, size, size, generator=g)}


def test_prepare_batch_target_is_f_space():
    net = _denoiser()
    batch = _batch()
    x_noisy, target, args, kwargs = EDMPrepareBatch(net, generator=torch.Generator().manual_seed(7))(batch)
    assert args == () and kwargs["raw"] is True and x_noisy.shape == target.shape == (3, 1, 16, 16)
    torch.testing.assert_close(kwargs["cond"], batch["image"] * 2 - 1)
    sigma = kwargs["sigma"]
    x0 = batch["label"] * 2 - 1
    c_skip, c_out, _, _ = net.get_scalings(sigma)
    torch.testing.assert_close(target, (x0 - c_skip.view(-1, 1, 1, 1) * x_noisy) / c_out.view(-1, 1, 1, 1))
    # the same generator draws give the same σ and noise as EDMPrecond.loss: MSE(F, target) is that loss
    with torch.no_grad():
        mse = nn.functional.mse_loss(net(x_noisy, **kwargs), target)
        loss = net.loss(x0, kwargs["cond"], generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(mse, loss)


@pytest.mark.parametrize("p_mean, expected_median", [(-1.2, float(np.exp(-1.2))), (0.0, 1.0)])
def test_prepare_batch_sigma_distribution(p_mean, expected_median):
    net = _denoiser(p_mean)
    batch = _batch(b=4000, size=2)
    _, _, _, kwargs = EDMPrepareBatch(net, generator=torch.Generator().manual_seed(0))(batch)
    assert abs(kwargs["sigma"].median().item() - expected_median) < 0.1 * expected_median


def test_gradient_clipping_bounds_the_norm():
    net = nn.Linear(10, 10)
    for p in net.parameters():
        p.grad = torch.full_like(p, 100.0)
    engine = Engine(lambda e, b: None)
    engine.network = net
    GradientClipping(max_norm=10.0)(engine)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in net.parameters()))
    assert norm <= 10.0 + 1e-4
    assert engine.state.metrics["grad_norm"] > 100


@pytest.mark.parametrize(
    "names, expected",
    [
        (["checkpoint_epoch=2.pt", "checkpoint_epoch=10.pt", "checkpoint_epoch=9.pt"], "checkpoint_epoch=10.pt"),
        (["checkpoint_iteration=300.pt", "checkpoint_iteration=1200.pt"], "checkpoint_iteration=1200.pt"),
        (["checkpoint_a.pt", "checkpoint_b.pt"], "checkpoint_b.pt"),  # no numbers: the newest file
        (["best_model.pt"], None),
        ([], None),
    ],
)
def test_latest_checkpoint(tmp_path, names, expected):
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (time.time() + i, time.time() + i))
    found = latest_checkpoint(tmp_path)
    assert (found.name if found else None) == expected
    assert latest_checkpoint(tmp_path / "missing") is None and latest_checkpoint(None) is None


def _trainer(net, opt, max_epochs):
    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return Engine(step)


def test_resume_from_latest_restores_network_optimizer_and_epoch(tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(4, 3) for _ in range(3)]
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = _trainer(net, opt, 2)
    EngineCheckpointSaver(str(tmp_path), {"network": net, "optimizer": opt}, save_interval=1, n_saved=2).attach(trainer)
    trainer.run(data, max_epochs=2)
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=2.pt"

    fresh = nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    resumed = _trainer(fresh, fresh_opt, 3)
    resume = ResumeFromLatest(tmp_path, {"network": fresh, "optimizer": fresh_opt})
    resume.attach(resumed)
    epochs = []
    resumed.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    before = None

    @resumed.on(Events.STARTED)
    def _check(engine):
        nonlocal before
        before = {k: v.clone() for k, v in fresh.state_dict().items()}

    resumed.run(data, max_epochs=3)
    assert resume.loaded.name == "checkpoint_epoch=2.pt"
    assert epochs == [3]  # only the remaining epoch ran
    for k, v in torch.load(resume.loaded, weights_only=True)["network"].items():
        torch.testing.assert_close(before[k], v)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    net = nn.Linear(3, 2)
    engine = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), 1)
    resume = ResumeFromLatest(tmp_path / "none", {"network": net})
    resume.attach(engine)
    engine.run([torch.randn(2, 3)], max_epochs=1)
    assert resume.loaded is None and engine.state.epoch == 1


def test_final_weights_and_checkpoint_export(tmp_path):
    net = nn.Linear(3, 2)
    FinalWeightsSaver(net, tmp_path / "sub" / "model.pt")()
    state = torch.load(tmp_path / "sub" / "model.pt", weights_only=True)
    torch.testing.assert_close(state["weight"], net.weight.detach())
    torch.save({"network": net.state_dict(), "optimizer": {}}, tmp_path / "ckpt.pt")
    out = checkpoint_to_weights(tmp_path / "ckpt.pt", tmp_path / "w.pt")
    assert set(torch.load(out, weights_only=True)) == {"weight", "bias"}
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")]


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


def test_repeat_dataset():
    ds = repeat_dataset([10, 11, 12], 7)
    assert len(ds) == 7 and [ds[i] for i in range(7)] == [10, 11, 12, 10, 11, 12, 10]
    with pytest.raises(ValueError):
        repeat_dataset([], 3)


@pytest.fixture
def hr_file(tmp_path):
    data = np.zeros((6, 21, 18), np.float32)
    data[:, 3:18, 3:15] = np.linspace(100, 400, 15 * 12).reshape(15, 12)
    path = tmp_path / "hr.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def test_training_and_validation_preprocessing(hr_file):
    d = training_preprocessing((1, 2, 2))({"label": str(hr_file)})
    assert d["image"].shape == (1, 6, 10, 9) and d["label"].shape == d["image_up"].shape == (1, 6, 20, 18)
    assert 0 <= d["label"].min() and d["label"].max() <= 1 and d["slice_foreground"].shape == (6,)
    assert "head_depth" not in d
    depth = training_preprocessing((1, 2, 2), head_depth=True)({"label": str(hr_file)})["head_depth"]
    assert depth.shape == d["label"].shape and float(depth.max()) > 0 and float(depth[0, 0, 0, 0]) == 0
    v = validation_preprocessing((1, 2, 2), num_slices=2)({"label": str(hr_file)})
    assert v["image"].shape == (1, 2, 10, 9) and v["label"].shape == (1, 2, 20, 18)


def test_crop_hr_to_lr():
    out = CropHRToLRd((1, 2, 2))({"image": torch.zeros(1, 3, 4, 5), "label": torch.zeros(1, 3, 9, 11)})
    assert out["label"].shape == (1, 3, 8, 10)


def test_downscaled_copies(hr_file):
    from common.data import with_downscaled_copies

    split = {"training": [{"label": str(hr_file), "subject": "hr"}], "validation": [{"label": "v"}]}
    out = with_downscaled_copies(split, [2])
    assert [it.get("downscale") for it in out["training"]] == [None, 2] and out["validation"] == split["validation"]
    assert out["training"][1]["subject"] == "hr_down2" and with_downscaled_copies(split, []) == split
    with pytest.raises(ValueError, match="downscale"):
        with_downscaled_copies(split, [1])
    full, half = (training_preprocessing((1, 2, 2))(it) for it in out["training"])
    assert half["label"].shape == (1, 3, 10, 8)  # (6, 21, 18) block-averaged by 2: (3, 10, 9), then the LR grid
    torch.testing.assert_close(half["label"].affine[:3, :3], 2 * full["label"].affine[:3, :3])
