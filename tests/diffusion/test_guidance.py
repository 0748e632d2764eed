"""Tests of common.diffusion.guidance: DPS with an analytic Gaussian score and a linear operator, SRMRI's sampler
(network-call counts, fusion steps, seeding) and the Heun + DPS fast path."""

import pytest
import torch

from common.diffusion.guidance import dps_eval, dps_step, sample_heun_dps, sample_srmri, upsample_measurement
from common.diffusion.operators import Downsample
from common.diffusion.samplers import get_sigmas_karras, make_noise
from common.diffusion.vesde import get_sigmas_vesde, tweedie
from common.diffusion.wavelets import wavedec2

S = 0.2  # prior: every pixel ~ N(MU, S²), MU a smooth image
SIZE = 16


def _mu(size=SIZE):
    r = torch.linspace(-1, 1, size, dtype=torch.float64)
    return (0.5 + 0.3 * torch.cos(2 * r[:, None]) * torch.sin(3 * r[None, :]))[None, None]


MU = _mu()


def gaussian_score(x, sigma, mu=MU):
    return (mu - x) / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2)


class Counting:
    """A score model that records the σ of every call."""

    def __init__(self, fn=gaussian_score):
        self.fn, self.sigmas = fn, []

    def __call__(self, x, sigma):
        self.sigmas.append(float(sigma[0]))
        return self.fn(x, sigma)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _problem(batch=2, seed=0, size=SIZE):
    mu = MU if size == SIZE else _mu(size)
    x_true = mu + S * torch.randn(batch, 1, size, size, generator=_gen(seed), dtype=torch.float64)
    op = Downsample((2, 2), "bicubic")
    return x_true, op(x_true), op


def _residual(y, op, x):
    return (y - op(x)).flatten(1).norm(dim=1)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_dps_gradient_is_the_analytic_one_and_a_step_reduces_the_residual(sigma):
    x_true, y, op = _problem()
    x = x_true + sigma * torch.randn(x_true.shape, generator=_gen(1), dtype=torch.float64)
    ev = dps_eval(gaussian_score, x, sigma, y, op)
    a = S**2 / (S**2 + sigma**2)  # x̂0 = a·x + (1 − a)·MU, so ∇ = −a·Aᵀ r/‖r‖
    r = y - op(ev.denoised)
    torch.testing.assert_close(ev.residual, r.flatten(1).norm(dim=1))
    probe = ev.denoised.clone().requires_grad_(True)
    (adj,) = torch.autograd.grad(op(probe), probe, grad_outputs=r / ev.residual.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(ev.grad, -a * adj)
    for step in (0.01, 0.05):  # ζ such that x̂0 moves by `step` (it moves by a²·ζ·Aᵀ r/‖r‖)
        x_new = dps_step(gaussian_score, x, sigma, y, op, zeta=step / a**2)
        sig = torch.full((2,), sigma, dtype=torch.float64)
        new = _residual(y, op, tweedie(x_new, gaussian_score(x_new, sig), sigma))
        assert (new < ev.residual - 0.1 * step).all()


def test_dps_works_under_no_grad_through_a_network():
    net = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)

    def score(x, sigma):
        return gaussian_score(x, sigma) + 0.1 * net(x)

    x_true, y, op = _problem()
    with torch.no_grad():
        ev = dps_eval(score, x_true + 0.3, 0.5, y, op)
    assert torch.isfinite(ev.grad).all() and ev.grad.abs().sum() > 0
    assert not ev.score.requires_grad and not ev.grad.requires_grad
    assert net.weight.grad is None  # only ∇_x is taken


def test_dps_images_are_independent_in_a_batch():
    x_true, y, op = _problem(batch=3)
    x = x_true + 0.5
    both = dps_step(gaussian_score, x, 0.5, y, op)
    alone = dps_step(gaussian_score, x[1:2], 0.5, y[1:2], op)
    torch.testing.assert_close(both[1:2], alone)


