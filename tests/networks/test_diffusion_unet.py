"""Tests of common.networks.diffusion_unet: the single-tensor call is ε at the probe timestep, the weights are
MONAI DiffusionModelUNet's, and a traced export reproduces the network."""

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from common.networks import ConcatDiffusionModelUNet

CASES = [
    (2, dict(spatial_dims=2, in_channels=2, out_channels=1, channels=(8, 16), attention_levels=(False, True),
             num_res_blocks=1, norm_num_groups=8, num_head_channels=8), (2, 2, 16, 16)),
    (3, dict(spatial_dims=3, in_channels=2, out_channels=1, channels=(8, 16), attention_levels=(False, False),
             num_res_blocks=1, norm_num_groups=8, num_head_channels=8), (2, 2, 8, 16, 16)),
]


def _net(kwargs, **extra) -> ConcatDiffusionModelUNet:
    """A network with every parameter random: MONAI zero-initialises the output convolution (ε = 0 at start)."""
    torch.manual_seed(0)
    net = ConcatDiffusionModelUNet(**kwargs, **extra).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("dims, kwargs, shape", CASES, ids=["2d", "3d"])
def test_probe_call_is_the_network_at_the_probe_timestep(dims, kwargs, shape):
    net = _net(kwargs, probe_timestep=7)
    x = torch.randn(shape)
    with torch.no_grad():
        probe = net(x)
        explicit = net(x, torch.full((shape[0],), 7, dtype=torch.long))
        other = net(x, torch.full((shape[0],), 500, dtype=torch.long))
    assert probe.shape == (shape[0], 1, *shape[2:])
    torch.testing.assert_close(probe, explicit)
    assert not torch.allclose(probe, other)  # the timestep reaches the output: the check above can fail

    monai_net = DiffusionModelUNet(**kwargs).eval()
    monai_net.load_state_dict(net.state_dict())  # same parameter names and shapes (strict)
    with torch.no_grad():
        torch.testing.assert_close(monai_net(x, torch.full((shape[0],), 7, dtype=torch.long)), probe)


@pytest.mark.parametrize("dims, kwargs, shape", CASES, ids=["2d", "3d"])
def test_traced_export_reproduces_the_network(dims, kwargs, shape):
    """What ``ckpt_export --use_trace True`` does: trace the single-tensor call."""
    net = _net(kwargs)
    x = torch.randn(shape)
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
        torch.testing.assert_close(traced(x), net(x), rtol=1e-4, atol=1e-5)


def test_negative_probe_timestep_is_refused():
    with pytest.raises(ValueError, match="probe_timestep"):
        ConcatDiffusionModelUNet(**CASES[0][1], probe_timestep=-1)
