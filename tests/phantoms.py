"""Synthetic head phantoms for the training tests that need a few small volumes and no real scan."""

from __future__ import annotations

import numpy as np


def head_phantom(shape=(12, 40, 36), seed=0) -> np.ndarray:
    """A head-like ellipsoid with texture in air, in arbitrary units, the first 3 sagittal slices empty."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    head = (x**2 / 0.8 + y**2 / 0.7 + z**2 / 0.7) < 1
    vol = np.where(head, 800 + 200 * np.sin(6 * y) * np.cos(5 * z) + 30 * rng.standard_normal(shape), 0.0)
    vol[:3] = 0
    return vol.astype(np.float32)
