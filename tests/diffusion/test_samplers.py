"""Tests of common.diffusion.samplers against an analytic Gaussian denoiser, plus call counting and seeding."""

import math

import pytest
import torch

from common.diffusion.samplers import (
    SAMPLERS,
    get_sigmas_karras,
    make_noise,
    paper_2p5d_sigmas,
    sample_euler,
    sample_heun,
    sample_paper_2p5d,
    sample_paper_3d,
)

# data ~ N(MU, S²) independently per dimension: D(x; σ) = (S² x + σ² MU) / (S² + σ²) exactly
MU = torch.tensor([-0.8, -0.2, 0.0, 0.3, 0.9], dtype=torch.float64)
S = torch.tensor([0.05, 0.2, 0.5, 0.3, 0.1], dtype=torch.float64)
SIGMA_MAX = 80.0
N_SAMPLES = 20_000


def gaussian_denoiser(x, sigma, cond=None):
    s2 = sigma.reshape(-1, 1) ** 2
    return (S**2 * x + s2 * MU) / (S**2 + s2)


class Counting:
    """Wraps a denoiser; records the σ of every call."""

    def __init__(self, fn=gaussian_denoiser):
        self.fn, self.sigmas = fn, []

    def __call__(self, x, sigma, cond=None):
        self.sigmas.append(sigma.clone())
        return self.fn(x, sigma, cond)


def initial_noise(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_SAMPLES, 5, generator=g, dtype=torch.float64) * SIGMA_MAX


def exact_ode(x_t: torch.Tensor, sigma_t: float = SIGMA_MAX) -> torch.Tensor:
    """The probability-flow ODE solution at σ = 0 for Gaussian data: MU + (x_T − MU)·S/sqrt(S² + σ_T²)."""
    return MU + (x_t - MU) * S / torch.sqrt(S**2 + sigma_t**2)


def grid(n: int) -> torch.Tensor:
    return get_sigmas_karras(n, 2e-3, SIGMA_MAX, dtype=torch.float64)


@pytest.mark.parametrize("n, sigma_min, sigma_max, rho", [(1, 2e-3, 5.0, 7.0), (2, 2e-3, 5.0, 7.0),
                                                          (20, 2e-3, 5.0, 7.0), (18, 2e-3, 80.0, 7.0),
                                                          (10, 0.01, 1.0, 3.0)])
