"""The regression baseline of the 2.5D bundle: the same backbone, trained with MSE to map LR slices to the HR slice.

The 2.5D EDM study's bar to beat is a plain regression CNN on the same data and budget. :class:`RegressionSR`
wraps the bundle's AdaGN U-Net (its noise embedding fed a constant 0) so that ``HR ≈ target LR slice + F(cond)``,
and is called like the EDM denoiser (``forward(x, sigma, cond)``, ignoring ``x`` and ``sigma``), so the bundle's
inferer, handlers, validation and export run it unchanged; :class:`RegressionPrepareBatch` gives the stock
``SupervisedTrainer`` the pair (conditioning, HR), making ``MSELoss`` the plain regression loss.
``configs/regression.json`` of the 2.5D bundle switches a run to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RegressionSR"]


class RegressionSR(nn.Module):
    """``HR = cond[target_index] + F(cond, 0)`` in [-1, 1], with the signature of the EDM denoiser.

    Args:
        model: backbone ``F(x_in, c_noise)`` taking ``num_cond`` channels (its output head's weights start at zero,
            so the untrained model is the upsampled target slice plus the head's bias).
        num_cond: number of conditioning channels.
        target_index: channel of the target LR slice (the offset 0) in the conditioning stack.
    """

    def __init__(self, model: nn.Module, num_cond: int = 2, target_index: int = -1) -> None:
        super().__init__()
        self.model, self.num_cond, self.target_index = model, int(num_cond), int(target_index)

    def forward(self, x: Tensor, sigma: Tensor | float | None = None, cond: Tensor | None = None, raw: bool = False):
        """The SR slice; ``x`` is the conditioning stack when ``cond`` is None (training, single-input call:
        extra channels after ``num_cond`` are ignored), else ignored with ``sigma`` (sampler calls).

        Args:
            x: conditioning images (B, num_cond[+1], *spatial), or the sampler's noisy image.
            sigma: ignored.
            cond: conditioning images (B, num_cond, *spatial) in [-1, 1] (sampler calls).
            raw: ignored (the output is the same).
        """
        if cond is None:
            cond = x[:, : self.num_cond]
        if cond.shape[1] != self.num_cond:
            raise ValueError(f"expected {self.num_cond} conditioning channels, got shape {tuple(cond.shape)}")
        c_noise = torch.zeros(cond.shape[0], device=cond.device, dtype=cond.dtype)
        t = self.target_index % self.num_cond
        return cond[:, t : t + 1] + self.model(cond, c_noise)
