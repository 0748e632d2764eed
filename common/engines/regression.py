"""The batch of the 2.5D regression baseline: (conditioning, HR) for the stock ``SupervisedTrainer``, so
``MSELoss`` is the plain regression loss of :class:`common.networks.RegressionSR`. ``configs/regression.json`` of
the 2.5D bundle switches a run to it.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from torch import Tensor

from common.engines.edm import batch_pair

__all__ = ["RegressionPrepareBatch"]


class RegressionPrepareBatch(PrepareBatch):
    """Batch -> (conditioning, HR), both mapped to [-1, 1] when ``signed``, for the stock ``SupervisedTrainer``.

    Args:
        image_key: key of the conditioning images (B, C_cond, *spatial), [0, 1].
        label_key: key of the HR images (B, 1, *spatial), [0, 1].
        signed: map both from [0, 1] to [-1, 1].
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", signed: bool = True) -> None:
        self.image_key, self.label_key, self.signed = image_key, label_key, signed

    def __call__(
        self, batchdata: dict[str, Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor, tuple, dict]:
        cond, hr = batch_pair(batchdata, self.image_key, self.label_key, self.signed, device, non_blocking, **kwargs)
        return cond, hr, (), {}