@pytest.mark.parametrize("n, skip, expected", [(10, 1, 20), (10, 2, 10), (11, 2, 12), (10, 3, 8), (6, 6, 2)])
def test_srmri_network_calls(n, skip, expected):
    _, y, op = _problem()
    sigmas = get_sigmas_vesde(n, 0.01, 10.0, dtype=torch.float64)
    model, stats = Counting(), {}
    x = 10.0 * torch.randn(2, 1, SIZE, SIZE, generator=_gen(10), dtype=torch.float64)
    sample_srmri(model, x, sigmas, y, op, skip=skip, noise=make_noise(_gen(1)), stats=stats)
    assert len(model.sigmas) == stats["nfe"] == expected
    assert len(stats["residuals"]) == expected
    # network calls happen only at levels i ≡ 0 (mod k), two each (corrector, predictor); fusion levels call none
    called = [float(sigmas[i]) for i in range(n) if i % skip == 0 for _ in range(2)]
    assert model.sigmas == pytest.approx(called)


def test_srmri_fusion_steps_set_the_approximation_band_to_the_measurement():
    size = 48
    _, y, op = _problem(batch=1, size=size)
    y_up = upsample_measurement(y, torch.zeros(1, 1, size, size, dtype=torch.float64))
    seen = {}

    def callback(i, n, sigma, x, denoised):
        seen[i] = x.clone()

    sigmas = get_sigmas_vesde(6, 0.01, 5.0, dtype=torch.float64)
    x = 5.0 * torch.randn(1, 1, size, size, generator=_gen(10), dtype=torch.float64)
    sample_srmri(lambda x, s: gaussian_score(x, s, _mu(size)), x, sigmas, y, op, skip=2, noise=make_noise(_gen(1)),
                 callback=callback)
    assert sorted(seen) == list(range(6))
    inner = (..., slice(6, -6), slice(6, -6))
    for i in (1, 3, 5):
        torch.testing.assert_close(wavedec2(seen[i])[0][inner], wavedec2(y_up)[0][inner])


