"""EDM training batches for the stock trainer (common.engines.edm) and gradient clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from torch import nn

from common.diffusion.edm import SRDenoiser
from common.engines.edm import EDMPrepareBatch
from common.engines.handlers import GradientClipping
from common.networks import AdaGNUNet


def _denoiser(p_mean=-1.2):
    torch.manual_seed(0)
    model = AdaGNUNet(2, 3, 1, channels=(8, 16), cond_channels=16, num_res_blocks=1)
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return SRDenoiser(model, num_cond=2, p_mean=p_mean)


def _batch(b=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 2, size, size, generator=g), "label": torch.rand(b, 1, size, size, generator=g)}


def test_prepare_batch_target_is_f_space():
    net = _denoiser()
    batch = _batch()
    x_noisy, target, args, kwargs = EDMPrepareBatch(net, generator=torch.Generator().manual_seed(7))(batch)
    assert args == () and kwargs["raw"] is True and x_noisy.shape == target.shape == (3, 1, 16, 16)
    torch.testing.assert_close(kwargs["cond"], batch["image"] * 2 - 1)
    sigma = kwargs["sigma"]
    x0 = batch["label"] * 2 - 1
    c_skip, c_out, _, _ = net.get_scalings(sigma)
    torch.testing.assert_close(target, (x0 - c_skip.view(-1, 1, 1, 1) * x_noisy) / c_out.view(-1, 1, 1, 1))
    # the same generator draws give the same σ and noise as EDMPrecond.loss: MSE(F, target) is that loss
    with torch.no_grad():
        mse = nn.functional.mse_loss(net(x_noisy, **kwargs), target)
        loss = net.loss(x0, kwargs["cond"], generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(mse, loss)


@pytest.mark.parametrize("p_mean, expected_median", [(-1.2, float(np.exp(-1.2))), (0.0, 1.0)])
def test_prepare_batch_sigma_distribution(p_mean, expected_median):
    net = _denoiser(p_mean)
    batch = _batch(b=4000, size=2)
    _, _, _, kwargs = EDMPrepareBatch(net, generator=torch.Generator().manual_seed(0))(batch)
    assert abs(kwargs["sigma"].median().item() - expected_median) < 0.1 * expected_median


def test_gradient_clipping_bounds_the_norm():
    net = nn.Linear(10, 10)
    for p in net.parameters():
        p.grad = torch.full_like(p, 100.0)
    engine = Engine(lambda e, b: None)
    engine.network = net
    GradientClipping(max_norm=10.0)(engine)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in net.parameters()))
    assert norm <= 10.0 + 1e-4
    assert engine.state.metrics["grad_norm"] > 100
