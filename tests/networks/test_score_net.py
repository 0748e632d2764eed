"""Tests of common.networks.score_net: the NCSN++-style VE score model of the SRMRI bundle."""

import pytest
import torch

from common.diffusion.vesde import dsm_loss
from common.networks.score_net import CPU_CONFIG, PAPER_CONFIG, ScoreNet, gn_groups, score_net_paper
from network_helpers import randomize

TINY = dict(nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, mid_attention=True)


def _net(**kw) -> ScoreNet:
    torch.manual_seed(0)
    return randomize(ScoreNet(**{**TINY, **kw}), std=0.05).eval()


def test_paper_configuration_size():
    """nf 64, mults (1, 2, 2, 2), 4 blocks (SRMRI's NCSN++ size, without the progressive branches)."""
    net = score_net_paper()
    assert sum(p.numel() for p in net.parameters()) == 15_159_233
    assert PAPER_CONFIG["nf"] == 64 and tuple(PAPER_CONFIG["ch_mult"]) == (1, 2, 2, 2)
    assert PAPER_CONFIG["num_res_blocks"] == 4 and PAPER_CONFIG["fourier_scale"] == 16.0


def test_cpu_configuration_size():
    assert 1.0e6 < sum(p.numel() for p in ScoreNet(**CPU_CONFIG).parameters()) < 3.0e6


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (1, 1, 37, 50), (3, 1, 9, 17)])
def test_any_size_keeps_shape(shape):
    net = _net()
    out = net(torch.rand(shape), torch.tensor([0.5]))
    assert out.shape == shape and torch.isfinite(out).all()


def test_3d():
    net = _net(spatial_dims=3, num_res_blocks=1, ch_mult=(1, 2))
    x = torch.rand(2, 1, 10, 12, 7)
    assert net(x, torch.tensor([0.1, 2.0])).shape == x.shape


def test_zero_init_gives_zero_score_and_unit_loss():
    net = ScoreNet(**TINY)
    x0 = torch.rand(4, 1, 16, 16)
    assert net(x0, torch.tensor([1.0])).abs().max() == 0
    loss = dsm_loss(net, x0, torch.full((4,), 2.0), reduce_mean=True)
    assert abs(float(loss) - 1.0) < 0.1


def test_score_raw_and_probe_calls_agree():
    net = _net(probe_sigma=0.7)
    x = torch.rand(2, 1, 16, 16)
    sigma = torch.tensor([0.3, 4.0])
    score, raw = net(x, sigma), net(x, sigma, raw=True)
    torch.testing.assert_close(raw, score * sigma.reshape(-1, 1, 1, 1))
    probe = net(x)  # Tweedie denoiser at probe_sigma
    torch.testing.assert_close(probe, x + 0.7**2 * net(x, torch.tensor(0.7)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net(x, torch.tensor(0.3)), net(x, torch.tensor([0.3, 0.3])))


def test_input_scaling_and_raw_input_variant():
    x = torch.rand(1, 1, 16, 16)
    scaled, unscaled = _net(), _net(sigma_data=None)
    s = torch.tensor([3.0])
    # same weights: the preconditioned network sees x / sqrt(σ² + 0.5²)
    torch.testing.assert_close(scaled(x, s, raw=True), unscaled(x / (9.0 + 0.25) ** 0.5, s, raw=True))


def test_samples_of_a_batch_are_independent():
    net = _net()
    x = torch.rand(3, 1, 16, 16)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    full = net(x, sigma)
    for i in range(3):
        torch.testing.assert_close(full[i : i + 1], net(x[i : i + 1], sigma[i : i + 1]), rtol=1e-4, atol=1e-5)


def test_noise_level_changes_the_output():
    net = _net()
    x = torch.rand(1, 1, 16, 16)
    assert not torch.allclose(net(x, torch.tensor([0.1]), raw=True), net(x, torch.tensor([10.0]), raw=True))


def test_gradient_wrt_input_under_no_grad_context():
    """DPS differentiates through the network inside the evaluators' no_grad."""
    net = _net()
    with torch.no_grad(), torch.enable_grad():
        x = torch.rand(1, 1, 16, 16, requires_grad=True)
        (g,) = torch.autograd.grad(net(x, torch.tensor([0.5])).sum(), x)
    assert g.abs().sum() > 0


def test_bf16_autocast_close_to_fp32():
    net = _net()
    x = torch.rand(2, 1, 32, 32)
    sigma = torch.tensor([0.5, 2.0])
    ref = net(x, sigma, raw=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, sigma, raw=True)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_trace_and_script():
    net = _net()
    x = torch.rand(2, 1, 24, 40)
    traced = torch.jit.trace(net, torch.rand(1, 1, 32, 32))
    torch.testing.assert_close(traced(x), net(x), rtol=1e-4, atol=1e-5)  # other batch and size than traced
    scripted = torch.jit.script(net)
    sigma = torch.tensor([0.2, 3.0])
    torch.testing.assert_close(scripted(x, sigma), net(x, sigma), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-5)


def test_gn_groups():
    assert gn_groups(8) == 2 and gn_groups(64) == 16 and gn_groups(256) == 32 and gn_groups(3) == 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        ScoreNet(spatial_dims=1)
    with pytest.raises(ValueError):
        ScoreNet(ch_mult=(1, 2), attention_levels=(True,))
