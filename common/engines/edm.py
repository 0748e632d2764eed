"""Training an EDM super-resolution denoiser with MONAI's stock ``SupervisedTrainer`` (methods.md §1).

The trainer sees a plain regression problem: :class:`EDMPrepareBatch` draws σ (log-normal) and the noise, and
returns ``inputs`` = the noisy HR image, ``targets`` = the F-space target ``(x0 − c_skip·x_noisy)/c_out`` and the
keyword arguments ``sigma``, ``cond`` and ``raw=True`` for :class:`common.diffusion.SRDenoiser`, so ``MSELoss`` on
the network output is the EDM loss. The data path is :func:`common.transforms.training_preprocessing` with
:class:`common.transforms.RandSlicePatchd` (2.5D) or :class:`common.transforms.RandForegroundPairedPatchd` (3D).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from torch import Tensor

from common.diffusion.edm import EDMPrecond, add_training_noise
from common.transforms.intensity import to_signed
from common.utils import plain_tensor

__all__ = ["batch_pair", "EDMPrepareBatch"]


def batch_pair(
    batchdata: Mapping[str, Any], image_key: str, label_key: str, signed: bool = True,
    device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """The conditioning and HR images of a batch as float tensors on ``device``, mapped from [0, 1] to [-1, 1]
    when ``signed``: what every prepare_batch of the SR trainers starts from."""
    cond = plain_tensor(batchdata[image_key]).to(device=device, non_blocking=non_blocking, **kwargs).float()
    hr = plain_tensor(batchdata[label_key]).to(device=device, non_blocking=non_blocking, **kwargs).float()
    return (to_signed(cond), to_signed(hr)) if signed else (cond, hr)


class EDMPrepareBatch(PrepareBatch):
    """Batch -> (noisy HR, F-space target, (), {sigma, cond, raw=True}) for the stock ``SupervisedTrainer``.

    With ``x0`` = HR and ``cond`` = conditioning (both mapped to [-1, 1] when ``signed``): σ from the denoiser's
    log-normal, ``x_noisy = x0 + σ_off·n + σ·ε`` (offset noise), target ``(x0 − c_skip·x_noisy)/c_out``.
    ``MSELoss(network(x_noisy, sigma=σ, cond=cond, raw=True), target)`` is then EDM's loss (methods.md §1).

    Args:
        denoiser: the :class:`EDMPrecond` being trained (unwrapped: its scalings and σ distribution are used).
        image_key: key of the conditioning images (B, C_cond, *spatial), [0, 1].
        label_key: key of the HR images (B, 1, *spatial), [0, 1].
        signed: map both from [0, 1] to [-1, 1].
        generator: random generator for σ and the noise (the global one when None).
    """

    def __init__(
        self,
        denoiser: EDMPrecond,
        image_key: str = "image",
        label_key: str = "label",
        signed: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.image_key, self.label_key, self.signed, self.generator = image_key, label_key, signed, generator

    def __call__(
        self, batchdata: dict[str, Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor, tuple, dict]:
        cond, x0 = batch_pair(batchdata, self.image_key, self.label_key, self.signed, device, non_blocking, **kwargs)
        sigma = self.denoiser.sample_sigma(x0.shape[0], self.generator, x0.device)
        x_noisy = add_training_noise(x0, sigma, self.denoiser.sigma_offset, self.generator)
        c_skip, c_out, _, _ = self.denoiser.get_scalings(sigma)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        target = (x0 - c_skip.reshape(shape) * x_noisy) / c_out.reshape(shape)
        return x_noisy, target, (), {"sigma": sigma, "cond": cond, "raw": True}
