"""Tests of common.engines.score: HR-slice data, the DSM batch for the stock trainer, the EMA handler, σ_max."""

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from common.diffusion.vesde import dsm_loss, sigma_max_rule
from common.engines.score import ExponentialMovingAverage, VESDEPrepareBatch
from common.engines.sigma_max import estimate_sigma_max, main, sample_crops
from common.networks.score_net import ScoreNet
from common.transforms.pipelines import hr_preprocessing
from common.transforms.slices import random_slice_crops
from phantoms import head_phantom


def _phantom(shape=(12, 40, 36), seed=0) -> np.ndarray:
    return head_phantom(shape, seed)


@pytest.fixture(scope="module")
def hr_items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hr")
    items = []
    for k in range(2):
        path = folder / f"vol{k}.nii.gz"
        nib.save(nib.Nifti1Image(_phantom(seed=k), np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
        items.append({"label": str(path)})
    return items


def test_hr_preprocessing_scales_to_unit_range(hr_items):
    d = hr_preprocessing()(dict(hr_items[0]))
    label = d["label"]
    assert "image" not in d  # never an LR image: training is on HR only
    assert label.shape == (1, 12, 40, 36) and float(label.min()) == 0.0 and float(label.max()) == 1.0
    assert label.meta["norm_hi"] > label.meta["norm_lo"]
    assert d["fg_slices"].tolist() == [i for i in range(12) if float((label[0, i] > 0.1).float().mean()) >= 0.05]
    assert 0 not in d["fg_slices"].tolist()  # the empty slices are never drawn


def test_random_slice_crops_are_non_empty_sagittal_slices(hr_items):
    vol = hr_preprocessing()(dict(hr_items[0]))
    crops = random_slice_crops((16, 24), num_samples=20)
    crops.set_random_state(0)
    out = crops(vol)
    assert len(out) == 20
    for item in out:
        assert item["label"].shape == (1, 16, 24) and set(item) == {"label"}
        assert float((item["label"] > 0.1).float().mean()) > 0.05  # drawn from the head, not the empty slices
    # without the cached slice list (a transform chain that skipped it), the list is computed on the fly
    plain = {"label": vol["label"]}
    assert random_slice_crops((16, 24))(plain)["label"].shape == (1, 16, 24)


def test_random_slice_crops_pad_small_slices(hr_items):
    vol = hr_preprocessing()(dict(hr_items[0]))
    out = random_slice_crops((64, 64))(vol)
    assert out["label"].shape == (1, 64, 64)


def test_prepare_batch_is_the_dsm_loss():
    """The stock trainer's MSE(net(x, σ, raw=True), target) equals dsm_loss (voxel mean) for the same σ and z."""
    torch.manual_seed(0)
    net = ScoreNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, mid_attention=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0 = torch.rand(4, 1, 16, 16)
    prep = VESDEPrepareBatch(sigma_min=0.01, sigma_max=50.0, generator=torch.Generator().manual_seed(3))
    x, target, args, kwargs = prep({"label": x0, "image": x0})
    sigma = kwargs["sigma"]
    assert args == () and kwargs["raw"] is True and sigma.shape == (4,)
    assert float(sigma.min()) >= 0.01 and float(sigma.max()) <= 50.0
    z = -target
    torch.testing.assert_close(x, x0 + sigma.reshape(-1, 1, 1, 1) * z)
    mse = torch.nn.functional.mse_loss(net(x, **kwargs), target)
    reference = dsm_loss(net, x0, sigma, noise=lambda like: z, reduce_mean=True)
    torch.testing.assert_close(mse, reference)


def test_prepare_batch_sigma_is_log_uniform():
    prep = VESDEPrepareBatch(sigma_min=0.01, sigma_max=100.0, generator=torch.Generator().manual_seed(0))
    _, _, _, kwargs = prep({"label": torch.zeros(20000, 1, 1, 1)})
    t = (kwargs["sigma"].log() - np.log(0.01)) / (np.log(100.0) - np.log(0.01))
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.std()) - (1 / 12) ** 0.5) < 0.01


def test_prepare_batch_is_seeded():
    batch = {"label": torch.rand(2, 1, 8, 8)}
    a = VESDEPrepareBatch(generator=torch.Generator().manual_seed(1))(batch)
    b = VESDEPrepareBatch(generator=torch.Generator().manual_seed(1))(batch)
    torch.testing.assert_close(a[0], b[0])


