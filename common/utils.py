"""Small helpers every floor uses: option values as they arrive from ``python -m monai.bundle run --key value``
(an unset option is None, "" or the string "None": the command line cannot pass None itself) and plain tensors.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from monai.utils import convert_to_tensor

__all__ = ["is_unset", "optional", "plain_tensor"]


T = TypeVar("T")


def is_unset(value: Any) -> bool:
    """True for None, "" and "None"."""
    return value is None or (isinstance(value, str) and value in ("", "None"))


def optional(value: Any, cast: Callable[[Any], T]) -> T | None:
    """None when ``value`` is unset, else ``cast(value)``."""
    return None if is_unset(value) else cast(value)


def plain_tensor(x) -> torch.Tensor:
    """The data of a MetaTensor, tensor or array as a plain tensor (batches and crops need no metadata)."""
    return convert_to_tensor(x, track_meta=False)
