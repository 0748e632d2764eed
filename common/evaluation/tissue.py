"""Tissue Dice of the 3T->7T thesis (methods.md §4): CSF, GM and WM segmented in the SR volume and in the HR
reference, each on its own (:func:`common.transforms.segment_tissues`), and their overlap per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.transforms import segment_tissues

__all__ = ["TISSUE_CLASSES", "dice_per_class", "tissue_dice"]

TISSUE_CLASSES = {"csf": 1, "gm": 2, "wm": 3}


def dice_per_class(labels: Any, reference: Any, classes: dict[str, int] = TISSUE_CLASSES) -> dict[str, float | None]:
    """Dice of each class of two label volumes (None for a class absent from both)."""
    a, b = np.asarray(labels), np.asarray(reference)
    if a.shape != b.shape:
        raise ValueError(f"label volumes differ in shape: {a.shape} vs {b.shape}")
    out: dict[str, float | None] = {}
    for name, value in classes.items():
        x, y = a == value, b == value
        total = int(x.sum() + y.sum())
        out[name] = 2.0 * float(np.logical_and(x, y).sum()) / total if total else None
    return out


def tissue_dice(sr: Any, hr: Any, brain_mask: Any, priors: Sequence | None = None) -> dict[str, float | None]:
    """Per-class Dice of the tissue segmentations of ``sr`` and ``hr`` inside ``brain_mask`` (same grid).

    Args:
        sr: the super-resolved volume.
        hr: the reference volume.
        brain_mask: where the tissues are modelled.
        priors: optional (CSF, GM, WM) probability maps for both segmentations (the atlas's, moved).
    """
    return dice_per_class(segment_tissues(sr, brain_mask, priors), segment_tissues(hr, brain_mask, priors))
