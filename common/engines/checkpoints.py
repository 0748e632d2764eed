"""Checkpoints and weights around MONAI's ignite engines: resume from the newest checkpoint, save checkpoints
with the trainer's state, write the final ``state_dict`` atomically, load weights into a network, and turn a
checkpoint into the weights file a bundle ships.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from common.data.io import InputFileError, atomic_path
from common.data.weights import check_state_fits, read_state
from common.utils import as_flag, is_unset

__all__ = [
    "unwrap_module",
    "load_state",
    "latest_checkpoint",
    "ResumeFromLatest",
    "AtomicCheckpointSaver",
    "EngineCheckpointSaver",
    "FinalWeightsSaver",
    "checkpoint_to_weights",
    "add_conditioning_channels",
]

logger = logging.getLogger("common")


def load_state(network, path, map_location="cpu", strict: bool = True, large_files=None):
    """Load a weights file (a bare ``state_dict``, or a checkpoint dict holding one under ``"network"`` or
    ``"model"``) into ``network`` and return the network, so a config's ``network`` entry carries its weights
    (what the benchmark and other direct users of ``network`` and ``inferer`` need).

    The file is checked first: its hash against ``large_files`` when that lists it, readable with
    ``weights_only=True``, and (``strict``) every tensor fitting the network, so a bad file is refused with one
    clear error and the network is never filled half-way.

    Args:
        network: the module to fill.
        path: the weights file.
        map_location: ``torch.load`` map_location.
        strict: require the keys and shapes to match exactly; False loads the tensors whose names the network shares
            with the file (their shapes must still match) and logs the names on either side left out (e.g. a
            smaller student initialised from its teacher).
        large_files: the bundle's ``large_files.yml``; a file it lists must have the listed hash.
    """
    state = read_state(path, map_location, large_files)
    for key in ("network", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    missing, unexpected = check_state_fits(path, state, network, partial=not strict)
    network.load_state_dict(state, strict=strict)
    if missing or unexpected:
        shared = len(network.state_dict()) - len(missing)
        logger.warning("%s: loaded the %d tensors the network shares with the file; %d of the network's kept their "
                       "initialisation (%s), %d of the file's were ignored (%s)", path, shared, len(missing),
                       _names(missing), len(unexpected), _names(unexpected))
    logger.info("loaded weights from %s", path)
    return network


def _names(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "") if keys else "none"


def latest_checkpoint(ckpt_dir: str | Path | None, pattern: str = "checkpoint*.pt") -> Path | None:
    """The newest checkpoint in ``ckpt_dir``: the highest ``=<number>`` in the name (MONAI's
    ``checkpoint_epoch=N.pt`` / ``checkpoint_iteration=N.pt``), then the latest modification time; None if none.

    Args:
        ckpt_dir: folder of checkpoints (may not exist).
        pattern: glob of the checkpoint files.
    """
    if is_unset(ckpt_dir) or not Path(ckpt_dir).is_dir():
        return None
    files = [p for p in Path(ckpt_dir).glob(pattern) if p.is_file()]
    if not files:
        return None

    def key(p: Path) -> tuple[int, float]:
        numbers = re.findall(r"=(\d+)", p.name)
        return (int(numbers[-1]) if numbers else -1, p.stat().st_mtime)

    return max(files, key=key)


class ResumeFromLatest:
    """Resume training from the newest checkpoint in ``ckpt_dir`` when one exists (at ``Events.STARTED``).

    Attach it before the other handlers. Loading goes through MONAI's :class:`monai.handlers.CheckpointLoader`.
    The engine it is attached to is restored too, under ``engine_key`` (a config cannot name the trainer inside
    the trainer's own handler list without a circular reference).

    Args:
        ckpt_dir: the checkpoint folder of the training run.
        load_dict: objects to restore, e.g. ``{"network": net, "optimizer": opt}``.
        pattern: glob of the checkpoint files.
        map_location: ``torch.load`` map_location.
        engine_key: key of the attached engine in the checkpoint (None: do not restore the engine).
        init_weights: weights file (a ``state_dict``, e.g. a bundle's ``models/model.pt``) to start the network
            from when there is no checkpoint to resume: fine-tuning. Unset: start from the initialisation.
        network_key: the network's entry in ``load_dict``.
        init_strict: ``init_weights`` must fit the network exactly; False loads the tensors they share (see
            :func:`load_state`), e.g. a student without its teacher's attention blocks.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        load_dict: dict,
        pattern: str = "checkpoint*.pt",
        map_location: Any = "cpu",
        engine_key: str | None = "trainer",
        init_weights: str | Path | None = None,
        network_key: str = "network",
        init_strict: bool = True,
    ) -> None:
        self.init_weights, self.network_key, self.init_strict = init_weights, network_key, as_flag(init_strict)
        self.ckpt_dir, self.load_dict, self.pattern = ckpt_dir, dict(load_dict), pattern
        self.map_location = map_location
        self.engine_key = engine_key
        self.loaded: Path | None = None

    def attach(self, engine: Engine) -> None:
        if self.engine_key:
            self.load_dict[self.engine_key] = engine
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir, self.pattern)
        if path is None:
            if is_unset(self.init_weights):
                logger.info("no checkpoint in %s: training from scratch", self.ckpt_dir)
                return
            if not Path(self.init_weights).is_file():
                raise FileNotFoundError(f"init_weights {self.init_weights}: no such weights file")
            load_state(unwrap_module(self.load_dict[self.network_key]), self.init_weights, self.map_location,
                       strict=self.init_strict)
            logger.info("no checkpoint in %s: fine-tuning from %s", self.ckpt_dir, self.init_weights)
            return
        self._check(path)
        CheckpointLoader(str(path), self.load_dict, name="common", map_location=self.map_location)(engine)
        self.loaded = path
        logger.info("resumed from %s (epoch %d, iteration %d)", path, engine.state.epoch, engine.state.iteration)


    def _check(self, path: Path) -> None:
        """Refuse a damaged or foreign checkpoint before any object is restored from it."""
        older = [p.name for p in sorted(Path(self.ckpt_dir).glob(self.pattern)) if p != path]
        hint = f"; delete it to resume from the previous one ({', '.join(older)})" if older else ""
        try:
            ckpt = read_state(path, self.map_location)
            missing = [k for k in self.load_dict if k not in ckpt]
            if missing:
                raise InputFileError(path, f"checkpoint lacks {missing} (another configuration's?)")
            check_state_fits(path, ckpt[self.network_key], unwrap_module(self.load_dict[self.network_key]))
        except InputFileError as err:
            raise InputFileError(path, f"{err.problem}{hint}") from err


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`monai.handlers.CheckpointSaver` writing each file atomically (a temporary file, then a rename).

    MONAI turns ignite's atomic saving off (an atomic file gets owner-only permissions); a run killed while saving
    then leaves a truncated checkpoint, or a truncated ``best_model.pt``. Here a checkpoint is whole or absent, at
    the cost of owner-only (0600) permissions on it. Same arguments as :class:`monai.handlers.CheckpointSaver`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, name, None)
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True


