"""Tests of common.diffusion.vesde with the analytic score of Gaussian data: schedule, loss, Tweedie, PC sampling."""

import math

import pytest
import torch

from common.diffusion.samplers import get_sigmas_karras, make_noise, sample_heun
from common.diffusion.vesde import (
    corrector_step,
    dsm_loss,
    get_sigmas_vesde,
    predictor_step,
    sample_pc,
    sample_sigma_vesde,
    score_to_denoiser,
    sigma_max_rule,
    tweedie,
    vesde_sigma,
)

# data ~ N(MU, S²) per dimension: p_σ = N(MU, S² + σ²), score(x, σ) = (MU − x)/(S² + σ²)
DIM = 200
MU = torch.linspace(-1, 1, DIM, dtype=torch.float64)
S = 0.2


def gaussian_score(x, sigma):
    return (MU - x) / (S**2 + sigma.reshape(-1, 1) ** 2)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n, sigma_min, sigma_max", [(1, 0.01, 378.0), (2, 0.01, 378.0), (2000, 0.01, 378.0),
                                                     (50, 0.05, 20.0)])
def test_vesde_grid(n, sigma_min, sigma_max):
    sigmas = get_sigmas_vesde(n, sigma_min, sigma_max, dtype=torch.float64)
    assert sigmas.shape == (n + 1,)
    assert sigmas[0].item() == pytest.approx(sigma_max) and sigmas[-1] == 0
    if n > 1:
        assert sigmas[-2].item() == pytest.approx(sigma_min)
        ratios = sigmas[1:-1] / sigmas[:-2]  # geometric: one constant ratio (σ_min/σ_max)^(1/(n−1))
        torch.testing.assert_close(ratios, torch.full_like(ratios, (sigma_min / sigma_max) ** (1 / (n - 1))))
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_vesde_sigma_endpoints():
    assert vesde_sigma(0.0).item() == pytest.approx(0.01)
    assert vesde_sigma(1.0).item() == pytest.approx(378.0)
    assert vesde_sigma(0.5, 1.0, 100.0).item() == pytest.approx(10.0)


def test_training_sigmas_are_log_uniform_and_seeded():
    s = sample_sigma_vesde(20_000, 0.01, 100.0, generator=_gen())
    assert s.min() >= 0.01 and s.max() <= 100.0
    t = (s.log() - math.log(0.01)) / math.log(100.0 / 0.01)
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t.var().item() == pytest.approx(1 / 12, abs=0.005)
    torch.testing.assert_close(s, sample_sigma_vesde(20_000, 0.01, 100.0, generator=_gen()))


def test_sigma_max_rule():
    images = torch.zeros(5, 1, 4, 4)
    images[2] = 1.0  # distance to a zero image: sqrt(16) = 4
    images[4] = -1.0  # to image 2: sqrt(16·4) = 8
    assert sigma_max_rule(images) == pytest.approx(8.0)
    big = torch.rand(150, 1, 4, 4, generator=_gen())  # more rows than one chunk
    brute = max((a - b).norm().item() for a in big for b in big)
    assert sigma_max_rule(big, max_images=None) == pytest.approx(brute, rel=1e-5)
    assert sigma_max_rule(big, max_images=10, generator=_gen()) <= brute  # a subset can only lower it
    with pytest.raises(ValueError):
        sigma_max_rule(images[:1])


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_dsm_loss_is_minimised_by_the_true_score(sigma):
    x0 = MU + S * torch.randn(4000, DIM, generator=_gen(1), dtype=torch.float64)
    sig = torch.full((4000,), sigma, dtype=torch.float64)
    loss = dsm_loss(gaussian_score, x0, sig, noise=make_noise(_gen(2)), reduce_mean=True)
    assert loss.item() == pytest.approx(S**2 / (S**2 + sigma**2), rel=0.02)  # E per voxel = s²/(s² + σ²)
    for scale in (0.8, 1.25):
        worse = dsm_loss(lambda x, s: scale * gaussian_score(x, s), x0, sig, noise=make_noise(_gen(2)),
                         reduce_mean=True)
        assert worse > loss
    summed = dsm_loss(gaussian_score, x0, sigma, noise=make_noise(_gen(2)))
    assert summed.item() == pytest.approx(DIM * loss.item(), rel=1e-9)