def test_srmri_without_fusion_and_pure_dps():
    _, y, op = _problem()
    sigmas = get_sigmas_vesde(8, 0.01, 10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(2, 1, SIZE, SIZE, generator=_gen(10), dtype=torch.float64)

    def run(**kw):
        return sample_srmri(gaussian_score, x, sigmas, y, op, noise=make_noise(_gen(3)), **kw)

    assert not torch.allclose(run(skip=2, fusion=True), run(skip=2, fusion=False))
    torch.testing.assert_close(run(skip=1, fusion=True), run(skip=1, fusion=False))  # k = 1 never fuses
    # the skipped levels of the ablation do nothing: level 1 sees the state that level 0 produced
    states = []
    run(skip=2, fusion=False, callback=lambda i, n, s, xi, d: states.append(xi.clone()))
    assert len(states) == 8
    after_level_0 = sample_srmri(gaussian_score, x, sigmas[:2], y, op, noise=make_noise(_gen(3)))
    torch.testing.assert_close(states[1], after_level_0)


def test_srmri_seeding():
    _, y, op = _problem()
    sigmas = get_sigmas_vesde(6, 0.01, 10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(2, 1, SIZE, SIZE, generator=_gen(10), dtype=torch.float64)
    a = sample_srmri(gaussian_score, x, sigmas, y, op, noise=make_noise(_gen(5)))
    b = sample_srmri(gaussian_score, x, sigmas, y, op, noise=make_noise(_gen(5)))
    c = sample_srmri(gaussian_score, x, sigmas, y, op, noise=make_noise(_gen(6)))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("skip, fusion", [(1, False), (2, True)])
def test_srmri_guidance_makes_the_sample_consistent_with_the_measurement(skip, fusion):
    x_true, y, op = _problem(batch=4)
    sigmas = get_sigmas_vesde(60, 0.01, 10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(4, 1, SIZE, SIZE, generator=_gen(10), dtype=torch.float64)

    def run(zeta, fusion):
        return sample_srmri(gaussian_score, x, sigmas, y, op, skip=skip, zeta=zeta, fusion=fusion,
                            noise=make_noise(_gen(2)))

    unguided = _residual(y, op, run(0.0, False)).mean()
    guided = _residual(y, op, run(0.28, fusion)).mean()
    assert guided < 0.5 * unguided


@pytest.mark.parametrize("order, n, expected", [(2, 8, 15), (1, 8, 8), (2, 1, 1)])
def test_heun_dps_network_calls_and_consistency(order, n, expected):
    x_true, y, op = _problem(batch=4)
    sigmas = get_sigmas_karras(n, 2e-3, 10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(4, 1, SIZE, SIZE, generator=_gen(10), dtype=torch.float64)
    model, stats = Counting(), {}
    guided = sample_heun_dps(model, x, sigmas, y, op, zeta=1.0, order=order, stats=stats)
    assert len(model.sigmas) == stats["nfe"] == expected
    if n > 1:
        unguided = sample_heun_dps(gaussian_score, x, sigmas, y, op, zeta=0.0, order=order)
        assert _residual(y, op, guided).mean() < _residual(y, op, unguided).mean()


@pytest.mark.parametrize("interval, guided_steps", [(1, [0, 1, 2, 3, 4, 5]), (2, [1, 3, 5]), (4, [1, 5]), (9, [5])])
def test_heun_dps_guidance_interval(interval, guided_steps):
    """DPS (autograd through the network) at the last step and every k-th before it; plain evaluations elsewhere."""
    x_true, y, op = _problem(batch=4)
    sigmas = get_sigmas_karras(6, 2e-3, 10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(4, 1, SIZE, SIZE, generator=_gen(10), dtype=torch.float64)
    grad_enabled = []

    def model(x_, sigma):
        grad_enabled.append(torch.is_grad_enabled())
        return gaussian_score(x_, sigma)

    stats = {}
    out = sample_heun_dps(model, x, sigmas, y, op, zeta=1.0, order=1, guidance_interval=interval, stats=stats)
    assert [i for i, g in enumerate(grad_enabled) if g] == guided_steps
    assert stats["nfe"] == 6 and len(stats["residuals"]) == len(guided_steps)
    unguided = sample_heun_dps(gaussian_score, x, sigmas, y, op, zeta=0.0, order=1)
    torch.testing.assert_close(
        sample_heun_dps(gaussian_score, x, sigmas, y, op, zeta=0.0, order=1, guidance_interval=interval), unguided)
    assert _residual(y, op, out).mean() < _residual(y, op, unguided).mean()
    with pytest.raises(ValueError, match="guidance_interval"):
        sample_heun_dps(gaussian_score, x, sigmas, y, op, guidance_interval=0)


def test_heun_dps_seeding_fusion_and_no_guidance_equals_plain_heun():
    from common.diffusion.samplers import sample_heun
    from common.diffusion.vesde import score_to_denoiser

    _, y, op = _problem()
    sigmas = get_sigmas_karras(6, 2e-3, 10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(2, 1, SIZE, SIZE, generator=_gen(10), dtype=torch.float64)
    plain = sample_heun(score_to_denoiser(gaussian_score), x, sigmas, s_churn=5.0, noise=make_noise(_gen(4)))
    ours = sample_heun_dps(gaussian_score, x, sigmas, y, op, zeta=0.0, s_churn=5.0, noise=make_noise(_gen(4)))
    torch.testing.assert_close(ours, plain)
    a = sample_heun_dps(gaussian_score, x, sigmas, y, op, s_churn=5.0, fusion=True, noise=make_noise(_gen(4)))
    b = sample_heun_dps(gaussian_score, x, sigmas, y, op, s_churn=5.0, fusion=True, noise=make_noise(_gen(4)))
    c = sample_heun_dps(gaussian_score, x, sigmas, y, op, s_churn=5.0, fusion=True, noise=make_noise(_gen(9)))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_upsample_measurement():
    y = torch.rand(2, 1, 8, 6, dtype=torch.float64)
    assert upsample_measurement(y, torch.zeros(2, 1, 16, 18)).shape == (2, 1, 16, 18)
    const = torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64)
    torch.testing.assert_close(upsample_measurement(const, torch.zeros(1, 1, 8, 8)), torch.full((1, 1, 8, 8), 0.3,
                               dtype=torch.float64))
    with pytest.raises(ValueError):
        upsample_measurement(y, torch.zeros(2, 1, 15, 12))
    with pytest.raises(ValueError):
        sample_srmri(gaussian_score, torch.zeros(1, 1, 8, 8), [1.0, 0.0], y[:1], Downsample((2, 2)), skip=0)
