"""The WGAN-GP PatchGAN critic (common.networks.critic): score-map size, per-sample independence (what the gradient
penalty needs), normalisation choices and TorchScript."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.networks.critic import patch_critic


@pytest.mark.parametrize(
    "spatial_dims, size, num_layers_d, in_channels",
    [(2, 32, 3, 1), (2, 48, 3, 4), (2, 24, 2, 1), (3, 24, 3, 2)],
)
def test_score_map_size(spatial_dims, size, num_layers_d, in_channels):
    torch.manual_seed(0)
    critic = patch_critic(spatial_dims, in_channels, channels=4, num_layers_d=num_layers_d)
    out = critic(torch.randn(2, in_channels, *([size] * spatial_dims)))
    assert isinstance(out, list) and len(out) == num_layers_d + 2
    side = size // 2**num_layers_d - 2
    assert out[-1].shape == (2, 1, *([side] * spatial_dims))


@pytest.mark.parametrize("norm", [("INSTANCE", {"affine": True}), ("GROUP", {"num_groups": 1}), None])
def test_each_sample_is_scored_alone(norm):
    """Changing the other samples of a batch does not change a sample's scores: no batch statistics."""
    torch.manual_seed(0)
    critic = patch_critic(2, 1, channels=4, num_layers_d=3, norm=norm).train()
    x = torch.randn(3, 1, 32, 32)
    y = x.clone()
    y[1:] = torch.randn(2, 1, 32, 32) * 5
    torch.testing.assert_close(critic(x)[-1][0], critic(y)[-1][0])
    assert not torch.allclose(critic(x)[-1][1], critic(y)[-1][1])


def test_normalisation_choices():
    with_norm = patch_critic(2, 1, channels=4, num_layers_d=2)
    norms = [m for m in with_norm.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 2 and all(m.affine for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in with_norm.modules())
    bare = patch_critic(2, 1, channels=4, num_layers_d=2, norm=None)
    assert not any(isinstance(m, (nn.InstanceNorm2d, nn.GroupNorm)) for m in bare.modules())
    assert all(m.bias is not None for m in bare.modules() if isinstance(m, nn.Conv2d))  # no norm: biased convs
    for norm in ("BATCH", ("batch", {"eps": 1e-3})):
        with pytest.raises(ValueError, match="batch normalisation"):
            patch_critic(norm=norm)


def test_torchscript():
    torch.manual_seed(0)
    critic = patch_critic(2, 2, channels=4, num_layers_d=2).eval()
    x = torch.randn(2, 2, 24, 24)
    scripted = torch.jit.script(critic)
    for a, b in zip(critic(x), scripted(x)):
        torch.testing.assert_close(a, b)