def test_karras_grid(n, sigma_min, sigma_max, rho):
    sigmas = get_sigmas_karras(n, sigma_min, sigma_max, rho, dtype=torch.float64)
    assert sigmas.shape == (n + 1,)
    assert sigmas[0].item() == pytest.approx(sigma_max) and sigmas[-1] == 0
    if n > 1:
        assert sigmas[-2].item() == pytest.approx(sigma_min)
        mid = (sigma_max ** (1 / rho) + 0.5 * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        if n % 2 == 1:
            assert sigmas[n // 2].item() == pytest.approx(mid)
    assert (sigmas[1:] < sigmas[:-1]).all()
    with pytest.raises(ValueError):
        get_sigmas_karras(0)


@pytest.mark.parametrize("sampler, steps", [(sample_euler, 200), (sample_heun, 40)])
def test_lands_on_the_data_distribution(sampler, steps):
    x_t = initial_noise()
    x0 = sampler(gaussian_denoiser, x_t, grid(steps))
    # expectations of the exact ODE map from N(0, σ_max²): nearly N(MU, S²)
    mean = MU * (1 - S / torch.sqrt(S**2 + SIGMA_MAX**2))
    std = S * SIGMA_MAX / torch.sqrt(S**2 + SIGMA_MAX**2)
    se = std / math.sqrt(N_SAMPLES)
    assert ((x0.mean(0) - mean).abs() < 5 * se + 0.02 * S).all()
    assert ((x0.std(0) / std - 1).abs() < 0.03).all()


@pytest.mark.parametrize("steps", [20, 40, 80])
def test_heun_more_accurate_than_euler(steps):
    x_t = initial_noise()
    exact = exact_ode(x_t)
    err_e = ((sample_euler(gaussian_denoiser, x_t, grid(steps)) - exact) / S).abs().mean()
    err_h = ((sample_heun(gaussian_denoiser, x_t, grid(steps)) - exact) / S).abs().mean()
    assert err_h < 0.5 * err_e


def test_convergence_orders():
    x_t = initial_noise()
    exact = exact_ode(x_t)
    err = {
        name: [((fn(gaussian_denoiser, x_t, grid(n)) - exact) / S).abs().mean().item() for n in (20, 40, 80)]
        for name, fn in SAMPLERS.items()
    }
    for a, b in zip(err["euler"], err["euler"][1:]):
        assert 0.35 < b / a < 0.65  # first order: halves
    for a, b in zip(err["heun"], err["heun"][1:]):
        assert b / a < 0.35  # second order: about a quarter


@pytest.mark.parametrize("sampler, steps, s_churn", [(sample_euler, 200, 10.0), (sample_heun, 80, 80.0)])
def test_churn_lands_on_the_data_distribution(sampler, steps, s_churn):
    """Stochastic sampling (EDM Algorithm 2); Euler's discretisation error shows as a few % too little variance."""
    noise = make_noise(torch.Generator().manual_seed(1))
    x0 = sampler(gaussian_denoiser, initial_noise(), grid(steps), s_churn=s_churn, noise=noise)
    assert ((x0.mean(0) - MU).abs() < 0.05 * S).all()
    assert ((x0.std(0) / S - 1).abs() < 0.05).all()


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_seeding(sampler):
    x_t = initial_noise()[:64]

    def run(seed):
        noise = make_noise(torch.Generator().manual_seed(seed))
        return sampler(gaussian_denoiser, x_t, grid(6), s_churn=5.0, noise=noise)

    torch.testing.assert_close(run(3), run(3))
    assert not torch.allclose(run(3), run(4))
    # without churn the samplers are deterministic and draw no noise
    torch.testing.assert_close(sampler(gaussian_denoiser, x_t, grid(6)), sampler(gaussian_denoiser, x_t, grid(6)))


@pytest.mark.parametrize("sampler, calls_per_step", [(sample_euler, 1), (sample_heun, 2)])
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_callback_and_call_counts(sampler, calls_per_step, steps):
    seen = []
    counting = Counting()
    sigmas = grid(steps)
    sampler(counting, initial_noise()[:8], sigmas, callback=lambda i, n, s, x, d: seen.append((i, n, s)))
    assert [i for i, _, _ in seen] == list(range(steps)) and all(n == steps for _, n, _ in seen)
    assert [s for _, _, s in seen] == pytest.approx(sigmas[:-1].tolist())
    assert len(counting.sigmas) == calls_per_step * steps - (calls_per_step - 1)  # Heun: no 2nd call at σ = 0
    assert all(s.shape == (8,) for s in counting.sigmas)


def test_churn_evaluates_at_sigma_hat():
    counting = Counting()
    sigmas = grid(4)
    sample_euler(counting, initial_noise()[:4], sigmas, s_churn=0.4, noise=make_noise(torch.Generator().manual_seed(0)))
    gamma = min(0.4 / 4, math.sqrt(2) - 1)
    assert [s[0].item() for s in counting.sigmas] == pytest.approx((sigmas[:-1] * (1 + gamma)).tolist())
    counting = Counting()
    sample_euler(counting, initial_noise()[:4], sigmas, s_churn=0.4, s_tmin=1.0, s_tmax=10.0,
                 noise=make_noise(torch.Generator().manual_seed(0)))
    expected = [s * (1 + gamma) if 1.0 <= s <= 10.0 else s for s in sigmas[:-1].tolist()]
    assert [s[0].item() for s in counting.sigmas] == pytest.approx(expected)


def test_paper_2p5d_is_one_network_call():
    counting = Counting(lambda x, sigma, cond: x * 0 + cond)
    like = torch.zeros(2000, 5, dtype=torch.float64)
    cond = torch.randn(2000, 5, dtype=torch.float64)
    seen = []
    out = sample_paper_2p5d(counting, like, cond, noise=make_noise(torch.Generator().manual_seed(0)),
                            callback=lambda i, n, s, x, d: seen.append(x))
    assert len(counting.sigmas) == 1 and len(seen) == 1
    torch.testing.assert_close(counting.sigmas[0], torch.full((2000,), 5.0, dtype=torch.float64))
    torch.testing.assert_close(out, cond)  # one step to σ = 0 returns D itself
    # the denoiser saw z + S_noise·sqrt(σ̂² − σ²)·z' = z + 0.9·5·z' (γ = √2 − 1 for one step with S_churn = 10)
    assert seen[0].std().item() == pytest.approx(math.sqrt(1 + 4.5**2), rel=0.03)
    torch.testing.assert_close(paper_2p5d_sigmas(), torch.tensor([5.0, 0.0]))


def test_make_noise():
    assert make_noise()(torch.zeros(3, 4, dtype=torch.float64)).dtype == torch.float64
    a = make_noise(torch.Generator().manual_seed(0))(torch.zeros(3, 4))
    b = make_noise(torch.Generator().manual_seed(0))((3, 4))
    torch.testing.assert_close(a, b)
    n = make_noise(torch.Generator().manual_seed(0))(torch.zeros(100_000))
    assert abs(n.mean().item()) < 0.02 and n.std().item() == pytest.approx(1.0, abs=0.02)


def test_paper_2p5d_seeding():
    like = torch.zeros(3, 1, 4, 4)

    def run(seed):
        return sample_paper_2p5d(lambda x, s, c: x, like, noise=make_noise(torch.Generator().manual_seed(seed)))

    torch.testing.assert_close(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_paper_3d_is_twenty_euler_steps():
    counting = Counting()
    out = sample_paper_3d(counting, torch.zeros(16, 5, dtype=torch.float64),
                          noise=make_noise(torch.Generator().manual_seed(0)))
    assert len(counting.sigmas) == 20
    assert [s[0].item() for s in counting.sigmas] == pytest.approx(get_sigmas_karras(20, 2e-3, 5.0)[:-1].tolist())
    assert torch.isfinite(out).all()


def test_works_with_edm_denoiser_and_cond():
    from common.diffusion.edm import EDMPrecond
    from common.networks.adagn_unet import AdaGNUNet

    torch.manual_seed(0)
    net = AdaGNUNet(spatial_dims=2, in_channels=2, channels=(8, 16), cond_channels=16)
    denoiser = EDMPrecond(net).eval()
    cond = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        out = sample_heun(denoiser, torch.randn(2, 1, 8, 8) * 5, get_sigmas_karras(3, sigma_max=5.0), cond,
                          s_churn=1.0, noise=make_noise(torch.Generator().manual_seed(0)))
        one = sample_paper_2p5d(denoiser, cond, cond)
    assert out.shape == one.shape == cond.shape