class EngineCheckpointSaver:
    """MONAI's :class:`monai.handlers.CheckpointSaver` with the engine it is attached to added to ``save_dict``
    under ``engine_key``, so a resumed run continues at the saved epoch (see :class:`ResumeFromLatest`).

    Args:
        save_dir: checkpoint folder.
        save_dict: objects to save, e.g. ``{"network": net, "optimizer": opt, "lr_scheduler": sched}``.
        engine_key: key of the attached engine.
        kwargs: other :class:`monai.handlers.CheckpointSaver` arguments (``save_interval``, ``n_saved``, ...).
    """

    def __init__(self, save_dir: str, save_dict: dict, engine_key: str = "trainer", **kwargs: Any) -> None:
        self.save_dir, self.save_dict, self.engine_key, self.kwargs = save_dir, dict(save_dict), engine_key, kwargs
        self.saver: CheckpointSaver | None = None

    def attach(self, engine: Engine) -> None:
        self.saver = AtomicCheckpointSaver(self.save_dir, {**self.save_dict, self.engine_key: engine}, **self.kwargs)
        self.saver.attach(engine)


def unwrap_module(net: nn.Module) -> nn.Module:
    """The network inside a (Distributed)DataParallel wrapper, or ``net`` itself."""
    return net.module if isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else net


class FinalWeightsSaver:
    """At the end of training, write the network's ``state_dict`` atomically to ``path`` (what inference loads).

    Args:
        network: the trained network (a DDP wrapper is unwrapped).
        path: destination file; its folder is created.
        event: when to save (``Events.COMPLETED`` by default).
    """

    def __init__(self, network: nn.Module, path: str | Path, event: Any = Events.COMPLETED) -> None:
        self.network, self.path, self.event = network, Path(path), event

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(self.event, self)

    def __call__(self, engine: Engine | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in unwrap_module(self.network).state_dict().items()}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        logger.info("final weights written to %s", self.path)


def checkpoint_to_weights(ckpt_path: str | Path, out_path: str | Path, key: str = "network") -> Path:
    """Extract the network's ``state_dict`` from a training checkpoint into a weights file (atomically).

    Args:
        ckpt_path: a checkpoint written by MONAI's CheckpointSaver (a dict of state dicts) or a bare state dict.
        out_path: destination.
        key: the network's entry in the checkpoint.
    """
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
    state = ckpt[key] if key in ckpt else ckpt
    state = {k: v.contiguous() for k, v in state.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        torch.save(state, tmp)
    return out_path


def add_conditioning_channels(
    weights_path: str | Path, out_path: str | Path, positions: Sequence[int], key: str = "model.conv_in.weight"
) -> Path:
    """Weights for a denoiser with more conditioning images, computing exactly what the old one computed.

    Zero input filters are inserted into the first convolution at ``positions`` (indices in the new input
    stack), so the new images start ignored and fine-tuning learns to use them; e.g. ``positions=[2]`` turns a
    [previous, target, noisy] network into a [previous, target, next, noisy] one.

    Args:
        weights_path: the trained ``state_dict``.
        out_path: destination (written atomically).
        positions: input-channel indices of the new conditioning images, in the new layout.
        key: the first convolution's weight in the ``state_dict``.
    """
    state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    if key not in state:
        raise KeyError(f"{weights_path}: no {key!r} in the weights")
    old = state[key]
    new_in = old.shape[1] + len(positions)
    if any(not 0 <= p < new_in for p in positions) or len(set(positions)) != len(positions):
        raise ValueError(f"positions {list(positions)} are not distinct indices < {new_in}")
    kept = [i for i in range(new_in) if i not in set(positions)]
    weight = old.new_zeros(old.shape[0], new_in, *old.shape[2:])
    weight[:, kept] = old
    state = {**state, key: weight.contiguous()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        torch.save(state, tmp)
    return out_path
