"""Tests of common.diffusion.edm: preconditioning identities, limits, loss equivalence, σ sampler, noising."""

import math

import pytest
import torch

from common.diffusion.edm import EDMPrecond, add_training_noise, edm_coefficients, sample_sigma_lognormal
from common.networks.adagn_unet import AdaGNUNet

SIGMAS = torch.logspace(-4, 2, 61, dtype=torch.float64)


class RandomConvNet(torch.nn.Module):
    """A random backbone F(x_in, c_noise): one conv plus a c_noise-dependent bias; records its inputs."""

    def __init__(self, in_channels: int, out_channels: int = 1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        self.seen.append((x_in, c_noise))
        return self.conv(x_in.to(self.conv.weight.dtype)).to(x_in.dtype) + c_noise.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("sigma_offset", [0.0, 0.1, 0.3])
def test_preconditioning_identities(sigma_data, sigma_offset):
    c_skip, c_out, c_in, c_noise = edm_coefficients(SIGMAS, sigma_data, sigma_offset)
    s2 = SIGMAS**2 + sigma_offset**2  # σ'²
    one = torch.ones_like(SIGMAS)
    torch.testing.assert_close(c_in**2 * (s2 + sigma_data**2), one)
    torch.testing.assert_close(c_skip + c_out**2 / sigma_data**2, one)
    torch.testing.assert_close(c_out**2, c_skip * s2)
    torch.testing.assert_close(c_in**2 * sigma_data**2, c_skip)
    # unit variance of the training target (x0 - c_skip (x0 + n)) / c_out for x0 ~ σ_data, n ~ σ'
    torch.testing.assert_close(((1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * s2) / c_out**2, one)
    torch.testing.assert_close(c_noise, 0.25 * s2.sqrt().log())


def test_zero_offset_is_plain_edm():
    sd, s = 0.5, SIGMAS
    c_skip, c_out, c_in, c_noise = edm_coefficients(s, sd, 0.0)
    torch.testing.assert_close(c_skip, sd**2 / (s**2 + sd**2))  # Karras et al. 2022, Table 1
    torch.testing.assert_close(c_out, s * sd / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, 0.25 * s.log())


def test_offset_coefficients_at_zero_sigma():
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.zeros(1, dtype=torch.float64), 0.5, 0.1)
    torch.testing.assert_close(c_skip, torch.tensor([0.25 / 0.26], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.1 * 0.5 / math.sqrt(0.26)], dtype=torch.float64))
    torch.testing.assert_close(c_noise, torch.tensor([math.log(0.1) / 4], dtype=torch.float64))


def test_denoiser_tends_to_identity_without_offset():
    """Plain EDM: c_skip -> 1, c_out ~ σ, so |D(x; σ) - x| = O(σ |ln σ|) for a network (F grows with c_noise)."""
    net = RandomConvNet(1).double()
    precond = EDMPrecond(net, sigma_data=0.5, sigma_offset=0.0)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    errs = [(precond(x, s) - x).abs().max().item() for s in (1e-2, 1e-4, 1e-6)]
    assert errs[0] < 1e-1 and errs[2] < 1e-5
    assert errs[1] / errs[0] < 0.02 and errs[2] / errs[1] < 0.02


def test_offset_denoiser_is_continuous_at_zero_but_not_identity():
    """With offset noise σ' >= σ_off, so D(x; σ -> 0) -> D(x; 0) = c_skip(σ_off) x + c_out(σ_off) F, not x."""
    net = RandomConvNet(1).double()
    precond = EDMPrecond(net, sigma_data=0.5, sigma_offset=0.1)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    d0 = precond(x, 0.0)
    assert torch.isfinite(d0).all()
    torch.testing.assert_close(precond(x, 1e-7), d0)
    assert (d0 - x).abs().max() > 1e-2


@pytest.mark.parametrize("with_cond", [False, True])
def test_network_input_and_output(with_cond):
    net = RandomConvNet(3 if with_cond else 1)
    precond = EDMPrecond(net, sigma_data=0.5, sigma_offset=0.1)
    x, cond = torch.randn(2, 1, 6, 6), torch.rand(2, 2, 6, 6) * 2 - 1
    sigma = torch.tensor([0.3, 2.0])
    d = precond(x, sigma, cond if with_cond else None)
    x_in, c_noise = net.seen[-1]
    c_skip, c_out, c_in, c_noise_ref = edm_coefficients(sigma, 0.5, 0.1)
    expected_in = c_in.reshape(-1, 1, 1, 1) * x
    if with_cond:
        expected_in = torch.cat([cond / 0.5, expected_in], dim=1)
    assert c_noise.shape == (2,)
    torch.testing.assert_close(c_noise, c_noise_ref)
    torch.testing.assert_close(x_in, expected_in)
    f = net.conv(x_in) + c_noise.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d, c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * f)


@pytest.mark.parametrize("sigma", [0.7, torch.tensor(0.7), torch.tensor([0.7]), torch.tensor([0.7, 0.7])])
def test_sigma_forms(sigma):
    precond = EDMPrecond(RandomConvNet(1))
    x = torch.randn(2, 1, 5, 5)
    torch.testing.assert_close(precond(x, sigma), precond(x, torch.full((2,), 0.7)))


