"""Dataset helpers (common.data.dataset)."""

from __future__ import annotations

import pytest

from common.data.dataset import repeat_dataset


def test_repeat_dataset():
    ds = repeat_dataset([10, 11, 12], 7)
    assert len(ds) == 7 and [ds[i] for i in range(7)] == [10, 11, 12, 10, 11, 12, 10]
    with pytest.raises(ValueError):
        repeat_dataset([], 3)