@pytest.mark.parametrize("sigma", [0.01, 0.3, 10.0])
def test_tweedie_is_the_posterior_mean(sigma):
    x = MU + math.sqrt(S**2 + sigma**2) * torch.randn(8, DIM, generator=_gen(), dtype=torch.float64)
    sig = torch.full((8,), sigma, dtype=torch.float64)
    posterior_mean = (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)
    torch.testing.assert_close(tweedie(x, gaussian_score(x, sig), sigma), posterior_mean)
    torch.testing.assert_close(score_to_denoiser(gaussian_score)(x, sig, None), posterior_mean)


def test_predictor_and_corrector_steps():
    x = torch.randn(3, DIM, generator=_gen(), dtype=torch.float64)
    score = gaussian_score(x, torch.full((3,), 2.0, dtype=torch.float64))
    z = torch.randn(3, DIM, generator=_gen(5), dtype=torch.float64)
    x_next, x_mean = predictor_step(x, score, 2.0, 1.5, make_noise(_gen(5)))
    torch.testing.assert_close(x_mean, x + (4.0 - 2.25) * score)
    torch.testing.assert_close(x_next, x_mean + math.sqrt(4.0 - 2.25) * z)
    x_last, _ = predictor_step(x, score, 2.0, 0.0, make_noise(_gen(5)), add_noise=False)
    torch.testing.assert_close(x_last, x + 4.0 * score)
    out = corrector_step(x, score, make_noise(_gen(5)), snr=0.16)
    eps = 2 * (0.16 * z.norm(dim=1) / score.norm(dim=1)) ** 2
    torch.testing.assert_close(out, x + eps[:, None] * score + (2 * eps[:, None]).sqrt() * z)


@pytest.mark.parametrize("n_corrector", [0, 1])
def test_pc_sampler_lands_on_the_data_distribution(n_corrector):
    sigma_max = 50.0
    sigmas = get_sigmas_vesde(100, 0.01, sigma_max, dtype=torch.float64)
    g = _gen(0)
    x = sigma_max * torch.randn(1000, DIM, generator=g, dtype=torch.float64)
    out = sample_pc(gaussian_score, x, sigmas, noise=make_noise(g), n_corrector=n_corrector)
    assert (out.mean(0) - MU).abs().max().item() < 0.04  # 4 standard errors of a 1000-sample mean
    assert out.std(0).mean().item() == pytest.approx(S, rel=0.04)  # Langevin at snr 0.16 adds ~2 %


def test_pc_sampler_seeding_and_callback():
    sigmas = get_sigmas_vesde(10, 0.01, 10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(4, DIM, generator=_gen(), dtype=torch.float64)
    calls = []
    a = sample_pc(gaussian_score, x, sigmas, noise=make_noise(_gen(7)), callback=lambda *args: calls.append(args))
    b = sample_pc(gaussian_score, x, sigmas, noise=make_noise(_gen(7)))
    c = sample_pc(gaussian_score, x, sigmas, noise=make_noise(_gen(8)))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert [call[0] for call in calls] == list(range(10)) and calls[0][1] == 10
    assert [call[2] for call in calls] == pytest.approx(sigmas[:-1].tolist())


def test_edm_heun_drives_a_ve_score_model():
    # the probability-flow ODE of Gaussian data has the closed form MU + (x_T − MU)·S/sqrt(S² + σ_T²)
    sigma_max = 80.0
    x = sigma_max * torch.randn(64, DIM, generator=_gen(), dtype=torch.float64)
    sigmas = get_sigmas_karras(40, 2e-3, sigma_max, dtype=torch.float64)
    out = sample_heun(score_to_denoiser(gaussian_score), x, sigmas)

    def posterior_mean(x, sigma, cond=None):
        s2 = sigma.reshape(-1, 1) ** 2
        return (S**2 * x + s2 * MU) / (S**2 + s2)

    torch.testing.assert_close(out, sample_heun(posterior_mean, x, sigmas))
    exact = MU + (x - MU) * S / math.sqrt(S**2 + sigma_max**2)
    torch.testing.assert_close(out, exact, atol=0.02, rtol=0)  # 10 % of S: the last Euler step to σ = 0
