"""Ignite handlers of the trainers and inference runs: per-volume progress, gradient-norm clipping, and the
per-epoch reseeding that makes a resumed run draw what an uninterrupted one draws.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["VolumeProgress", "GradientClipping", "EpochSeeding"]

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
        # an iterable dataset that skips bad inputs has no epoch length: count its datalist instead
        dataset = getattr(engine.data_loader, "dataset", None)
        total = engine.state.epoch_length or len(getattr(dataset, "data", ())) or "?"
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


class EpochSeeding:
    """Reseed every random source at the start of each epoch from ``seed + epoch``.

    A run resumed from an epoch's checkpoint then draws the same crops, shuffles and noise as an uninterrupted
    run of the same seed (the restored network, optimiser, scheduler and EMA carry the rest), so it ends with the
    same weights, bit for bit on CPU (tests/test_bundle_reliability.py kills a training run and checks it).
    Without it the random streams would restart from the run's start, or continue from wherever the killed run
    left them.

    Args:
        seed: the run's seed.
        randomized: datasets or transforms with MONAI random state (``set_random_state``); a dataset's
            ``transform`` is reseeded.
    """

    def __init__(self, seed: int, randomized: Sequence[Any] = ()) -> None:
        self.seed, self.randomized = int(seed), list(randomized)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        seed = (self.seed + int(engine.state.epoch)) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        for obj in self.randomized:
            target = getattr(obj, "transform", obj)
            if hasattr(target, "set_random_state"):
                target.set_random_state(seed=seed)
