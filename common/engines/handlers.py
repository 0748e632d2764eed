"""Ignite handlers of the trainers and inference runs: per-volume progress and gradient-norm clipping.
"""

from __future__ import annotations

import logging
import time

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["VolumeProgress", "GradientClipping"]

logger = logging.getLogger("common")


class VolumeProgress:
    """Log one line per processed volume: its index, input file and seconds taken."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._done)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _done(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        names = []
        for item in items:
            image = item.get("image") if isinstance(item, dict) else None
            meta = getattr(image, "meta", {})
            names.append(str(meta.get("filename_or_obj", "?")))
        total = engine.state.epoch_length or "?"
        seconds = time.perf_counter() - self._t0
        logger.info("volume %s/%s: %s (%.1f s)", engine.state.iteration, total, ", ".join(names), seconds)


class GradientClipping:
    """Clip the gradient norm of the trainer's network after every backward pass (before the optimiser step).

    The norm before clipping is kept in ``engine.state.metrics["grad_norm"]``.

    Args:
        max_norm: largest allowed norm (10 in the EDM study).
        norm_type: p of the p-norm.
    """

    def __init__(self, max_norm: float = 10.0, norm_type: float = 2.0) -> None:
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm, self.norm_type)
        engine.state.metrics["grad_norm"] = float(norm)
