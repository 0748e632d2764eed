"""Tests of common.diffusion.ddpm: the seed's clipped cosine schedule (closed form, registration in MONAI's store),
MONAI's DDPM step against the seed's posterior, and the aligned DDIM step (determinism, x0 recovery, the stride)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules

from common.diffusion.ddpm import (
    SCHEDULE,
    AlignedDDIMScheduler,
    cosine_clipped_schedule,
    ddim_scheduler,
    ddpm_scheduler,
    posterior_mean_variance,
)


def seed_schedule(big_t: int, s: float = 0.008, max_beta: float = 0.3):
    """methods.md §2 written out in float64: closed-form ᾱ(t), clipped β_t, and ᾱ_t as the product of 1 − β."""
    t = torch.arange(big_t + 1, dtype=torch.float64)
    f = torch.cos((t / big_t + s) / (1 + s) * math.pi / 2) ** 2
    closed = f / f[0]
    betas = torch.minimum(1 - closed[1:] / closed[:-1], torch.tensor(max_beta, dtype=torch.float64))
    return closed[1:], betas, torch.cumprod(1 - betas, 0)


def oracle_eps(scheduler, x0):
    """ε consistent with x_t and a known x0 at timestep t: what a perfect ε-network answers."""

    def eps(x_t, t):
        a = scheduler.alphas_cumprod[int(t)].double()
        return ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).to(x_t.dtype)

    return eps


# ------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("big_t", [1000, 50])
def test_schedule_equals_the_closed_form_with_the_last_betas_clipped(big_t):
    closed, betas, alpha_bar = seed_schedule(big_t)
    b, a, ab = cosine_clipped_schedule(big_t)
    assert b.dtype == a.dtype == ab.dtype == torch.float32 and b.shape == (big_t,)
    torch.testing.assert_close(b.double(), betas, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(a.double(), 1 - betas, atol=1e-7, rtol=0)
    torch.testing.assert_close(ab.double(), alpha_bar, atol=1e-9, rtol=1e-5)
    clipped = betas >= 0.3
    first = int(clipped.nonzero()[0, 0])
    assert clipped[first:].all() and not clipped[:first].any()  # the clip acts only at the end
    # before the clip the product of (1 − β) is the closed form; after it ᾱ stays above it
    torch.testing.assert_close(ab[:first].double(), closed[:first], atol=1e-9, rtol=1e-5)
    assert (ab[first:].double() > closed[first:]).all()
    if big_t == 1000:
        assert big_t - first == 6  # "it only changes the last few betas"
        assert ab[-1].item() == pytest.approx(1.0286e-5, rel=1e-3)  # ᾱ_T ≈ 1e-5
        assert b[0].item() == pytest.approx(4.128e-5, rel=1e-3)


def test_schedule_is_a_valid_diffusion():
    b, a, ab = cosine_clipped_schedule(1000)
    assert (b > 0).all() and (b <= 0.3).all()
    assert (ab.diff() < 0).all() and ab[0] < 1 and ab[-1] > 0  # ᾱ strictly decreasing in (0, 1)
    with pytest.raises(ValueError, match="max_beta"):
        cosine_clipped_schedule(10, max_beta=1.0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        cosine_clipped_schedule(0)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, AlignedDDIMScheduler])
def test_registered_in_monai_store_and_taken_by_name(cls):
    assert SCHEDULE in NoiseSchedules
    b, _, ab = cosine_clipped_schedule(1000)
    sched = cls(1000, schedule=SCHEDULE)
    torch.testing.assert_close(sched.betas, b, atol=0, rtol=0)
    torch.testing.assert_close(sched.alphas_cumprod, ab, atol=0, rtol=0)
    # schedule arguments pass through MONAI's constructor
    other = cls(1000, schedule=SCHEDULE, max_beta=0.5)
    assert other.betas.max().item() == pytest.approx(0.5) and (other.betas[:990] == b[:990]).all()


def test_monai_cosine_is_the_same_formula_clipped_at_0999():
    b, _, ab = cosine_clipped_schedule(1000, max_beta=0.999)
    monai = DDPMScheduler(1000, schedule="cosine")
    torch.testing.assert_close(monai.betas, b, atol=1e-4, rtol=0)  # MONAI works in float32
    torch.testing.assert_close(monai.alphas_cumprod, ab, atol=1e-6, rtol=1e-3)
    assert monai.alphas_cumprod[-1] < 1e-8 < 1e-5 < DDPMScheduler(1000, schedule=SCHEDULE).alphas_cumprod[-1]


# ------------------------------------------------------------------------------------------- DDPM posterior


@pytest.mark.parametrize("t", [0, 1, 10, 500, 995, 999])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_monai_ddpm_step_is_the_seed_posterior(t, variance_type):
    g = torch.Generator().manual_seed(t)
    x_t, eps = torch.randn(2, 1, 4, 4, 4, generator=g), torch.randn(2, 1, 4, 4, 4, generator=g)
    sched = ddpm_scheduler(1000, variance_type=variance_type, clip_sample=False)
    out, x0_hat = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(5))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
    # the seed's formulas in float64, from the closed form, independent of MONAI's tensors
    _, betas, ab = seed_schedule(1000)
    a, a_prev, beta = ab[t], (ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)), betas[t]
    x0 = (x_t.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
    mean = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x_t.double()
    var = (1 - a_prev) / (1 - a) * beta if variance_type == "fixed_small" else beta
    expected = mean + (var.sqrt() * z.double() if t > 0 else 0)
    torch.testing.assert_close(x0_hat.double(), x0, atol=5e-4 * (1 / a.sqrt()).item(), rtol=1e-4)
    torch.testing.assert_close(out.double(), expected, atol=2e-4, rtol=1e-4)
    m, v = posterior_mean_variance(sched, x0, x_t.double(), t)  # from the scheduler's float32 schedule
    torch.testing.assert_close(m, mean, atol=2e-4, rtol=1e-4)
    seed_var = (1 - a_prev) / (1 - a) * beta  # the seed's β̃_t
    assert v.item() == pytest.approx(seed_var.item(), rel=2e-3, abs=1e-12)


def test_posterior_at_the_first_timestep_is_x0():
    sched = ddpm_scheduler(1000)
    x0, x_t = torch.rand(3, 5), torch.rand(3, 5)
    mean, var = posterior_mean_variance(sched, x0, x_t, 0)
    torch.testing.assert_close(mean, x0)
    assert var.item() == 0


@pytest.mark.parametrize("big_t", [20, 100])
def test_ddpm_ancestral_sampling_with_an_eps_oracle_returns_x0(big_t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 1, 6, 6, 6, generator=g) * 2 - 1
    sched = ddpm_scheduler(big_t)
    eps = oracle_eps(sched, x0)
    x = torch.randn(x0.shape, generator=g)
    assert list(sched.timesteps) == list(range(big_t - 1, -1, -1))  # all T steps by default
    for t in sched.timesteps:
        x, _ = sched.step(eps(x, t), t, x, generator=g)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------ DDIM


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 10, 50, 1000])
def test_ddim_timesteps_and_previous_timesteps_chain(spacing, n):
    sched = ddim_scheduler(1000, n, timestep_spacing=spacing)
    ts = [int(t) for t in sched.timesteps]
    assert len(ts) == n == sched.num_inference_steps and ts[0] == 999 and len(set(ts)) == n
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert [sched.previous_timestep(t) for t in ts] == ts[1:] + [-1]  # each step lands where the next evaluates
    if spacing == "trailing":
        assert ts[-1] == round(1000 / n) - 1  # the last evaluation is not spent at t = 0 (unless n = T)
    with pytest.raises(ValueError, match="not among"):
        sched.previous_timestep(1000)


@pytest.mark.parametrize("t0, n", [(99, 1), (99, 4), (299, 3), (0, 1), (49, 50), (998, 10)])
def test_ddim_start_timestep_spaces_the_steps_over_zero_to_t0(t0, n):
    """CCDF grid: N "trailing" steps over [0, t0] (stride (t0 + 1)/N), the first at t0, the last straight to x̂0."""
    sched = ddim_scheduler(1000, n, start_timestep=t0)
    ts = [int(t) for t in sched.timesteps]
    assert len(ts) == n == len(set(ts)) and ts[0] == t0 and all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[-1] == round((t0 + 1) / n) - 1 and [sched.previous_timestep(t) for t in ts] == ts[1:] + [-1]
    assert ddim_scheduler(1000, n, start_timestep=999).timesteps.tolist() == ddim_scheduler(1000, n).timesteps.tolist()
    # constructed directly, as MONAI's: every timestep up to t0 until set_timesteps
    assert AlignedDDIMScheduler(1000, start_timestep=t0).timesteps.tolist() == list(range(t0, -1, -1))


def test_ddim_start_timestep_refusals():
    with pytest.raises(ValueError, match="num_inference_steps must be in \\[1, 100\\]"):
        ddim_scheduler(1000, 101, start_timestep=99)  # more steps than timesteps up to t0
    with pytest.raises(ValueError, match="start_timestep must be in"):
        ddim_scheduler(1000, 1, start_timestep=1000)
    with pytest.raises(ValueError, match="start_timestep must be in"):
        ddim_scheduler(1000, 1, start_timestep=-1)
    with pytest.raises(ValueError, match="trailing"):
        ddim_scheduler(1000, 2, timestep_spacing="linspace", start_timestep=99)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("n", [1000, 50, 7, 1])
def test_ddim_with_an_eps_oracle_recovers_x0(spacing, n):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 1, 5, 5, 5, generator=g) * 2 - 1
    sched = ddim_scheduler(1000, n, timestep_spacing=spacing)
    eps = oracle_eps(sched, x0)
    x = torch.randn(x0.shape, generator=g)
    for t in sched.timesteps:
        x, _ = sched.step(eps(x, t), t, x)
    # one step from t = 999 divides ε's float32 rounding by √ᾱ_999 ≈ 3e-3
    torch.testing.assert_close(x, x0, atol=1e-5 if n > 1 else 2e-4, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_is_deterministic_at_eta_zero_only(eta):
    sched = ddim_scheduler(1000, 10)
    x_t = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(seed):
        x = x_t.clone()
        g = torch.Generator().manual_seed(seed)
        for t in sched.timesteps:
            x, _ = sched.step(0.5 * torch.tanh(x), t, x, eta=eta, generator=g)
        return x

    a, b = run(1), run(2)
    if eta == 0:
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    else:
        assert (a - b).abs().max() > 1e-3
        torch.testing.assert_close(run(1), a, atol=0, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_aligned_ddim_is_monais_update_where_monais_stride_is_right(eta, prediction_type):
    """Trailing spacing with T divisible by N: MONAI's stride T // N is the list's, so both steps agree."""
    kw = dict(schedule=SCHEDULE, prediction_type=prediction_type)
    ours = ddim_scheduler(1000, 10, **kw)
    monai = DDIMScheduler(1000, **kw)
    monai.set_timesteps(10)
    monai.timesteps = ours.timesteps.clone()
    x0 = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    xa = xb = x0
    ga, gb = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for t in ours.timesteps:
        xa, pa = ours.step(torch.sin(xa), t, xa, eta=eta, generator=ga)
        xb, pb = monai.step(torch.sin(xb), t, xb, eta=eta, generator=gb)
        torch.testing.assert_close(xa, xb, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


MU, S = 0.3, 0.2  # a per-voxel Gaussian prior N(MU, S²): its exact ε̂(x_t, t) is affine in x_t


def gaussian_prior_ddim(sched) -> tuple[float, float]:
    """DDIM (η = 0) with the exact ε of the Gaussian prior is an affine map x_T -> a·x_T + c: returns (c, a)."""

    def eps(x, t):
        ab = sched.alphas_cumprod[int(t)].double()
        return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)

    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for t in sched.timesteps:
        x, _ = sched.step(eps(x, t), t, x)
    return x[0].item(), (x[1] - x[0]).item()


@pytest.mark.parametrize("n", [5, 10, 20])
def test_aligned_ddim_keeps_the_prior_mean_where_monais_stride_does_not(n):
    """Each aligned step maps the mean √ᾱ_t·μ to √ᾱ_prev·μ, so the output mean is μ at any N; with MONAI's stride the
    network is asked about a less noisy t than the state's, and the mean drifts (MONAI 1.6, tripwire below)."""
    ours = ddim_scheduler(1000, n, clip_sample=False)
    offset, gain = gaussian_prior_ddim(ours)
    start_mean = math.sqrt(ours.alphas_cumprod[-1].item()) * MU  # E[x_T] under the forward process
    assert offset + gain * start_mean == pytest.approx(MU, abs=2e-4)
    assert 0 < gain * math.sqrt(1 - ours.alphas_cumprod[-1].item()) <= S  # DDIM with few steps shrinks the spread
    monai = DDIMScheduler(1000, SCHEDULE, clip_sample=False)
    monai.set_timesteps(n)
    m_offset, m_gain = gaussian_prior_ddim(monai)
    # tripwire: if MONAI's DDIM step ever follows its timestep list, AlignedDDIMScheduler can go
    assert abs(m_offset + m_gain * start_mean - MU) > 2e-3


def test_builders_and_refusals():
    ddpm = ddpm_scheduler(50)
    assert isinstance(ddpm, DDPMScheduler) and ddpm.variance_type == "fixed_small" and ddpm.clip_sample
    ddim = ddim_scheduler(50, 5, clip_sample=False)
    assert isinstance(ddim, DDIMScheduler) and ddim.num_inference_steps == 5 and not ddim.clip_sample
    with pytest.raises(ValueError, match="timestep_spacing"):
        ddim_scheduler(50, 5, timestep_spacing="leading")
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_scheduler(50, 51)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_scheduler(50, 0)