def test_ema_update_rule_and_state():
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(0.0)
        net.bias.fill_(0.0)
    ema = ExponentialMovingAverage(net, decay=0.9)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update()
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 0.1))
    ema.update()
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 0.19))
    state = ema.state_dict()
    other = ExponentialMovingAverage(torch.nn.Linear(2, 1), decay=0.9)
    other.load_state_dict(state)
    torch.testing.assert_close(other.model.weight, ema.model.weight)
    assert other.num_updates == 2


def test_ema_warmup_rate():
    ema = ExponentialMovingAverage(torch.nn.Linear(1, 1), decay=0.999, warmup=True)
    assert ema.rate() == pytest.approx(0.1)
    ema.num_updates = 10_000
    assert ema.rate() == 0.999
    with pytest.raises(ValueError):
        ExponentialMovingAverage(torch.nn.Linear(1, 1), decay=1.0)


def test_ema_handler_follows_training_with_ddp_style_wrapper():
    net = torch.nn.Linear(3, 1)
    wrapper = torch.nn.DataParallel(net)  # unwrapped like DDP
    ema = ExponentialMovingAverage(wrapper, decay=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        opt.zero_grad()
        net(batch).pow(2).mean().backward()
        opt.step()

    engine = Engine(step)
    ema.attach(engine)
    engine.run([torch.ones(4, 3)] * 5, max_epochs=1)
    assert ema.num_updates == 5
    assert not torch.equal(ema.model.weight, net.weight)  # lags behind
    assert (ema.model.weight - net.weight).abs().max() < 0.5


def test_ema_starts_at_weights_loaded_when_training_starts():
    """Fine-tuning: weights loaded at STARTED (by a handler attached before the EMA) are where the average begins;
    a resumed average (updates > 0) is kept."""
    net = torch.nn.Linear(2, 1)
    ema = ExponentialMovingAverage(net, decay=0.9)
    engine = Engine(lambda e, b: None)

    @engine.on(Events.STARTED)
    def load_init_weights(_):
        with torch.no_grad():
            net.weight.fill_(3.0)

    ema.attach(engine)
    engine.run([0], max_epochs=1)
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 3.0))
    resumed = ExponentialMovingAverage(net, decay=0.9)
    resumed.load_state_dict({"model": torch.nn.Linear(2, 1).state_dict(), "num_updates": 7})
    kept = resumed.model.weight.clone()
    engine = Engine(lambda e, b: None)
    resumed.attach(engine)
    engine.run([0], max_epochs=1)  # no restart of the average, then one update towards the network
    torch.testing.assert_close(resumed.model.weight, 0.9 * kept + 0.1 * net.weight)


def test_sigma_max_rule_on_the_training_crops(hr_items):
    result = estimate_sigma_max(hr_items, (16, 16), num_crops=40, seed=0)
    crops = sample_crops(hr_items, (16, 16), num_crops=40, seed=0)
    assert crops.shape == (40, 1, 16, 16)
    assert result["sigma_max"] == pytest.approx(sigma_max_rule(crops, max_images=None), abs=0.01)
    assert 0 < result["data_std"] < 1 and result["num_crops"] == 40
    # the rule scales with the image side: larger crops, larger σ_max
    assert estimate_sigma_max(hr_items, (32, 32), num_crops=40, seed=0)["sigma_max"] > result["sigma_max"]
    assert estimate_sigma_max(hr_items, (16, 16), num_crops=40, seed=0) == result  # seeded


def test_sigma_max_command_line(hr_items, capsys):
    folder = str(__import__("pathlib").Path(hr_items[0]["label"]).parent)
    result = main(["--dataset_dir", folder, "--patch_size", "16", "16", "--num_crops", "20"])
    assert '"sigma_max"' in capsys.readouterr().out and result["sigma_max"] > 0


def test_a_few_steps_lower_the_dsm_loss():
    """The pieces train: 40 Adam steps of a tiny network on one image lower the loss at fixed σ and z."""
    torch.manual_seed(0)
    net = ScoreNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, mid_attention=False)
    x0 = torch.rand(1, 1, 16, 16).round().repeat(8, 1, 1, 1)
    prep = VESDEPrepareBatch(sigma_min=0.01, sigma_max=5.0, generator=torch.Generator().manual_seed(0))
    x, target, _, kwargs = prep({"label": x0})
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(net(x, **kwargs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
