"""Tests of common.diffusion.samplers against an analytic Gaussian denoiser, plus call counting and seeding, and of
the Heun correction bound (``max_correction_gain``) shared with common.diffusion.guidance.sample_heun_dps."""

import math

import pytest
import torch

from common.diffusion.guidance import sample_heun_dps
from common.diffusion.samplers import (
    RECOMMENDED_MAX_CORRECTION_GAIN,
    SAMPLERS,
    get_sigmas_karras,
    heun_correction_gain,
    make_noise,
    num_evaluations,
    paper_2p5d_sigmas,
    sample_euler,
    sample_heun,
    sample_paper_2p5d,
    sample_paper_3d,
    takes_heun_correction,
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


# ------------------------------------------------------------------------------ Heun correction bound (few steps)

# the 4-step grid of the EDM cards: 5, 0.845, 0.0774, 0.002, 0; correction gains 2.46, 4.95, 18.86
FEW = get_sigmas_karras(4, 2e-3, 5.0, dtype=torch.float64)
FEW_GAINS = [2.459, 4.954, 18.86]


def reference_heun(denoiser, x, sigmas, s_churn=0.0, noise=None, eval_at_sigma_hat=True):
    """EDM Algorithm 2 written out (churn over all σ, S_noise 1), as sample_heun computed it before the bound."""
    grid = sigmas.tolist()
    n = len(grid) - 1
    for i in range(n):
        sigma, sigma_next = grid[i], grid[i + 1]
        gamma = min(s_churn / n, math.sqrt(2.0) - 1.0)
        sigma_hat = sigma * (1.0 + gamma) if gamma > 0 else sigma
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * noise(x)
        sig = torch.full((x.shape[0],), sigma_hat if eval_at_sigma_hat else sigma, dtype=x.dtype)
        d = (x - denoiser(x, sig)) / sigma_hat
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, torch.full((x.shape[0],), sigma_next, dtype=x.dtype))) / sigma_next
            x = x + (d + d_2) / 2 * dt
    return x


def offset_denoiser(eps: float, below: float = 0.01):
    """The exact Gaussian denoiser plus a constant error ``eps`` for σ < ``below`` (what offset noise leaves)."""

    def denoiser(x, sigma, cond=None):
        return gaussian_denoiser(x, sigma) + eps * (sigma.reshape(-1, 1) < below)

    return denoiser


def test_correction_gain_and_rule():
    gains = [heun_correction_gain(a, b) for a, b in zip(FEW[:-2].tolist(), FEW[1:-1].tolist())]
    assert gains == pytest.approx(FEW_GAINS, rel=1e-3)
    assert heun_correction_gain(1.0, 0.0) == math.inf
    assert takes_heun_correction(3.0, 1.0, 1.0) and not takes_heun_correction(3.0 + 1e-9, 1.0, 1.0)  # gain 1: σ̂ = 3σ'
    assert takes_heun_correction(1e6, 1e-6)  # no bound: every step to σ > 0 (EDM Algorithm 2) ...
    assert not any(takes_heun_correction(s, 0.0, g) for s in (1e-3, 5.0) for g in (None, 0.0, 1e9))  # ... never to 0
    assert not takes_heun_correction(1.0, 0.99, 0.0)  # 0: Euler everywhere


@pytest.mark.parametrize("s_churn, eval_at_sigma_hat", [(0.0, True), (3.0, True), (3.0, False)])
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_heun_default_is_bit_identical_to_algorithm_2(steps, s_churn, eval_at_sigma_hat):
    x_t, sigmas = initial_noise()[:256], grid(steps)

    def run(fn, **kw):
        noise = make_noise(torch.Generator().manual_seed(5))
        return fn(gaussian_denoiser, x_t, sigmas, s_churn=s_churn, noise=noise, eval_at_sigma_hat=eval_at_sigma_hat,
                  **kw)

    expected = run(reference_heun)
    assert torch.equal(run(sample_heun), expected)
    assert torch.equal(run(sample_heun, max_correction_gain=None), expected)
    assert torch.equal(run(sample_heun, max_correction_gain=1e9), expected)  # a bound no interval reaches
    if steps > 1:
        assert not torch.equal(run(sample_heun, max_correction_gain=0.0), expected)
    torch.testing.assert_close(run(sample_heun, max_correction_gain=0.0), run(sample_euler), rtol=0, atol=0)


@pytest.mark.parametrize("steps, sigma_min, sigma_max", [(20, 2e-3, 5.0), (16, 2e-3, 5.0), (16, 0.01, 53.57)])
def test_recommended_bound_leaves_the_many_step_grids_alone(steps, sigma_min, sigma_max):
    """EDM's 16/20 Heun steps and SRMRI's default 16: no interval's gain exceeds 1, so the result is unchanged."""
    sigmas = get_sigmas_karras(steps, sigma_min, sigma_max, dtype=torch.float64)
    x_t = initial_noise()[:64] / SIGMA_MAX * sigma_max
    assert num_evaluations(sigmas, 2, RECOMMENDED_MAX_CORRECTION_GAIN) == 2 * steps - 1
    out = sample_heun(gaussian_denoiser, x_t, sigmas, max_correction_gain=RECOMMENDED_MAX_CORRECTION_GAIN)
    assert torch.equal(out, sample_heun(gaussian_denoiser, x_t, sigmas))


@pytest.mark.parametrize("max_gain, amplified", [(None, True), (19.0, True), (18.0, False), (5.0, False),
                                                 (RECOMMENDED_MAX_CORRECTION_GAIN, False), (0.0, False)])
