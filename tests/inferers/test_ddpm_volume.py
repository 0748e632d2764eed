"""Tests of common.inferers.ddpm_volume: conditional DDPM/DDIM super-resolution of whole volumes with the ε-network
on Gaussian-blended windows (geometry, seeds, ε-oracle recovery, windowed == whole, K samples, call counts, a tiny
MONAI DiffusionModelUNet end to end)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from common.diffusion.ddpm import ddim_scheduler, ddpm_scheduler
from common.inferers.ddpm_volume import DDPMSRInferer
from common.inferers.windowed import window_slices
from common.transforms.upsample import GridUpsample


class OracleEps(nn.Module):
    """A perfect ε-network for x0 = the conditioning channel: ε = (x_t − √ᾱ_t·cond)/√(1 − ᾱ_t), per window."""

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.alpha_bar = ddpm_scheduler(num_train_timesteps).alphas_cumprod.double()
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def forward(self, x_in, timesteps):
        self.calls.append((tuple(x_in.shape), tuple(int(t) for t in timesteps)))
        assert timesteps.dtype == torch.long and timesteps.shape == (x_in.shape[0],)
        a = self.alpha_bar[timesteps].reshape(-1, 1, 1, 1, 1)
        x_t, cond = x_in[:, :1].double(), x_in[:, 1:2].double()
        return ((x_t - a.sqrt() * cond) / (1 - a).sqrt()).float()


class Pointwise(nn.Module):
    """A voxelwise ε-network (no spatial context), so windows cannot change its whole-volume output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x_in, timesteps):
        self.calls.append(tuple(x_in.shape))
        t = timesteps.float().reshape(-1, 1, 1, 1, 1) / 1000
        return 0.8 * torch.tanh(x_in[:, :1] - 0.5 * x_in[:, 1:2]) + 0.1 * t


def smooth_lr(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    lr = F.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 3, 1, 1)
    return 0.1 + 0.8 * (lr - lr.min()) / (lr.max() - lr.min())


# ------------------------------------------------------------------------------------------- geometry, seeds


@pytest.mark.parametrize("scale", [(1, 2, 2), (1, 1, 4), (2, 2, 2)])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_output_geometry_and_range(scale, sampler):
    lr = torch.rand(2, 1, 5, 6, 4)
    inferer = DDPMSRInferer(scale, roi_size=(4, 8, 8), sampler=sampler, num_steps=3, num_train_timesteps=10,
                            progress=False)
    out = inferer(lr, Pointwise())
    assert out.shape == (2, 1, 5 * scale[0], 6 * scale[1], 4 * scale[2]) == (2, 1, *inferer.hr_shape((5, 6, 4)))
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1 and out.std() > 0.01


