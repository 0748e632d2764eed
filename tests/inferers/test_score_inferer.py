"""Tests of common.inferers.score: operators chosen at inference, the slice-wise SRMRI inferer (shapes, factors,
seeding, empty slices, K samples, network-call counts), the learned-operator fit and the stats handler."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from common.diffusion.operators import Downsample, LearnedOperator
from common.inferers.score import (
    OPERATORS,
    SamplerStatsHandler,
    ScoreSRInferer,
    fit_operator,
    make_operator,
)
from common.networks.score_net import ScoreNet
from common.transforms.io import SplitMeanStdd
from common.transforms.pipelines import slab_preprocessing
from common.transforms.upsample import grid_upsample


def _hr_volume(x=3, size=(16, 16)) -> torch.Tensor:
    """A smooth HR volume (X, Y, Z) in [0.1, 0.9]."""
    r = [torch.linspace(-1, 1, s) for s in size]
    base = 0.5 + 0.3 * torch.cos(2.5 * r[0])[:, None] * torch.sin(3 * r[1])[None, :]
    return torch.stack([base + 0.05 * k for k in range(x)])


class GaussianPrior:
    """The exact score of a prior N(mu, s²) per voxel whose mean is the HR slice (so SR should recover HR).

    Counts calls; ``mu`` is a (X, 1, Y, Z) stack matched to the batch by the order slices are sampled.
    """

    def __init__(self, mu: torch.Tensor, s: float = 0.01) -> None:
        self.mu, self.s, self.calls, self.batches = mu, s, 0, []

    def __call__(self, x, sigma):
        self.calls += 1
        mu = self.mu[: x.shape[0]] if x.shape[0] <= self.mu.shape[0] else self.mu
        return (mu - x) / (self.s**2 + sigma.reshape(-1, 1, 1, 1) ** 2)


def _lr(hr: torch.Tensor, factors=(2, 2), kernel="box") -> torch.Tensor:
    return Downsample(factors, kernel)(hr[:, None])[:, 0]


def _psnr(a, b):
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("kind", [k for k in OPERATORS if k != "learned"])
def test_make_operator_downsamplers(kind):
    op = make_operator(kind, (2, 3))
    assert op(torch.rand(2, 1, 12, 12)).shape == (2, 1, 6, 4)


def test_make_operator_learned_needs_weights(tmp_path):
    with pytest.raises(ValueError, match="fitted weights"):
        make_operator("learned", (2, 2))
    with pytest.raises(ValueError, match="operator must be"):
        make_operator("nearest", (2, 2))
    path = tmp_path / "op.pt"
    torch.save(LearnedOperator((2, 2)).state_dict(), path)
    op = make_operator("learned", (2, 2), path)
    x = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(op(x), Downsample((2, 2))(x))  # identity-initialised CNN + bicubic


@pytest.mark.parametrize("sampler", ["heun", "pc"])
def test_recovers_hr_with_an_exact_prior_and_beats_cubic(sampler):
    hr = _hr_volume()
    lr = _lr(hr)
    prior = GaussianPrior(hr[:, None])
    # ζ is an absolute step (plain-norm DPS): small for these 16 x 16 slices
    if sampler == "heun":
        kw = dict(num_steps=8, zeta=0.2, zeta_scaling="none")
    else:
        kw = dict(num_steps=200, skip=1, zeta=0.05)
    inferer = ScoreSRInferer(operator="box", sampler=sampler, sigma_max=5.0, slice_batch=3, progress=False,
                             empty_threshold=0.0, **kw)
    sr = inferer(lr[None, None], prior)
    assert sr.shape == (1, 1, 3, 16, 16) and float(sr.min()) >= 0 and float(sr.max()) <= 1
    cubic = grid_upsample(lr[None, None], (1, 2, 2), "cubic").clamp(0, 1)
    assert _psnr(sr[0, 0], hr) > _psnr(cubic[0, 0], hr) + 2
    assert prior.calls == inferer.nfe_per_slice() == inferer.last_stats["nfe_per_slice_counted"]


def test_network_calls_per_slice():
    assert ScoreSRInferer(sampler="pc", num_steps=2000, skip=2).nfe_per_slice() == 2000
    assert ScoreSRInferer(sampler="pc", num_steps=2000, skip=1).nfe_per_slice() == 4000
    assert ScoreSRInferer(sampler="pc", num_steps=2000, skip=3).nfe_per_slice() == 2 * 667
    heun = ScoreSRInferer(sampler="heun")
    assert heun.num_steps == 16 and heun.nfe_per_slice() == 31 and 2000 / heun.nfe_per_slice() >= 20
    assert ScoreSRInferer(sampler="heun", num_steps=10, order=1).nfe_per_slice() == 10
    pc = ScoreSRInferer(sampler="pc")
    assert pc.zeta == 0.28 and pc.fusion and pc.num_steps == 2000 and pc.snr == 0.16


def test_dps_step_size_scaling():
    """The paper's ζ is absolute; the fast path's is per 256 x 256 slice (same per-voxel step at every size)."""
    pc = ScoreSRInferer(sampler="pc")
    assert pc.zeta_scaling == "none" and pc.step_size((720, 512)) == 0.28 and pc.step_size((64, 64)) == 0.28
    heun = ScoreSRInferer(sampler="heun", zeta=16.0)
    assert heun.zeta_scaling == "image"
    assert heun.step_size((256, 256)) == 16.0 and heun.step_size((128, 128)) == 8.0
    assert ScoreSRInferer(sampler="heun", zeta=4.0, zeta_scaling="none").step_size((128, 128)) == 4.0
    # the step shrinks as 1/sqrt(voxels per LR voxel): x4 in-plane doubles ζ, [1, 1, 4] averages 4 voxels like x2
    assert ScoreSRInferer(sampler="heun", zeta=16.0, scale_factor=(1, 4, 4)).step_size((256, 256)) == 32.0
    assert ScoreSRInferer(sampler="heun", zeta=16.0, scale_factor=(1, 1, 4)).step_size((256, 256)) == 16.0
    assert ScoreSRInferer(sampler="pc", scale_factor=(1, 4, 4)).step_size((256, 256)) == 0.28
    with pytest.raises(ValueError, match="zeta_scaling"):
        ScoreSRInferer(zeta_scaling="pixel")


@pytest.mark.parametrize("scale", [(1, 2, 2), (1, 1, 4), (1, 3, 1), (1, 4, 4)])
def test_any_integer_factor_in_plane(scale):
    hr = _hr_volume(x=2, size=(24, 24))
    lr = _lr(hr, scale[1:], "bicubic")
    net = GaussianPrior(hr[:, None])
    inferer = ScoreSRInferer(scale_factor=scale, sampler="heun", num_steps=3, sigma_max=5.0, progress=False,
                             empty_threshold=0.0)
    sr = inferer(lr[None, None], net)
    assert sr.shape == (1, 1, 2, 24, 24)


def test_rejects_through_the_slicing_axis():
    with pytest.raises(ValueError, match="scale_factor"):
        ScoreSRInferer(scale_factor=(2, 2, 2))
    with pytest.raises(ValueError, match="sampler"):
        ScoreSRInferer(sampler="ddim")
    with pytest.raises(ValueError, match="expected LR volumes"):
        ScoreSRInferer(progress=False)(torch.rand(1, 4, 4, 4), GaussianPrior(torch.zeros(1, 1, 8, 8)))


def _tiny_net():
    torch.manual_seed(0)
    net = ScoreNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, mid_attention=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.eval()


def test_seeded_and_works_under_no_grad_with_a_network():
    lr = _lr(_hr_volume(x=2))[None, None]
    net = _tiny_net()

    def run(seed):
        inferer = ScoreSRInferer(sampler="heun", num_steps=3, sigma_max=10.0, seed=seed, progress=False, amp=True)
        with torch.no_grad():  # as MONAI's evaluators call it; DPS enables grad locally
            return inferer(lr, net)

    a, b, c = run(0), run(0), run(1)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert all(p.grad is None for p in net.parameters())


def test_empty_slices_are_upsampled_not_sampled():
    hr = _hr_volume(x=3)
    hr[1] = 0.0
    lr = _lr(hr)
    prior = GaussianPrior(hr[[0, 2]][:, None])
    inferer = ScoreSRInferer(operator="box", sampler="heun", num_steps=4, sigma_max=5.0, slice_batch=8,
                             progress=False, empty_threshold=0.02)
    sr = inferer(lr[None, None], prior)
    assert float(sr[0, 0, 1].abs().max()) == 0.0
    assert inferer.last_stats["sampled_slices"] == 2 and inferer.last_stats["slices"] == 3
    assert _psnr(sr[0, 0, [0, 2]], hr[[0, 2]]) > 30


def test_only_the_head_box_is_sampled():
    hr = torch.zeros(2, 32, 32)
    hr[:, 8:20, 12:28] = _hr_volume(x=2, size=(12, 16))
    lr = _lr(hr)
    shapes = []

    def net(x, sigma):
        shapes.append(tuple(x.shape[-2:]))
        return -x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    inferer = ScoreSRInferer(operator="box", sampler="heun", num_steps=2, sigma_max=5.0, progress=False, crop_margin=1)
    assert inferer.content_box(lr[:, None]) == ((3, 11), (5, 15))
    sr = inferer(lr[None, None], net)
    assert set(shapes) == {(16, 20)} and sr.shape == (1, 1, 2, 32, 32)
    cubic = grid_upsample(lr[None, None], (1, 2, 2), "cubic").clamp(0, 1)
    torch.testing.assert_close(sr[..., :6, :], cubic[..., :6, :])  # outside the box: the upsampled measurement
    torch.testing.assert_close(sr[..., 30:], cubic[..., 30:])
    shapes.clear()
    ScoreSRInferer(sampler="heun", num_steps=2, sigma_max=5.0, progress=False, crop_margin=None)(lr[None, None], net)
    assert set(shapes) == {(32, 32)}


def test_several_samples_give_mean_and_std():
    lr = _lr(_hr_volume(x=2))[None, None]
    inferer = ScoreSRInferer(sampler="heun", num_steps=2, sigma_max=5.0, num_samples=3, progress=False)
    out = inferer(lr, _tiny_net())
    assert out.shape == (1, 2, 2, 16, 16) and float(out[:, 1].min()) >= 0
    split = SplitMeanStdd()({"pred": out[0]})
    assert split["pred"].shape == (1, 2, 16, 16) and split["pred_std"].shape == (1, 2, 16, 16)
    one = SplitMeanStdd()({"pred": out[0, :1]})
    assert "pred_std" not in one


def test_slab_preprocessing(tmp_path):
    vol = np.random.default_rng(0).uniform(50, 150, (20, 40, 36)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "hr.nii.gz"))
    d = slab_preprocessing((1, 2, 2), (4, 16, 16))({"label": str(tmp_path / "hr.nii.gz")})
    assert d["label"].shape == (1, 4, 16, 16) and d["image"].shape == (1, 4, 8, 8)
    assert float(d["image"].max()) == 1.0
    whole = slab_preprocessing((1, 2, 2))({"label": str(tmp_path / "hr.nii.gz")})
    assert whole["image"].shape == (1, 20, 20, 18)


def test_thread_count_is_set_for_the_call_and_restored():
    seen = []

    def net(x, sigma):
        seen.append(torch.get_num_threads())
        return -x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lr = _lr(_hr_volume(x=1))[None, None]
        ScoreSRInferer(sampler="heun", num_steps=2, sigma_max=5.0, progress=False, num_threads=1)(lr, net)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        ScoreSRInferer(sampler="heun", num_steps=2, sigma_max=5.0, progress=False, num_threads=None)(lr, net)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)


def test_progress_lines(capsys):
    lr = _lr(_hr_volume(x=2))[None, None]
    ScoreSRInferer(sampler="heun", num_steps=3, sigma_max=5.0, progress=True, empty_threshold=0.0)(
        lr, GaussianPrior(_hr_volume(x=2)[:, None]))
    err = capsys.readouterr().err
    assert "sampler step 1/3" in err and "slices 2/2" in err


def test_fit_operator_on_registered_pairs(tmp_path):
    rng = np.random.default_rng(0)
    hr = np.zeros((6, 16, 16), np.float32)
    hr[1:5] = 100 + 50 * rng.random((4, 16, 16))
    # a degradation the fixed bicubic kernel does not model: box average then a gain
    lr = 0.8 * hr.reshape(6, 8, 2, 8, 2).mean(axis=(2, 4))
    nib.save(nib.Nifti1Image(hr, np.eye(4)), str(tmp_path / "hr.nii.gz"))
    nib.save(nib.Nifti1Image(lr, np.diag([1, 2, 2, 1.0])), str(tmp_path / "lr.nii.gz"))
    out = tmp_path / "op.pt"
    losses = fit_operator([{"image": str(tmp_path / "lr.nii.gz"), "label": str(tmp_path / "hr.nii.gz")}], (2, 2), out,
                          steps=60, batch_size=4)
    assert losses[-1] < losses[0]
    op = make_operator("learned", (2, 2), out)
    assert op(torch.rand(1, 1, 16, 16)).shape == (1, 1, 8, 8)


def test_sampler_stats_handler_writes_json(tmp_path):
    hr = _hr_volume(x=2)
    inferer = ScoreSRInferer(sampler="heun", num_steps=2, sigma_max=5.0, progress=False, empty_threshold=0.0)
    prior = GaussianPrior(hr[:, None])
    engine = Engine(lambda e, batch: inferer(batch, prior))
    SamplerStatsHandler(inferer, str(tmp_path)).attach(engine)
    engine.run([_lr(hr)[None, None]] * 2, max_epochs=1)
    stats = json.loads((tmp_path / "sampler_stats.json").read_text())
    assert stats["sampler"] == "heun" and stats["nfe_per_slice"] == 3 and stats["volumes"] == 2
    assert stats["sampled_slices"] == 4 and stats["seconds"] > 0