def test_few_step_heun_amplifies_a_small_sigma_error_unless_bounded(max_gain, amplified):
    """The collapse of the EDM cards on the 4-step grid: an error ε of D below σ = 0.01 (only D(·; 0.002) sees it)
    reaches the sample as ε·(1 + g·S²/(S² + σ²)) with g = 18.86 through Heun's last correction, as ε without it.

    Sampler and denoiser are affine, so the difference between the runs with and without ε is exactly that."""
    eps = 1e-3
    x_t = initial_noise()[:512] / SIGMA_MAX * 5.0
    delta = (sample_heun(offset_denoiser(eps), x_t, FEW, max_correction_gain=max_gain)
             - sample_heun(gaussian_denoiser, x_t, FEW, max_correction_gain=max_gain))
    sigma_last = FEW[-2].item()
    gain = (FEW[-3].item() - sigma_last) / (2 * sigma_last)
    expected = eps * (1 + gain * S**2 / (S**2 + sigma_last**2)) if amplified else torch.full_like(S, eps)
    torch.testing.assert_close(delta, expected.expand_as(delta), rtol=1e-6, atol=1e-12)
    if amplified:
        assert (delta > 18 * eps).all()


def test_few_step_heun_error_against_the_exact_ode():
    """End to end on the 4-step grid with a D error of 0.02 below σ = 0.01: unbounded Heun's distance to the exact
    ODE solution grows by about 19·ε, the bounded sampler's by at most ε."""
    eps = 0.02
    x_t = initial_noise()[:2000] / SIGMA_MAX * 5.0
    exact = exact_ode(x_t, 5.0)

    def err(denoiser, gain):
        return (sample_heun(denoiser, x_t, FEW, max_correction_gain=gain) - exact).abs().mean().item()

    grow_heun = err(offset_denoiser(eps), None) - err(gaussian_denoiser, None)
    grow_fixed = err(offset_denoiser(eps), RECOMMENDED_MAX_CORRECTION_GAIN) - err(gaussian_denoiser,
                                                                                  RECOMMENDED_MAX_CORRECTION_GAIN)
    assert grow_heun > 10 * eps and grow_fixed <= eps
    assert err(offset_denoiser(eps), RECOMMENDED_MAX_CORRECTION_GAIN) < 0.5 * err(offset_denoiser(eps), None)


@pytest.mark.parametrize("max_gain, expected", [(None, 7), (1e9, 7), (19.0, 7), (18.0, 6), (5.0, 6), (4.9, 5),
                                                (2.5, 5), (RECOMMENDED_MAX_CORRECTION_GAIN, 4), (0.0, 4)])
def test_denoiser_calls_with_the_bound(max_gain, expected):
    """One call per step, one more per corrected step (an Euler step costs one); the corrections at the right σ."""
    counting, seen = Counting(), []
    sample_heun(counting, initial_noise()[:8] / SIGMA_MAX * 5.0, FEW, max_correction_gain=max_gain,
                callback=lambda i, n, s, x, d: seen.append(i))
    assert len(counting.sigmas) == num_evaluations(FEW, 2, max_gain) == expected
    assert seen == [0, 1, 2, 3]  # callback once per step whatever the bound
    corrected = [b for a, b in zip(FEW[:-1].tolist(), FEW[1:].tolist()) if takes_heun_correction(a, b, max_gain)]
    called = [s[0].item() for s in counting.sigmas]
    assert sorted(called, reverse=True) == pytest.approx(sorted(FEW[:-1].tolist() + corrected, reverse=True))


@pytest.mark.parametrize("steps, s_churn, max_gain", [(6, 0.0, 1.0), (6, 3.0, 1.0), (10, 20.0, 1.0), (4, 0.0, None),
                                                      (8, 5.0, 2.0)])
def test_num_evaluations_counts_what_the_samplers_call(steps, s_churn, max_gain):
    """Churn raises σ̂ and with it the gains: the count follows the samplers (Heun and Euler) exactly."""
    sigmas = get_sigmas_karras(steps, 2e-3, 5.0, dtype=torch.float64)
    for order, sampler in ((1, sample_euler), (2, sample_heun)):
        counting = Counting()
        kw = {"max_correction_gain": max_gain} if order == 2 else {}
        sampler(counting, initial_noise()[:8], sigmas, s_churn=s_churn,
                noise=make_noise(torch.Generator().manual_seed(0)), **kw)
        assert len(counting.sigmas) == num_evaluations(sigmas, order, max_gain, s_churn)
    assert num_evaluations(sigmas, 1) == steps and num_evaluations(sigmas, 2) == 2 * steps - 1


@pytest.mark.parametrize("max_gain", [None, 5.0, RECOMMENDED_MAX_CORRECTION_GAIN])
def test_guided_heun_takes_the_same_corrections(max_gain):
    """SRMRI's fast path (sample_heun_dps on D = x + σ²s) follows the same rule: unguided, it is sample_heun."""

    def score(x, sigma):
        s2 = sigma.reshape(-1, 1) ** 2
        return (gaussian_denoiser(x, sigma) - x) / s2

    x_t = initial_noise()[:64] / SIGMA_MAX * 5.0
    stats: dict = {}
    guided = sample_heun_dps(score, x_t, FEW, torch.zeros(64, 5, dtype=torch.float64), lambda x: x, zeta=0.0,
                             max_correction_gain=max_gain, stats=stats)
    plain = sample_heun(gaussian_denoiser, x_t, FEW, max_correction_gain=max_gain)
    torch.testing.assert_close(guided, plain, rtol=1e-9, atol=1e-9)
    assert stats["nfe"] == num_evaluations(FEW, 2, max_gain)