@pytest.mark.parametrize("sigma_offset", [0.0, 0.1])
def test_f_space_loss_is_weighted_d_space_loss(sigma_offset):
    """MSE(F, (x0 - c_skip x_n)/c_out) = λ(σ) ‖D - x0‖² with λ = 1/c_out² (Karras et al. 2022, eq. 8 / Table 1)."""
    precond = EDMPrecond(RandomConvNet(2).double(), sigma_offset=sigma_offset)
    x0 = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    cond = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    sigma = torch.tensor([0.01, 0.2, 1.5, 15.0], dtype=torch.float64)
    loss = precond.loss(x0, cond, torch.Generator().manual_seed(3), sigma=sigma, reduction="none")
    x_noisy = add_training_noise(x0, sigma, sigma_offset, torch.Generator().manual_seed(3))
    d = precond(x_noisy, sigma, cond)
    _, c_out, _, _ = edm_coefficients(sigma, 0.5, sigma_offset)
    weighted = (d - x0).square().flatten(1).mean(1) / c_out**2
    torch.testing.assert_close(loss, weighted.float() if loss.dtype == torch.float32 else weighted)
    mean = precond.loss(x0, cond, torch.Generator().manual_seed(3), sigma=sigma)
    torch.testing.assert_close(mean, loss.mean())


def test_training_target_has_unit_variance():
    """For x0 ~ N(0, σ_data²) the F-space target has unit variance at every σ, offset noise included."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4096, 1, 16, 16, generator=g, dtype=torch.float64) * 0.5
    for s in (0.01, 0.3, 5.0):
        sigma = torch.full((x0.shape[0],), s, dtype=torch.float64)
        x_noisy = add_training_noise(x0, sigma, 0.1, g)
        c_skip, c_out, _, _ = edm_coefficients(sigma, 0.5, 0.1)
        target = (x0 - c_skip.reshape(-1, 1, 1, 1) * x_noisy) / c_out.reshape(-1, 1, 1, 1)
        assert target.var().item() == pytest.approx(1.0, abs=0.02)


def test_training_noise_offset_is_per_batch_and_channel():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(2000, 3, 4, 4)
    off = add_training_noise(x0, torch.zeros(2000), 0.1, g)
    torch.testing.assert_close(off, off[..., :1, :1].expand_as(off))  # constant over space
    assert off[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.05)
    both = add_training_noise(x0, torch.full((2000,), 2.0), 0.1, g)
    assert both.var().item() == pytest.approx(4.0 + 0.01, rel=0.03)


@pytest.mark.parametrize(
    "p_mean, p_std, lo, hi", [(-1.2, 1.2, 2e-3, 20.0), (0.0, 0.5, 1e-3, 100.0), (-1.2, 3.0, 2e-3, 20.0)]
)
def test_sigma_sampler_distribution(p_mean, p_std, lo, hi):
    g = torch.Generator().manual_seed(0)
    sigma = sample_sigma_lognormal(200_000, p_mean, p_std, lo, hi, generator=g)
    assert sigma.min() >= lo and sigma.max() <= hi
    log_s = sigma.log()
    z_lo, z_hi = (math.log(lo) - p_mean) / p_std, (math.log(hi) - p_mean) / p_std
    p_lo, p_hi = 0.5 * math.erfc(-z_lo / math.sqrt(2)), 0.5 * math.erfc(z_hi / math.sqrt(2))
    if p_lo + p_hi < 1e-3:  # clip negligible: the log-normal's own moments
        assert log_s.mean().item() == pytest.approx(p_mean, abs=0.01)
        assert log_s.std().item() == pytest.approx(p_std, rel=0.01)
    else:  # the clip puts the tails' mass exactly on the bounds
        assert (sigma == lo).float().mean().item() == pytest.approx(p_lo, abs=0.005)
        assert (sigma == hi).float().mean().item() == pytest.approx(p_hi, abs=0.005)


def test_sigma_sampler_seeded():
    a = sample_sigma_lognormal(8, generator=torch.Generator().manual_seed(1))
    b = sample_sigma_lognormal(8, generator=torch.Generator().manual_seed(1))
    c = sample_sigma_lognormal(8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    precond = EDMPrecond(RandomConvNet(1), p_mean=0.0, p_std=0.1, sigma_min=0.5, sigma_max=1.5)
    s = precond.sample_sigma(1000, torch.Generator().manual_seed(0))
    assert s.min() >= 0.5 and s.max() <= 1.5 and s.log().mean().abs() < 0.02


def test_loss_trains_adagn_unet_and_is_reproducible():
    torch.manual_seed(0)
    net = AdaGNUNet(spatial_dims=2, in_channels=2, channels=(8, 16), cond_channels=16)
    precond = EDMPrecond(net)
    x0, cond = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    l1 = precond.loss(x0, cond, torch.Generator().manual_seed(5))
    l2 = precond.loss(x0, cond, torch.Generator().manual_seed(5))
    torch.testing.assert_close(l1, l2)
    l1.backward()
    assert all(p.grad is not None for p in net.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = precond.loss(x0, cond, torch.Generator().manual_seed(5))
    assert lb.dtype == torch.float32 and torch.isfinite(lb)
    with pytest.raises(ValueError):
        precond.loss(x0, cond, reduction="sum")


def test_denoiser_on_3d_volumes():
    torch.manual_seed(0)
    net = AdaGNUNet(spatial_dims=3, in_channels=2, channels=(8, 16), cond_channels=16)
    precond = EDMPrecond(net)
    x, cond = torch.randn(2, 1, 6, 6, 6), torch.rand(2, 1, 6, 6, 6)
    assert precond(x, torch.tensor([0.5, 2.0]), cond).shape == x.shape
    assert torch.isfinite(precond.loss(x.clamp(-1, 1), cond, torch.Generator().manual_seed(0)))
