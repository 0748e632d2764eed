"""Head masks (common.transforms.mask)."""

import numpy as np
import pytest

from common.transforms.mask import head_mask


def test_head_mask_finds_the_head():
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    head = np.where(r < 0.7, 100.0, 0.0) + np.random.default_rng(0).normal(0, 2, r.shape)
    head[(r > 0.3) & (r < 0.35)] = 5.0  # a dark ring inside (CSF-like) must not split the mask
    mask = head_mask(head)
    assert mask[r < 0.65].all()
    assert not mask[r > 0.8].any()


@pytest.mark.parametrize("thickness", [1, 2, 5])
def test_head_mask_of_a_slab_inside_the_head(thickness):
    """A crop cut by the field of view (a thin slab of brain) is all head: no erosion from the crop's edges."""
    rng = np.random.default_rng(0)
    slab = rng.uniform(60, 100, (thickness, 32, 32))
    slab[:, 10:14, 10:14] = 5.0  # a dark sulcus inside stays in the mask
    assert head_mask(slab).all()
    with_air = np.pad(slab, ((0, 0), (8, 8), (8, 8)))
    mask = head_mask(with_air)
    assert mask[:, 8:-8, 8:-8].all() and not mask[:, :4].any()
