"""Dataset helpers for training on few volumes: an epoch of a chosen length over a small cached dataset.
"""

from __future__ import annotations

import torch

__all__ = ["repeat_dataset"]


def repeat_dataset(dataset: torch.utils.data.Dataset, length: int) -> torch.utils.data.Subset:
    """A view of ``dataset`` with ``length`` items cycling over it: an epoch of a chosen length over few volumes
    (random transforms of a ``CacheDataset`` still run per item)."""
    n = len(dataset)
    if n == 0:
        raise ValueError("empty training dataset")
    return torch.utils.data.Subset(dataset, [i % n for i in range(int(length))])
