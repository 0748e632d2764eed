"""MONAI's DiffusionModelUNet for concat-conditioned SR (methods.md §2), callable with one tensor for export.

The DDPM bundle's ε-network is :class:`monai.networks.nets.DiffusionModelUNet` unchanged: its input is
``cat[x_t, cond]`` (MONAI's concat order) and it is called as ``network(x, timesteps)`` by the MONAI inferers and
the DDPM sampler. The bundle tools (``verify_net_in_out``, ``ckpt_export``) and a traced TorchScript export call a
network with a single tensor, so this subclass adds only that call: ``network(x)`` is ε at the fixed
``probe_timestep`` (the first step of the sampler by default), like the EDM denoiser's ``probe_sigma``. The
parameters and their names are MONAI's, so weights load into either class.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import Tensor

__all__ = ["ConcatDiffusionModelUNet"]


class ConcatDiffusionModelUNet(DiffusionModelUNet):
    """:class:`~monai.networks.nets.DiffusionModelUNet` whose ``timesteps`` may be omitted (then ``probe_timestep``).

    Args:
        args: positional arguments of :class:`~monai.networks.nets.DiffusionModelUNet`.
        probe_timestep: the timestep of the single-tensor call (999: the first step of a T = 1000 sampler).
        kwargs: keyword arguments of :class:`~monai.networks.nets.DiffusionModelUNet` (``spatial_dims``,
            ``in_channels`` = conditioning channels + 1, ``out_channels``, ``channels``, ...).
    """

    def __init__(self, *args, probe_timestep: int = 999, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if probe_timestep < 0:
            raise ValueError(f"probe_timestep must be >= 0, got {probe_timestep}")
        self.probe_timestep = int(probe_timestep)

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        timesteps: Tensor | None = None,
        context: Tensor | None = None,
        class_labels: Tensor | None = None,
        down_block_additional_residuals: tuple[Tensor] | None = None,
        mid_block_additional_residual: Tensor | None = None,
    ) -> Tensor:
        """ε(x, t); with ``timesteps`` None, ε at ``probe_timestep`` for every batch item."""
        if timesteps is None:
            timesteps = torch.full((x.shape[0],), self.probe_timestep, dtype=torch.long, device=x.device)
        return super().forward(x, timesteps, context, class_labels, down_block_additional_residuals,
                               mid_block_additional_residual)
