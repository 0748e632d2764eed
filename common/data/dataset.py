"""Datasets of the bundles' commands: an epoch of a chosen length over a small cached training set, and the
inference inputs as a stream that reports a bad file and goes on with the next one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from monai.transforms import apply_transform

from common.data.io import InputFileError, VolumeError, find_input_error
from common.utils import as_flag

__all__ = ["repeat_dataset", "BadInputSkippingDataset"]

logger = logging.getLogger("common")


def repeat_dataset(dataset: torch.utils.data.Dataset, length: int) -> torch.utils.data.Subset:
    """A view of ``dataset`` with ``length`` items cycling over it: an epoch of a chosen length over few volumes
    (random transforms of a ``CacheDataset`` still run per item)."""
    n = len(dataset)
    if n == 0:
        raise ValueError("empty training dataset")
    return torch.utils.data.Subset(dataset, [i % n for i in range(int(length))])


class BadInputSkippingDataset(torch.utils.data.IterableDataset):
    """The items of a datalist through ``transform``; an item whose file is bad is reported and skipped.

    The collection's policy for a folder with some bad files (docs/bundle_contract.md): every good volume is
    processed, every bad one gets one ``error: <file>: <problem>`` line on stderr, and :meth:`raise_if_failed`,
    the command's last step, exits non-zero naming how many failed. ``fail_fast`` stops at the first bad file
    instead. A bad file is one whose loading raises :class:`InputFileError` (or an item that carries an ``"error"``
    from the datalist, e.g. two inputs that would write one output); any other exception is a bug and stops the
    run with its traceback.

    Iterable, so the engine's epoch is however many good items there are: use it with ``num_workers=0`` (the
    report lives in this process).

    Args:
        data: datalist items, e.g. ``[{"image": path}, ...]``.
        transform: applied to each item (loading included).
        fail_fast: raise at the first bad file.
        key: the item's key that names its file.
    """

    def __init__(
        self, data: Sequence[dict], transform: Callable | None = None, fail_fast: bool = False, key: str = "image"
    ) -> None:
        self.data, self.transform, self.fail_fast, self.key = list(data), transform, as_flag(fail_fast), key
        self.errors: list[InputFileError] = []
        self.done = 0

    def __iter__(self) -> Iterator[dict]:
        self.errors, self.done = [], 0
        for item in self.data:
            try:
                if item.get("error"):
                    raise VolumeError(item.get(self.key, "?"), item["error"])
                out = apply_transform(self.transform, item) if self.transform is not None else item
            except Exception as err:
                bad = find_input_error(err)
                if bad is None:
                    raise
                if self.fail_fast:
                    raise bad from err
                self.errors.append(bad)
                print(f"error: {bad}", file=sys.stderr, flush=True)
                continue
            self.done += 1
            yield out

    def raise_if_failed(self) -> None:
        """Exit with status 1 after the run when any input failed (each was named when it failed)."""
        if self.errors:
            names = ", ".join(Path(e.path).name for e in self.errors)
            print(f"failed: {len(self.errors)} of {len(self.data)} inputs ({names}); {self.done} processed",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
