"""Small helpers every floor uses: option values as they arrive from ``python -m monai.bundle run --key value``
(an unset option is None, "" or the string "None": the command line cannot pass None itself) and plain tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from monai.utils import convert_to_tensor

__all__ = ["is_unset", "optional", "as_flag", "plain_tensor", "available_memory"]


T = TypeVar("T")


def is_unset(value: Any) -> bool:
    """True for None, "" and "None"."""
    return value is None or (isinstance(value, str) and value in ("", "None"))


def optional(value: Any, cast: Callable[[Any], T]) -> T | None:
    """None when ``value`` is unset, else ``cast(value)``."""
    return None if is_unset(value) else cast(value)


def as_flag(value: Any) -> bool:
    """A boolean option from the command line, where ``--flag false`` arrives as the (truthy) string "false"."""
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off", "", "none"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


def plain_tensor(x) -> torch.Tensor:
    """The data of a MetaTensor, tensor or array as a plain tensor (batches and crops need no metadata)."""
    return convert_to_tensor(x, track_meta=False)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of the kernel's MemAvailable and the cgroup's headroom
    (containers and CI runners limit memory below what the host reports); None where neither can be read."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            limits.append(max(int(cap) - used, 0))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None
