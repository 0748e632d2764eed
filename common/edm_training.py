"""Training an EDM super-resolution denoiser with MONAI's stock ``SupervisedTrainer``: data, batches, handlers.

The trainer sees a plain regression problem: :class:`EDMPrepareBatch` draws σ (log-normal) and the noise, and
returns ``inputs`` = the noisy HR image, ``targets`` = the F-space target ``(x0 − c_skip·x_noisy)/c_out`` and the
keyword arguments ``sigma``, ``cond`` and ``raw=True`` for :class:`common.inferers.SRDenoiser`, so ``MSELoss`` on
the network output is the EDM loss (methods.md §1). Around it:

- data: :func:`training_preprocessing` (HR -> RAS -> simulated LR -> percentile scaling from the LR ->
  in-plane upsampled LR; cached per volume), :class:`RandSlicePatchd` (a random non-empty sagittal slice, its LR
  neighbours, an aligned random in-plane crop), :func:`repeat_dataset` (an epoch of a chosen length over few
  cached volumes), :func:`validation_preprocessing` (a central slab of a held-out volume);
- handlers: :class:`GradientClipping`, :class:`ResumeFromLatest` (resume from the newest checkpoint in a
  folder, if any), :class:`EngineCheckpointSaver` (checkpoints that include the trainer's state),
  :class:`FinalWeightsSaver` (the network's ``state_dict``, written atomically at the end);
- :func:`checkpoint_to_weights` turns a training checkpoint into the weights file a bundle ships.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.transforms import Compose, MapTransform, Randomizable, Transform
from torch import Tensor, nn

from common.degrade import BlockAverage
from common.diffusion.edm import EDMPrecond, add_training_noise
from common.engines import load_state
from common.inferers import to_signed
from common.io import atomic_path
from common.overrides import is_unset
from common.pipelines import SimulateLRd, central_slices
from common.transforms import HeadDepthd, LoadVolumed, PercentileNormalized, plain_tensor
from common.upsample import GridUpsample

__all__ = [
    "CropHRToLRd",
    "UpsampleLRd",
    "SliceForegroundd",
    "BlockDownscaled",
    "training_preprocessing",
    "validation_preprocessing",
    "RandSlicePatchd",
    "repeat_dataset",
    "batch_pair",
    "EDMPrepareBatch",
    "GradientClipping",
    "latest_checkpoint",
    "ResumeFromLatest",
    "EngineCheckpointSaver",
    "FinalWeightsSaver",
    "checkpoint_to_weights",
    "add_conditioning_channels",
]

logger = logging.getLogger("common")


class UpsampleLRd(MapTransform):
    """Upsample the LR ``image`` in-plane onto the HR grid into ``output_key``; crop ``label`` to the same shape.

    The HR volume loses the trailing voxels that do not fill a whole LR voxel, so HR and upsampled LR align.

    Args:
        scale_factor: HR/LR factor per spatial axis.
        mode: upsampling mode of :class:`common.upsample.GridUpsample` (cubic, as inference).
        image_key: key of the LR image (1, x, y, z).
        label_key: key of the HR image.
        output_key: where the upsampled LR goes.
    """

    def __init__(
        self,
        scale_factor: Sequence[int],
        mode: str = "cubic",
        image_key: str = "image",
        label_key: str = "label",
        output_key: str = "image_up",
    ) -> None:
        super().__init__([image_key, label_key])
        self.upsample = GridUpsample(scale_factor, mode)
        self.image_key, self.label_key, self.output_key = image_key, label_key, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        with torch.no_grad():
            up = self.upsample(plain_tensor(d[self.image_key])[None].float())[0]
        d[self.output_key] = up
        if self.label_key in d:
            d[self.label_key] = d[self.label_key][(slice(None),) + tuple(slice(0, s) for s in up.shape[1:])]
        return d


class CropHRToLRd(MapTransform):
    """Crop the HR ``label`` to the LR ``image``'s shape times ``scale_factor`` (the voxels the LR grid covers).

    Args:
        scale_factor: HR/LR factor per spatial axis.
        image_key: key of the LR image.
        label_key: key of the HR image.
    """

    def __init__(self, scale_factor: Sequence[int], image_key: str = "image", label_key: str = "label") -> None:
        super().__init__([image_key, label_key])
        self.scale_factor = tuple(int(f) for f in scale_factor)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        lr = d[self.image_key].shape[1:]
        crop = tuple(slice(0, s * f) for s, f in zip(lr, self.scale_factor))
        d[self.label_key] = d[self.label_key][(slice(None),) + crop]
        return d


class SliceForegroundd(MapTransform):
    """Store, per slice along axis 0 of ``key`` (1, X, Y, Z), the fraction of voxels above ``threshold`` in
    ``output_key`` (X,): computed once in the cached preprocessing, read by :class:`RandSlicePatchd`. With
    ``axes`` other than ``(0,)`` it stores ``{axis: fractions}`` for each axis (slices drawn along several axes).

    Args:
        key: the HR volume.
        threshold: foreground threshold on the [0, 1] scale.
        output_key: where the fractions go.
        axes: slice axes to compute the fractions for.
    """

    def __init__(
        self, key: str = "label", threshold: float = 0.1, output_key: str = "slice_foreground",
        axes: Sequence[int] = (0,),
    ) -> None:
        super().__init__([key])
        self.key, self.threshold, self.output_key = key, float(threshold), output_key
        self.axes = tuple(int(a) for a in axes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        foreground = (plain_tensor(d[self.key])[0] > self.threshold).float()
        fractions = {a: foreground.movedim(a, 0).flatten(1).mean(1) for a in self.axes}
        d[self.output_key] = fractions[0] if self.axes == (0,) else fractions
        return d


class BlockDownscaled(MapTransform):
    """Block-average ``keys`` by the item's integer ``factor_key`` (e.g. 2) along every axis, geometry included;
    items without it pass unchanged (:func:`common.data.with_downscaled_copies` marks the copies).

    Args:
        keys: the HR volume(s).
        factor_key: key of the factor in the item.
    """

    def __init__(self, keys: KeysCollection = "label", factor_key: str = "downscale") -> None:
        super().__init__(keys)
        self.factor_key = factor_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        factor = int(d.get(self.factor_key, 1))
        if factor > 1:
            for key in self.key_iterator(d):
                d[key] = BlockAverage(factor)(d[key])
        return d


def training_preprocessing(
    scale_factor: Sequence[int],
    degradation: Transform | None = None,
    upsample_mode: str = "cubic",
    slice_axes: Sequence[int] = (0,),
    head_depth: bool = False,
) -> Compose:
    """The cached part of the training data path: load the HR ``label`` (RAS), simulate the LR ``image``, scale
    both with the LR's 1st/99th percentiles (as inference does, where only LR exists), upsample LR to ``image_up``,
    and note each sagittal slice's foreground fraction (``slice_foreground``). Items marked ``downscale``
    (:func:`common.data.with_downscaled_copies`) are block-averaged first.

    Args:
        scale_factor: HR/LR factor per RAS axis.
        degradation: LR simulation (block averaging by ``scale_factor`` when None).
        upsample_mode: upsampling of the LR conditioning.
        slice_axes: axes training slices are drawn along (foreground fractions are noted for each).
        head_depth: also store the HR's depth inside the head (``head_depth``, :class:`common.transforms.HeadDepthd`)
            for the skull-strip augmentation.
    """
    transforms = [
        LoadVolumed(keys="label"),
        BlockDownscaled("label"),
        SimulateLRd(scale_factor, degradation),
        PercentileNormalized(keys=["image", "label"], ref_key="image"),
        UpsampleLRd(scale_factor, upsample_mode),
        SliceForegroundd("label", axes=slice_axes),
    ]
    return Compose(transforms + ([HeadDepthd("label")] if head_depth else []))


def validation_preprocessing(
    scale_factor: Sequence[int], num_slices: int | None = None, degradation: Transform | None = None
) -> Compose:
    """Validation volumes: the HR ``label`` cropped to its central ``num_slices`` sagittal slices, the LR ``image``
    simulated from it, both scaled with the LR's percentiles; ``label`` cropped to the SR grid.

    Args:
        scale_factor: HR/LR factor per RAS axis.
        num_slices: central sagittal slices to keep (all when None).
        degradation: LR simulation (block averaging by ``scale_factor`` when None).
    """
    return Compose(
        [
            LoadVolumed(keys="label"),
            central_slices(num_slices),
            SimulateLRd(scale_factor, degradation),
            CropHRToLRd(scale_factor),
            PercentileNormalized(keys=["image", "label"], ref_key="image"),
        ]
    )


class RandSlicePatchd(Randomizable, MapTransform):
    """A random non-empty sagittal slice with its conditioning stack and an aligned random in-plane crop.

    From ``label`` (1, X, Y, Z) HR and ``image_up`` (1, X, Y, Z) upsampled LR (both in [0, 1]), returns
    ``image`` = the upsampled LR slices at ``offsets`` around slice i (edge slices repeat), (len(offsets), h, w),
    and ``label`` = HR slice i, (1, h, w). Slices are drawn among those with at least ``min_foreground`` of their
    voxels above ``threshold`` (all slices when none qualifies); the crop is centred, with probability
    ``pos_fraction``, on a random foreground voxel, and its start is a multiple of the in-plane ``scale_factor``
    so HR and LR keep the block phase of inference. Slices smaller than the patch are zero-padded.

    Args:
        patch_size: in-plane crop size (h, w).
        offsets: neighbour offsets of the conditioning slices.
        scale_factor: in-plane factors (fy, fz) the crop start is a multiple of.
        min_foreground: smallest fraction of foreground voxels of a drawn slice.
        threshold: foreground threshold on the HR [0, 1] scale.
        pos_fraction: probability of centring the crop on a foreground voxel.
        num_samples: patches per call (a list when > 1).
        label_key: key of the HR volume.
        cond_key: key of the upsampled LR volume.
        output_cond_key: where the conditioning stack goes.
        foreground_key: key of precomputed per-slice foreground fractions (see :class:`SliceForegroundd`);
            computed here when absent.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        offsets: Sequence[int] = (-1, 0),
        scale_factor: Sequence[int] = (2, 2),
        min_foreground: float = 0.05,
        threshold: float = 0.1,
        pos_fraction: float = 0.9,
        num_samples: int = 1,
        label_key: str = "label",
        cond_key: str = "image_up",
        output_cond_key: str = "image",
        foreground_key: str = "slice_foreground",
    ) -> None:
        MapTransform.__init__(self, [label_key, cond_key])
        self.foreground_key = foreground_key
        self.patch_size = tuple(int(p) for p in patch_size)
        self.offsets = tuple(int(o) for o in offsets)
        self.scale_factor = tuple(int(f) for f in scale_factor)[-2:]
        self.min_foreground, self.threshold, self.pos_fraction = min_foreground, threshold, pos_fraction
        self.num_samples = int(num_samples)
        self.label_key, self.cond_key, self.output_cond_key = label_key, cond_key, output_cond_key

    def randomize(self, data: Any = None) -> None:
        pass

    def _start(self, size: int, patch: int, centre: int | None, f: int) -> int:
        room = size - patch
        if room <= 0:
            return 0
        if centre is None:
            start = int(self.R.randint(0, room + 1))
        else:
            start = min(max(centre - patch // 2, 0), room)
        start -= start % f
        return start

    def _draw(self, hr: Tensor, fg_slices: Tensor, extent: Sequence[int]) -> tuple[int, list[int], list[int]]:
        """A slice i among ``fg_slices``, the indices of its conditioning slices, and the aligned in-plane start of
        a crop inside ``extent`` (the in-plane size the crop may use)."""
        i = int(fg_slices[self.R.randint(len(fg_slices))])
        n = hr.shape[0]
        idx = [min(max(i + o, 0), n - 1) for o in self.offsets]
        centre = None
        if self.R.rand() < self.pos_fraction:
            fg = torch.nonzero(hr[i] > self.threshold)
            if len(fg):
                centre = fg[self.R.randint(len(fg))].tolist()
        starts = [
            self._start(extent[a], self.patch_size[a], None if centre is None else centre[a], self.scale_factor[a])
            for a in range(2)
        ]
        return i, idx, starts

    def _pad(self, cond: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """Zero-pad crops of slices smaller than the patch; contiguous float outputs."""
        pad = []
        for a in (1, 0):  # F.pad lists the last axis first
            pad += [0, max(self.patch_size[a] - label.shape[1 + a], 0)]
        if any(pad):
            label, cond = torch.nn.functional.pad(label, pad), torch.nn.functional.pad(cond, pad)
        return cond.float().contiguous(), label.float().contiguous()

    def _one(self, hr: Tensor, up: Tensor, fg_slices: Tensor) -> tuple[Tensor, Tensor]:
        i, idx, starts = self._draw(hr, fg_slices, hr.shape[1:])
        sl = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        return self._pad(up[idx][(slice(None),) + sl], hr[i][sl][None])

    def _foreground_slices(self, hr: Tensor, fractions: Any, axis: int = 0) -> Tensor:
        """Indices of the slices of ``hr`` (slice axis first, viewed along volume ``axis``) with at least
        ``min_foreground`` foreground; all slices when none qualifies. ``fractions``: the cached
        :class:`SliceForegroundd` output (a tensor for axis 0 or ``{axis: tensor}``), computed here when absent."""
        fraction = fractions.get(axis) if isinstance(fractions, Mapping) else fractions if axis == 0 else None
        if fraction is None or len(fraction) != hr.shape[0]:
            fraction = (hr > self.threshold).float().flatten(1).mean(1)
        fg_slices = torch.nonzero(fraction >= self.min_foreground)[:, 0]
        return fg_slices if len(fg_slices) else torch.arange(hr.shape[0])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict | list[dict]:
        d = dict(data)
        hr, up = plain_tensor(d[self.label_key])[0], plain_tensor(d[self.cond_key])[0]
        fg_slices = self._foreground_slices(hr, d.get(self.foreground_key))
        out = []
        for _ in range(self.num_samples):
            cond, label = self._one(hr, up, fg_slices)
            out.append({self.output_cond_key: cond, self.label_key: label})
        return out if self.num_samples > 1 else out[0]


def repeat_dataset(dataset: torch.utils.data.Dataset, length: int) -> torch.utils.data.Subset:
    """A view of ``dataset`` with ``length`` items cycling over it: an epoch of a chosen length over few volumes
    (random transforms of a ``CacheDataset`` still run per item)."""
    n = len(dataset)
    if n == 0:
        raise ValueError("empty training dataset")
    return torch.utils.data.Subset(dataset, [i % n for i in range(int(length))])


def batch_pair(
    batchdata: Mapping[str, Any], image_key: str, label_key: str, signed: bool = True,
    device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """The conditioning and HR images of a batch as float tensors on ``device``, mapped from [0, 1] to [-1, 1]
    when ``signed``: what every prepare_batch of the SR trainers starts from."""
    cond = plain_tensor(batchdata[image_key]).to(device=device, non_blocking=non_blocking, **kwargs).float()
    hr = plain_tensor(batchdata[label_key]).to(device=device, non_blocking=non_blocking, **kwargs).float()
    return (to_signed(cond), to_signed(hr)) if signed else (cond, hr)


class EDMPrepareBatch(PrepareBatch):
    """Batch -> (noisy HR, F-space target, (), {sigma, cond, raw=True}) for the stock ``SupervisedTrainer``.

    With ``x0`` = HR and ``cond`` = conditioning (both mapped to [-1, 1] when ``signed``): σ from the denoiser's
    log-normal, ``x_noisy = x0 + σ_off·n + σ·ε`` (offset noise), target ``(x0 − c_skip·x_noisy)/c_out``.
    ``MSELoss(network(x_noisy, sigma=σ, cond=cond, raw=True), target)`` is then EDM's loss (methods.md §1).

    Args:
        denoiser: the :class:`EDMPrecond` being trained (unwrapped: its scalings and σ distribution are used).
        image_key: key of the conditioning images (B, C_cond, *spatial), [0, 1].
        label_key: key of the HR images (B, 1, *spatial), [0, 1].
        signed: map both from [0, 1] to [-1, 1].
        generator: random generator for σ and the noise (the global one when None).
    """

    def __init__(
        self,
        denoiser: EDMPrecond,
        image_key: str = "image",
        label_key: str = "label",
        signed: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.image_key, self.label_key, self.signed, self.generator = image_key, label_key, signed, generator

    def __call__(
        self, batchdata: dict[str, Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor, tuple, dict]:
        cond, x0 = batch_pair(batchdata, self.image_key, self.label_key, self.signed, device, non_blocking, **kwargs)
        sigma = self.denoiser.sample_sigma(x0.shape[0], self.generator, x0.device)
        x_noisy = add_training_noise(x0, sigma, self.denoiser.sigma_offset, self.generator)
        c_skip, c_out, _, _ = self.denoiser.get_scalings(sigma)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        target = (x0 - c_skip.reshape(shape) * x_noisy) / c_out.reshape(shape)
        return x_noisy, target, (), {"sigma": sigma, "cond": cond, "raw": True}


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
    ) -> None:
        self.init_weights, self.network_key = init_weights, network_key
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
            load_state(_module(self.load_dict[self.network_key]), self.init_weights, self.map_location)
            logger.info("no checkpoint in %s: fine-tuning from %s", self.ckpt_dir, self.init_weights)
            return
        CheckpointLoader(str(path), self.load_dict, name="common", map_location=self.map_location)(engine)
        self.loaded = path
        logger.info("resumed from %s (epoch %d, iteration %d)", path, engine.state.epoch, engine.state.iteration)


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
        self.saver = CheckpointSaver(self.save_dir, {**self.save_dict, self.engine_key: engine}, **self.kwargs)
        self.saver.attach(engine)


def _module(net: nn.Module) -> nn.Module:
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
        state = {k: v.detach().cpu().contiguous() for k, v in _module(self.network).state_dict().items()}
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
