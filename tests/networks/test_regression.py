"""The 2.5D regression baseline: the bundle's backbone as LR -> HR regression, called like the EDM denoiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.engines.regression import RegressionPrepareBatch
from common.networks import AdaGNUNet
from common.networks.regression import RegressionSR


def _model(num_cond=2, target_index=-1):
    torch.manual_seed(0)
    return RegressionSR(AdaGNUNet(2, num_cond, 1, channels=(8, 16), cond_channels=16, num_res_blocks=1),
                        num_cond=num_cond, target_index=target_index)


@pytest.mark.parametrize("num_cond, target_index", [(2, -1), (3, 1)])
def test_untrained_output_is_the_target_slice(num_cond, target_index):
    """The zero-initialised head makes the untrained model the (upsampled) target LR slice plus the head's bias, in
    every call form."""
    net = _model(num_cond, target_index)
    cond = torch.rand(2, num_cond, 16, 16) * 2 - 1
    target = cond[:, target_index % num_cond][:, None] + net.model.conv_out.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(net(torch.randn(2, 1, 16, 16), torch.tensor([5.0, 5.0]), cond), target)
        torch.testing.assert_close(net(cond), target)
        stacked = torch.cat([cond, torch.randn(2, 1, 16, 16)], 1)  # the single-input [cond, noisy] call
        torch.testing.assert_close(net(stacked), target)


def test_output_ignores_noise_and_sigma_once_trained():
    net = _model()
    nn.init.normal_(net.model.conv_out.weight, std=0.1)
    cond = torch.rand(2, 2, 16, 16) * 2 - 1
    with torch.no_grad():
        a = net(torch.randn(2, 1, 16, 16), torch.tensor([5.0, 5.0]), cond)
        b = net(torch.randn(2, 1, 16, 16), torch.tensor([0.1, 9.0]), cond)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, cond[:, 1:])


def test_prepare_batch_gives_the_plain_regression_pair():
    batch = {"image": torch.rand(3, 2, 8, 8), "label": torch.rand(3, 1, 8, 8)}
    inputs, targets, args, kwargs = RegressionPrepareBatch()(batch)
    torch.testing.assert_close(inputs, batch["image"] * 2 - 1)
    torch.testing.assert_close(targets, batch["label"] * 2 - 1)
    assert args == () and kwargs == {}
    # one optimiser step on MSE moves the output towards the HR
    net = _model()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    before = nn.functional.mse_loss(net(inputs), targets)
    before.backward()
    opt.step()
    with torch.no_grad():
        assert nn.functional.mse_loss(net(inputs), targets) < before


def test_wrong_conditioning_channels():
    with pytest.raises(ValueError, match="2 conditioning channels"):
        _model()(torch.randn(1, 1, 8, 8), 5.0, torch.randn(1, 1, 8, 8))
