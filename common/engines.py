"""Small pieces around MONAI's ignite engines: per-volume progress, and a run that ends bad input cleanly."""

from __future__ import annotations

import logging
import sys
import time

from ignite.engine import Engine, Events

from common.io import VolumeError

__all__ = ["VolumeProgress", "find_volume_error", "install_error_hook"]

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


def find_volume_error(err: BaseException) -> VolumeError | None:
    """The :class:`VolumeError` behind an exception, through MONAI's and ignite's wrapping, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, VolumeError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def install_error_hook() -> None:
    """Make a bad input volume end the program with one line naming the file (exit code 1), no traceback.

    Bundle configs call this in ``initialize``: input checks run both while the config resolves (the datalist)
    and inside the engine (loading), so a hook on uncaught exceptions covers both. Other errors keep their
    traceback.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        bad = find_volume_error(exc)
        if bad is None:
            previous(exc_type, exc, tb)
        else:
            print(f"error: {bad}", file=sys.stderr, flush=True)

    sys.excepthook = hook


def load_state(network, path, map_location="cpu", strict: bool = True):
    """Load a weights file (a bare ``state_dict``, or a checkpoint dict holding one under ``"network"`` or
    ``"model"``) into ``network`` and return the network, so a config's ``network`` entry carries its weights
    (what the benchmark and other direct users of ``network`` and ``inferer`` need).

    Args:
        network: the module to fill.
        path: the weights file.
        map_location: ``torch.load`` map_location.
        strict: require the keys to match exactly.
    """
    import torch

    state = torch.load(str(path), map_location=map_location, weights_only=True)
    for key in ("network", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    network.load_state_dict(state, strict=strict)
    logger.info("loaded weights from %s", path)
    return network


__all__ += ["load_state"]