def test_conditioning_is_the_grid_aligned_cubic_upsampling_in_signed_range():
    lr = torch.rand(1, 1, 4, 5, 6)
    inferer = DDPMSRInferer((1, 2, 2))
    torch.testing.assert_close(inferer.condition(lr), GridUpsample((1, 2, 2), "cubic")(lr) * 2 - 1)
    linear = DDPMSRInferer((1, 2, 2), upsample_mode="linear")
    torch.testing.assert_close(linear.condition(lr), GridUpsample((1, 2, 2), "linear")(lr) * 2 - 1)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_deterministic_per_seed_different_across_seeds_and_batch_independent(sampler, eta):
    lr = torch.rand(2, 1, 4, 5, 5)
    kw = dict(roi_size=(4, 6, 6), sampler=sampler, eta=eta, num_steps=4, num_train_timesteps=20, progress=False)
    net = Pointwise()
    a, b = DDPMSRInferer(seed=3, **kw)(lr, net), DDPMSRInferer(seed=3, **kw)(lr, net)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (DDPMSRInferer(seed=4, **kw)(lr, net) - a).abs().max() > 1e-3
    torch.testing.assert_close(DDPMSRInferer(seed=3, **kw)(lr[1:], net), a[1:], atol=0, rtol=0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="sampler"):
        DDPMSRInferer(sampler="euler")
    with pytest.raises(ValueError, match="num_samples"):
        DDPMSRInferer(num_samples=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDPMSRInferer(num_steps=2000)  # more steps than the model was trained with
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDPMSRInferer(timestep_spacing="leading")
    with pytest.raises(ValueError, match="start_timestep must be in"):
        DDPMSRInferer(sampler="ddpm", num_train_timesteps=20, start_timestep=20)
    with pytest.raises(ValueError, match="start_timestep must be in"):
        DDPMSRInferer(start_timestep=1000)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDPMSRInferer(num_steps=10, start_timestep=4)
    with pytest.raises(ValueError, match="expected LR volumes"):
        DDPMSRInferer(progress=False)(torch.rand(1, 2, 4, 4, 4), Pointwise())


# ------------------------------------------------------------------------------------------------ ε-oracle


@pytest.mark.parametrize(
    "sampler, steps, big_t, t0",
    [("ddim", 50, 1000, None), ("ddim", 4, 1000, None), ("ddim", 1000, 1000, None), ("ddpm", 0, 20, None),
     ("ddim", 1, 1000, 99), ("ddim", 3, 1000, 299), ("ddpm", 0, 20, 5)],
)
def test_an_eps_oracle_returns_x0_through_the_windows(sampler, steps, big_t, t0):
    """With ε consistent with x0 = the upsampled LR, every step's x̂0 is x0 and the trajectory ends there (DDPM:
    the last posterior mean, at t = 1, is x̂0 itself), from pure noise or from a CCDF start at t0."""
    lr = smooth_lr((4, 6, 6))
    net = OracleEps(big_t)
    inferer = DDPMSRInferer((1, 2, 2), roi_size=(4, 8, 8), sw_batch_size=3, sampler=sampler, num_steps=steps,
                            start_timestep=t0, num_train_timesteps=big_t, progress=False)
    out = inferer(lr, net)
    expected = (inferer.condition(lr) + 1) / 2
    assert expected.min() > 0 and expected.max() < 1  # no clipping involved
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert len({shape for shape, _ in net.calls}) > 1 or len(net.calls) > inferer.num_evaluations  # windowed


# ------------------------------------------------------------ windowed evaluation == whole-volume evaluation


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_windowed_equals_whole_volume_for_a_pointwise_network(sampler, overlap):
    lr = torch.rand(1, 1, 6, 5, 7)
    kw = dict(sampler=sampler, eta=1.0, num_steps=5, num_train_timesteps=20, seed=7, progress=False)
    windowed, whole = Pointwise(), Pointwise()
    inferer = DDPMSRInferer(roi_size=(4, 6, 6), sw_batch_size=4, overlap=overlap, **kw)
    out_w = inferer(lr, windowed)
    out_u = DDPMSRInferer(roi_size=-1, **kw)(lr, whole)
    assert whole.calls == [(1, 2, 6, 10, 14)] * inferer.num_evaluations  # one call per step: unwindowed
    assert max(s[0] for s in windowed.calls) == 4 and len(windowed.calls) > 2 * inferer.num_evaluations
    torch.testing.assert_close(out_w, out_u, atol=1e-5, rtol=0)
    # and both are the plain scheduler loop on the whole volume with the same noise stream
    g = torch.Generator().manual_seed(7)
    cond = inferer.condition(lr)
    sched = ddpm_scheduler(20) if sampler == "ddpm" else ddim_scheduler(20, 5)
    x = torch.randn(cond.shape, generator=g)
    for t in sched.timesteps:
        eps = Pointwise()(torch.cat([x, cond], 1), t.reshape(1))
        x, _ = sched.step(eps, t, x, generator=g, **({"eta": 1.0} if sampler == "ddim" else {}))
    torch.testing.assert_close(out_u, ((x + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler, t0, steps", [("ddim", 9, 3), ("ddim", 4, 1), ("ddpm", 6, 0)])
def test_start_timestep_starts_from_the_conditioning_diffused_forward(sampler, t0, steps):
    """CCDF: x_t0 = √ᾱ_t0·cond + √(1 − ᾱ_t0)·z with the generator's first draw, then the scheduler's steps from t0."""
    lr = torch.rand(1, 1, 5, 4, 6)
    kw = dict(sampler=sampler, eta=1.0, num_steps=steps, num_train_timesteps=20, start_timestep=t0, seed=3,
              progress=False)
    net = Pointwise()
    inferer = DDPMSRInferer(roi_size=-1, **kw)
    out = inferer(lr, net)
    assert inferer.num_evaluations == len(net.calls) == (steps if sampler == "ddim" else t0 + 1)
    g = torch.Generator().manual_seed(3)
    cond = inferer.condition(lr)
    sched = ddpm_scheduler(20) if sampler == "ddpm" else ddim_scheduler(20, steps, start_timestep=t0)
    a0 = sched.alphas_cumprod[t0]
    x = a0.sqrt() * cond + (1 - a0).sqrt() * torch.randn(cond.shape, generator=g)
    timesteps = [t for t in sched.timesteps if int(t) <= t0]
    assert int(timesteps[0]) == t0 and len(timesteps) == inferer.num_evaluations
    for t in timesteps:
        eps = Pointwise()(torch.cat([x, cond], 1), t.reshape(1))
        x, _ = sched.step(eps, t, x, generator=g, **({"eta": 1.0} if sampler == "ddim" else {}))
    torch.testing.assert_close(out, ((x + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)
    # and it is not the trajectory from pure noise
    assert (out - DDPMSRInferer(roi_size=-1, **{**kw, "start_timestep": None})(lr, Pointwise())).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------- K samples


def test_num_samples_gives_mean_and_std_of_consecutive_draws():
    lr = torch.rand(1, 1, 4, 4, 4)
    kw = dict(roi_size=-1, sampler="ddpm", num_train_timesteps=10, seed=5, progress=False)
    net = Pointwise()
    out = DDPMSRInferer(num_samples=3, **kw)(lr, net)
    assert out.shape == (1, 2, 4, 8, 8)
    single = DDPMSRInferer(**kw)
    g = torch.Generator().manual_seed(5)
    cond = single.condition(lr)
    draws = torch.stack([((single.sample(cond, net, g) + 1) / 2).clamp(0, 1) for _ in range(3)])
    torch.testing.assert_close(out[:, :1], draws.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1:], draws.std(0), atol=1e-6, rtol=0)
    assert out[:, 1].mean() > 1e-3  # ancestral sampling: the draws differ
    torch.testing.assert_close(DDPMSRInferer(**kw)(lr, net), draws[0], atol=0, rtol=0)  # K = 1: the first draw
    # deterministic DDIM with an oracle: every draw is x0, no spread
    oracle = DDPMSRInferer(roi_size=-1, num_steps=5, num_samples=2, progress=False)(lr, OracleEps())
    assert oracle[:, 1].abs().max() < 1e-5


@pytest.mark.parametrize("sampler, t0", [("ddim", 6), ("ddim", None), ("ddpm", 4)])
def test_antithetic_pairs_start_from_negated_noise(sampler, t0):
    """Sample 2j + 1 starts from −(sample 2j's initial field), step noise drawn anew; an odd K's last draw is
    unpaired, and K = 1 is the plain first draw."""
    lr = torch.rand(1, 1, 4, 4, 4)
    kw = dict(roi_size=-1, sampler=sampler, num_steps=2, eta=1.0, num_train_timesteps=10, start_timestep=t0, seed=2,
              progress=False)
    net = Pointwise()
    out = DDPMSRInferer(num_samples=3, antithetic=True, **kw)(lr, net)
    single = DDPMSRInferer(**kw)
    g = torch.Generator().manual_seed(2)
    cond = single.condition(lr)
    z0 = single.initial_noise(cond, g)
    draws = [single.sample(cond, net, g, noise=z0), single.sample(cond, net, g, noise=-z0)]
    draws.append(single.sample(cond, net, g))
    draws = torch.stack([((d + 1) / 2).clamp(0, 1) for d in draws])
    torch.testing.assert_close(out[:, :1], draws.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1:], draws.std(0), atol=1e-6, rtol=0)
    independent = DDPMSRInferer(num_samples=3, **kw)(lr, net)
    assert (out - independent).abs().max() > 1e-3
    torch.testing.assert_close(DDPMSRInferer(antithetic=True, **kw)(lr, net), draws[0], atol=0, rtol=0)


def test_antithetic_pair_cancels_the_odd_part():
    """With ε̂ = 0 the one-step x̂0 = x_t0/√ᾱ_t0 = cond + √((1 − ᾱ)/ᾱ)·z is linear in the start noise z: one
    antithetic pair returns the noise-free value (the conditioning) exactly, two independent draws do not."""
    lr = smooth_lr((4, 6, 6))
    kw = dict(roi_size=-1, num_steps=1, start_timestep=20, num_samples=2, clip_sample=False, progress=False)

    def eps_zero(x_in, t):
        return torch.zeros_like(x_in[:, :1])

    anti = DDPMSRInferer(antithetic=True, **kw)
    expected = (anti.condition(lr) + 1) / 2
    out = anti(lr, eps_zero)
    torch.testing.assert_close(out[:, :1], expected, atol=1e-6, rtol=0)
    assert out[:, 1].max() > 1e-2  # the pair differs; its mean does not
    assert (DDPMSRInferer(**kw)(lr, eps_zero)[:, :1] - expected).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- call counts


@pytest.mark.parametrize(
    "sampler, steps, t0, nfe", [("ddim", 7, None, 7), ("ddim", 1, None, 1), ("ddpm", 3, None, 12), ("ddim", 2, 5, 2),
                                ("ddpm", 3, 5, 6)]
)
@pytest.mark.parametrize("num_samples", [1, 2])
def test_call_counting(sampler, steps, t0, nfe, num_samples):
    lr_shape = (6, 6, 6)
    net = OracleEps(12)
    inferer = DDPMSRInferer((1, 2, 2), roi_size=(4, 8, 8), sw_batch_size=3, overlap=0.25, sampler=sampler,
                            num_steps=steps, start_timestep=t0, num_train_timesteps=12, num_samples=num_samples,
                            progress=False)
    inferer(torch.rand(1, 1, *lr_shape), net)
    n_windows = len(window_slices((6, 12, 12), (4, 8, 8), 0.25))
    assert inferer.num_evaluations == nfe and inferer.num_windows(lr_shape) == n_windows > 3
    assert len(net.calls) == inferer.num_network_calls(lr_shape) == -(-n_windows // 3) * nfe * num_samples
    assert sum(shape[0] for shape, _ in net.calls) == inferer.num_window_evaluations(lr_shape)
    assert inferer.num_window_evaluations(lr_shape) == n_windows * nfe * num_samples
    assert {shape[1:] for shape, _ in net.calls} == {(2, 4, 8, 8)}  # [x_t, cond] windows of roi_size
    # the timesteps the network saw, step by step: the scheduler's
    seen = []
    for _, ts in net.calls[: len(net.calls) // num_samples]:
        if not seen or seen[-1] != ts[0]:
            seen.append(ts[0])
    assert seen == [int(t) for t in inferer.scheduler().timesteps]
    if sampler == "ddpm":
        assert seen == list(range(11 if t0 is None else t0, -1, -1))


# ------------------------------------------------------------------------------------ DiffusionModelUNet


def tiny_unet() -> DiffusionModelUNet:
    torch.manual_seed(0)
    unet = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=1, channels=(8, 16),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    with torch.no_grad():
        for p in unet.parameters():  # undo the zero inits so the output depends on the input
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return unet.eval()


@pytest.mark.parametrize("amp", [False, True])
def test_tiny_diffusion_model_unet_end_to_end(amp):
    """MONAI's DiffusionModelUNet as the ε-network (concat conditioning, 2 input channels) on an 8x16x16 HR volume
    in windows of 8x8x8: runs, is deterministic, and its windows run in bf16 under ``amp``."""
    unet = tiny_unet()
    dtypes = []
    hook = unet.conv_in.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    lr = smooth_lr((8, 8, 8))
    inferer = DDPMSRInferer((1, 2, 2), roi_size=(8, 8, 8), sw_batch_size=2, num_steps=3, amp=amp, progress=False)
    t0 = time.perf_counter()
    out = inferer(lr, unet)
    seconds = time.perf_counter() - t0
    hook.remove()
    assert out.shape == (1, 1, 8, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 1e-3
    assert set(dtypes) == {torch.bfloat16 if amp else torch.float32}
    assert len(dtypes) == inferer.num_network_calls((8, 8, 8)) == 5 * 3  # 9 windows in batches of 2, 3 steps
    torch.testing.assert_close(inferer(lr, unet), out, atol=0, rtol=0)
    assert seconds < 10


def test_progress_lines(capsys):
    inferer = DDPMSRInferer(roi_size=-1, sampler="ddpm", num_train_timesteps=40, progress=True)
    inferer(torch.rand(1, 1, 2, 2, 2), Pointwise())
    lines = capsys.readouterr().err.strip().splitlines()
    assert 5 <= len(lines) <= 12 and lines[0].startswith("SR: step 1/40 (t = 39)") and "step 40/40" in lines[-1]


# ------------------------------------------------------------------------------------------ training forward


@pytest.mark.parametrize("amp", [False, True])
def test_concat_training_step_through_monai_trainer(amp):
    """MONAI's SupervisedTrainer + DiffusionPrepareBatch + ConcatDiffusionInferer: the network sees
    cat[√ᾱ_t·x0 + √(1 − ᾱ_t)·ε, cond] at integer t, and the loss compares its output with that ε."""
    from monai.data import DataLoader
    from monai.engines import DiffusionPrepareBatch, SupervisedTrainer

    from common.inferers.ddpm_volume import ConcatDiffusionInferer

    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, 8, 8, 8, generator=g) * 2 - 1, "cond": torch.rand(1, 8, 8, 8, generator=g)}
            for _ in range(2)]
    unet = tiny_unet().train()
    seen, losses = [], []
    unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)

    def loss(pred, target):
        losses.append((pred, target))
        return F.mse_loss(pred, target)

    sched = ddpm_scheduler(1000)
    before = unet.out[-1].conv.weight.detach().clone()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(data, batch_size=2), network=unet,
        optimizer=torch.optim.Adam(unet.parameters(), 1e-4), loss_function=loss,
        inferer=ConcatDiffusionInferer(sched, amp=amp),
        prepare_batch=DiffusionPrepareBatch(num_train_timesteps=1000, condition_name="cond"),
    )
    trainer.run()
    (kw,), ((pred, noise),) = seen, losses
    x_in, t = kw["x"], kw["timesteps"]
    assert x_in.shape == (2, 2, 8, 8, 8) and t.dtype == torch.long and kw["context"] is None
    image, cond = torch.stack([d["image"] for d in data]), torch.stack([d["cond"] for d in data])
    torch.testing.assert_close(x_in[:, 1:], cond)
    torch.testing.assert_close(x_in[:, :1], sched.add_noise(image, noise, t))
    assert pred.dtype == torch.float32 and pred.shape == noise.shape and torch.isfinite(F.mse_loss(pred, noise))
    assert not torch.equal(before, unet.out[-1].conv.weight)  # the optimiser stepped
    with pytest.raises(ValueError, match="mode"):
        ConcatDiffusionInferer(sched, mode="add")
