"""The losses of WGAN-GP (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs", arXiv:1704.00028): the
Wasserstein critic and generator losses and the two-sided gradient penalty of their eq. 3,

    L_D = E[D(x̃)] − E[D(x)] + λ·E[(‖∇_x̂ D(x̂)‖₂ − 1)²],   x̂ = ε·x + (1 − ε)·x̃,  ε ~ U[0, 1] per sample,

used by the optional adversarial fine-tuning of the attention U-Net with AdaDM (methods.md §4,
:class:`common.engines.WGANGPTrainer`).

A critic may return one score map or, like MONAI's :class:`monai.networks.nets.PatchDiscriminator`, a list of
feature maps whose last element is the patch score map: :func:`critic_score` reduces either to one score per sample,
the mean of the final map (a PatchGAN critic's D(x) is the average of its patch scores).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["critic_score", "gradient_penalty", "wasserstein_critic_loss", "wasserstein_generator_loss"]


def critic_score(output: Tensor | Sequence[Tensor]) -> Tensor:
    """One critic score per sample, (B,) in float32: the mean of the critic's final map.

    Args:
        output: the critic's output: (B,) scores, a (B, ...) score map, or a list/tuple of maps whose last element
            is the score map (MONAI's PatchDiscriminator).
    """
    if isinstance(output, (list, tuple)):
        output = output[-1]
    return output.float().reshape(output.shape[0], -1).mean(dim=1)


def gradient_penalty(
    critic: Callable[[Tensor], Any],
    real: Tensor,
    fake: Tensor,
    condition: Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """Gulrajani et al.'s two-sided gradient penalty ``E[(‖∇_x̂ D(x̂)‖₂ − 1)²]``, WITHOUT the weight λ (the caller
    multiplies: λ = 10 in the paper and methods.md §4).

    ``x̂ = ε·real + (1 − ε)·fake`` with one ``ε ~ U[0, 1]`` per sample; ``D(x̂)`` is :func:`critic_score` of the
    critic's output, and the gradient is taken with ``create_graph=True``, so the penalty's backward trains the
    critic. The penalty is computed in float32 with autocast off whatever context it is called in: its double
    backward is what half precision gets wrong. The gradient of the summed scores is each sample's own gradient
    only when the critic treats samples independently, so the critic must not use batch normalisation (the paper's
    advice too: layer, instance or no normalisation).

    Args:
        critic: the critic ``D`` (its parameters receive the penalty's gradients).
        real: real images (B, C, *spatial).
        fake: generated images, same shape (detached here: the penalty trains only the critic).
        condition: for a conditional critic, images on the same grid fed with every ``x̂`` as
            ``critic(cat([condition, x̂], dim=1))``; not interpolated and not differentiated.
        generator: random generator for ε (the global one when None).
        eps: added under the square root of the norm, so a zero gradient has a finite derivative.

    Returns:
        the penalty, a float32 scalar.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ in shape")
    device = real.device
    with torch.autocast(device.type, enabled=False):
        real, fake = real.detach().float(), fake.detach().float()
        shape = (real.shape[0],) + (1,) * (real.ndim - 1)
        weight = torch.rand(shape, generator=generator, device=generator.device if generator else device).to(device)
        x_hat = (weight * real + (1 - weight) * fake).requires_grad_(True)
        inputs = x_hat if condition is None else torch.cat([condition.detach().float(), x_hat], dim=1)
        scores = critic_score(critic(inputs))
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        norm = torch.sqrt(grad.flatten(1).pow(2).sum(dim=1) + eps)
        return (norm - 1).pow(2).mean()


def wasserstein_critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """The critic's loss without the penalty, ``E[D(fake)] − E[D(real)]``: minus the Wasserstein-1 estimate.

    Args:
        real_scores: critic scores of real images (B,) (see :func:`critic_score`).
        fake_scores: critic scores of generated images (B,).
    """
    return fake_scores.mean() - real_scores.mean()


def wasserstein_generator_loss(fake_scores: Tensor) -> Tensor:
    """The generator's adversarial loss ``−E[D(fake)]`` (Algorithm 1 of Gulrajani et al.).

    Args:
        fake_scores: critic scores of generated images (B,), with the graph back to the generator.
    """
    return -fake_scores.mean()
