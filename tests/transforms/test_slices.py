"""Slice stacks (common.transforms.slices)."""

import numpy as np
import torch

from common.transforms.slices import slice_stack


def test_slice_stack_neighbours():
    vol = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 3, 4)
    prev = slice_stack(vol, (-1, 0))
    assert prev.shape == (5, 2, 3, 4)
    np.testing.assert_array_equal(prev[:, :, 0, 0].numpy(), [[0, 0], [0, 1], [1, 2], [2, 3], [3, 4]])
    both = slice_stack(vol[None], (-1, 0, 1))
    np.testing.assert_array_equal(both[4, :, 0, 0].numpy(), [3, 4, 4])
