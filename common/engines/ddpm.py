"""Training the seed's conditional ε-prediction DDPM with MONAI's stock ``SupervisedTrainer`` (methods.md §2).

MONAI's ``DiffusionPrepareBatch`` draws the noise and the timesteps and returns ``(images, noise, (), {noise,
timesteps, condition})``; the trainer then calls ``inferer(images, network, noise=…, timesteps=…,
condition=…)`` and ``MSELoss(prediction, noise)`` is the DDPM simple loss (Ho et al. 2020, eq. 14).
:class:`DDPMPrepareBatch` only chooses what ``images`` and ``condition`` are for super-resolution: the HR patch and
its upsampled LR, both mapped from [0, 1] to [-1, 1] (the range the clipped x̂0 and the schedule assume).
The inferer is :class:`common.inferers.ConcatDiffusionInferer` (concat conditioning, bf16 on CPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch
from torch import Tensor

from common.diffusion.ddpm import check_timestep
from common.engines.edm import batch_pair

__all__ = ["DDPMPrepareBatch"]


class DDPMPrepareBatch(DiffusionPrepareBatch):
    """Batch -> (HR x0, noise ε, (), {noise, timesteps, condition}) for the ε-prediction DDPM loss.

    Args:
        num_train_timesteps: T of the schedule; timesteps are drawn uniformly from {0, …, T − 1}.
        max_timestep: draw from {0, …, max_timestep} instead: trains only the part of the chain that a sampler
            starting at ``start_timestep`` ≤ ``max_timestep`` (a CCDF start) evaluates. None: the whole chain.
        image_key: key of the conditioning images (the LR upsampled onto the HR grid), [0, 1].
        label_key: key of the HR images, [0, 1].
        signed: map both from [0, 1] to [-1, 1].
        generator: random generator for the timesteps and the noise (the global one when None).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        max_timestep: int | None = None,
        image_key: str = "image_up",
        label_key: str = "label",
        signed: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(int(num_train_timesteps), condition_name=image_key)
        self.max_timestep = (self.num_train_timesteps - 1 if max_timestep is None
                             else check_timestep("max_timestep", max_timestep, self.num_train_timesteps))
        self.image_key, self.label_key, self.signed, self.generator = image_key, label_key, signed, generator

    def get_noise(self, images: Tensor) -> Tensor:
        """Standard normal noise of ``images``' shape, from ``generator``."""
        return torch.randn(images.shape, generator=self.generator, device=images.device, dtype=images.dtype)

    def get_timesteps(self, images: Tensor) -> Tensor:
        """One timestep per item, uniform on {0, …, ``max_timestep``} (T − 1 by default), from ``generator``."""
        return torch.randint(0, self.max_timestep + 1, (images.shape[0],), generator=self.generator,
                             device=images.device).long()

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor, tuple, dict]:
        cond, x0 = batch_pair(batchdata, self.image_key, self.label_key, self.signed, device, non_blocking, **kwargs)
        noise, timesteps = self.get_noise(x0), self.get_timesteps(x0)
        return x0, noise, (), {"noise": noise, "timesteps": timesteps, "condition": cond}
