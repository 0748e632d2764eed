"""WGAN-GP losses (common.losses.gradient_penalty): the penalty of Gulrajani et al. eq. 3 on critics whose gradient
is known, its gradients for the critic, and its float32 computation under autocast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.losses.gradient_penalty import (
    critic_score,
    gradient_penalty,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)

SHAPE = (3, 2, 4, 5)  # B, C, H, W


class LinearCritic(nn.Module):
    """``D(x) = <w, x> + b``: its gradient is ``w`` everywhere. ``as_list``: MONAI-style list of maps."""

    def __init__(self, w: torch.Tensor, as_list: bool = False) -> None:
        super().__init__()
        self.w, self.b, self.as_list = nn.Parameter(w.clone()), nn.Parameter(torch.tensor(0.3)), as_list

    def forward(self, x):
        score = (x * self.w).flatten(1).sum(1, keepdim=True) + self.b
        return [x.abs(), score] if self.as_list else score


def _w(norm: float, seed: int = 0) -> torch.Tensor:
    w = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(seed))
    return w * (norm / w.norm())


def _pair(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


@pytest.mark.parametrize("norm", [1.0, 3.0, 0.5, 0.0])
@pytest.mark.parametrize("as_list", [False, True])
def test_linear_critic_penalty_is_norm_minus_one_squared(norm, as_list):
    real, fake = _pair()
    gp = gradient_penalty(LinearCritic(_w(norm), as_list), real, fake)
    torch.testing.assert_close(gp, torch.tensor((norm - 1.0) ** 2), atol=1e-5, rtol=1e-5)


def test_patch_map_score_is_the_mean_of_the_final_map():
    """A 1x1 convolution of weight a averaged over N = H·W pixels has gradient a/N per pixel: norm |a|/√N."""
    n = SHAPE[2] * SHAPE[3]
    conv = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.constant_(conv.weight, 3.0 * math.sqrt(n))
    real, fake = _pair()
    gp = gradient_penalty(conv, real[:, :1], fake[:, :1])
    torch.testing.assert_close(gp, torch.tensor(4.0))  # (3 - 1)²


@pytest.mark.parametrize("norm", [3.0, 0.5])
def test_penalty_gradient_for_the_critic(norm):
    """d/dw (‖w‖ − 1)² = 2(‖w‖ − 1)·w/‖w‖: the penalty trains the critic (create_graph)."""
    critic = LinearCritic(_w(norm))
    real, fake = _pair()
    gradient_penalty(critic, real, fake).backward()
    expected = 2 * (norm - 1) * critic.w.detach() / norm
    torch.testing.assert_close(critic.w.grad, expected, atol=1e-5, rtol=1e-5)
    assert critic.b.grad is None or critic.b.grad.abs().max() == 0  # the bias has no gradient w.r.t. x


def test_descending_the_penalty_brings_the_gradient_norm_to_one():
    critic = LinearCritic(_w(3.0))
    opt = torch.optim.SGD(critic.parameters(), lr=0.1)
    real, fake = _pair()
    for _ in range(100):
        opt.zero_grad()
        gradient_penalty(critic, real, fake).backward()
        opt.step()
    assert abs(critic.w.norm().item() - 1.0) < 1e-3


def test_interpolation_point_and_conditioning():
    """For ``D(x) = ½‖x‖² + <u, c>`` the gradient is x̂ itself: the penalty is the documented ε-draw's
    mean((‖x̂‖ − 1)²), whatever the condition c (passed, not interpolated)."""

    class Quadratic(nn.Module):
        def forward(self, x):
            c, xh = x[:, :1], x[:, 1:]
            return 0.5 * xh.pow(2).flatten(1).sum(1) + 7.0 * c.flatten(1).sum(1)

    real, fake = _pair()
    cond = torch.randn(SHAPE[0], 1, *SHAPE[2:])
    gp = gradient_penalty(Quadratic(), real, fake, condition=cond, generator=torch.Generator().manual_seed(5))
    eps = torch.rand(SHAPE[0], 1, 1, 1, generator=torch.Generator().manual_seed(5))
    x_hat = eps * real + (1 - eps) * fake
    expected = (x_hat.flatten(1).norm(dim=1) - 1).pow(2).mean()
    torch.testing.assert_close(gp, expected)
    # real == fake: x̂ is that image for every ε
    gp_same = gradient_penalty(Quadratic(), real, real, condition=cond)
    torch.testing.assert_close(gp_same, (real.flatten(1).norm(dim=1) - 1).pow(2).mean())
    assert eps.min() >= 0 and eps.max() <= 1 and not torch.allclose(eps, eps[0])


def test_penalty_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3))
    real, fake = _pair()
    ref = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp = gradient_penalty(critic, real.bfloat16(), fake, generator=torch.Generator().manual_seed(0))
    assert gp.dtype == torch.float32
    torch.testing.assert_close(gp, ref, atol=0.0, rtol=1e-2)  # only the bf16 rounding of ``real`` differs


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        gradient_penalty(nn.Identity(), torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))


def test_wasserstein_losses_and_scores():
    maps = [torch.zeros(2, 3, 4, 4), torch.tensor([[[[1.0, 3.0]]], [[[-2.0, 0.0]]]])]
    scores = critic_score(maps)
    torch.testing.assert_close(scores, torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(critic_score(maps[-1]), scores)
    real, fake = torch.tensor([2.0, 4.0]), torch.tensor([-1.0, 0.0])
    torch.testing.assert_close(wasserstein_critic_loss(real, fake), torch.tensor(-3.5))  # -(E real - E fake)
    torch.testing.assert_close(wasserstein_generator_loss(fake), torch.tensor(0.5))
