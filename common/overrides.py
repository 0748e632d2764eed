"""Option values as they arrive from ``python -m monai.bundle run --key value``: an unset option is None, "" or
the string "None" (the command line cannot pass None itself)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

__all__ = ["is_unset", "optional"]

T = TypeVar("T")


def is_unset(value: Any) -> bool:
    """True for None, "" and "None"."""
    return value is None or (isinstance(value, str) and value in ("", "None"))


def optional(value: Any, cast: Callable[[Any], T]) -> T | None:
    """None when ``value`` is unset, else ``cast(value)``."""
    return None if is_unset(value) else cast(value)
