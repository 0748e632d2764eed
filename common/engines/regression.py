"""The batch of the 2.5D regression baseline: (conditioning, HR) for the stock ``SupervisedTrainer``, so
``MSELoss`` is the plain regression loss of :class:`common.networks.RegressionSR`. ``configs/regression.json`` of
the 2.5D bundle switches a run to it. With ``context_key`` it also hands the per-sample covariate context to the
network: the batch of the attention U-Net bundle (any single-pass supervised loss).
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
        context_key: key of a per-sample context vector (B, K) passed to the network as its second argument
            (the attention U-Net's covariates, :class:`common.transforms.CovariateContextd`); None: none.
    """

    def __init__(
        self, image_key: str = "image", label_key: str = "label", signed: bool = True, context_key: str | None = None
    ) -> None:
        self.image_key, self.label_key, self.signed, self.context_key = image_key, label_key, signed, context_key

    def __call__(
        self, batchdata: dict[str, Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor, tuple, dict]:
        cond, hr = batch_pair(batchdata, self.image_key, self.label_key, self.signed, device, non_blocking, **kwargs)
        if self.context_key is None:
            return cond, hr, (), {}
        context = torch.as_tensor(batchdata[self.context_key]).to(device=cond.device, dtype=torch.float32)
        return cond, hr, (context,), {}
