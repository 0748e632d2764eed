"""Training a VE score model on HR sagittal slices only (SRMRI, methods.md §3) with MONAI's ``SupervisedTrainer``.

No LR/HR pairs are ever simulated: the model learns the prior of HR slices, and the forward operator is chosen at
inference (:mod:`common.score_inferer`), so one model serves every scale factor and degradation.

- data: :func:`hr_preprocessing` (HR -> RAS -> [0, 1] by the volume's 1st/99th percentiles, clipped; the list of
  non-empty sagittal slices; cached per volume) and :class:`RandSliceCropd` (a random non-empty sagittal slice, a
  random in-plane crop, mostly centred on the head), with :func:`common.edm_training.repeat_dataset` for epochs of
  a chosen length over few volumes;
- :class:`VESDEPrepareBatch`: σ log-uniform on ``[σ_min, σ_max]`` (``σ(t)``, ``t ~ U(ε, 1)``), ``x = x0 + σz``;
  the trainer's ``MSELoss(σ·s_θ(x, σ), −z)`` is then :func:`common.diffusion.vesde.dsm_loss` averaged over voxels
  (Song et al. 2021, eq. 7 with λ(σ) = σ²; the tests check the two agree);
- :class:`ExponentialMovingAverage`: an ignite handler keeping an EMA copy of the weights (0.999 in SRMRI); the
  copy is checkpointed, validated and saved as the shipped weights;
- :func:`estimate_sigma_max`: σ_max by the rule of Song & Ermon 2020 (technique 1: the largest Euclidean distance
  between two training images), on the crops the model is trained on; also the data mean and standard deviation.
  Command line: ``python -m common.score_training --dataset_dir <HR folder> [--datalist <json>] --patch_size 64 64``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import PrepareBatch
from monai.transforms import Compose, MapTransform, Randomizable
from torch import Tensor, nn

from common.diffusion.vesde import sample_sigma_vesde, sigma_max_rule
from common.transforms import LoadVolumed, PercentileNormalized, plain_tensor

__all__ = [
    "hr_preprocessing",
    "ForegroundSlicesd",
    "RandSliceCropd",
    "random_slice_crops",
    "VESDEPrepareBatch",
    "ExponentialMovingAverage",
    "sample_crops",
    "estimate_sigma_max",
    "main",
]

logger = logging.getLogger("common")



def hr_preprocessing(
    lower: float = 1.0, upper: float = 99.0, threshold: float = 0.1, min_foreground: float = 0.05
) -> Compose:
    """The cached part of the data path: load the HR ``label`` (RAS, checked), scale it to [0, 1] by its own
    ``lower``/``upper`` percentiles and clip (methods.md §0), and list its non-empty sagittal slices in
    ``fg_slices`` (at least ``min_foreground`` of the voxels above ``threshold``). No LR image is made.

    Args:
        lower: lower percentile.
        upper: upper percentile.
        threshold: head threshold on the [0, 1] scale.
        min_foreground: smallest fraction of head voxels in a non-empty slice.
    """
    return Compose([
        LoadVolumed(keys="label"),
        PercentileNormalized(keys="label", lower=lower, upper=upper),
        ForegroundSlicesd(threshold=threshold, min_foreground=min_foreground),
    ])


class ForegroundSlicesd(MapTransform):
    """``fg_slices``: indices of the sagittal slices (axis 0) of ``label`` (1, X, Y, Z) with at least
    ``min_foreground`` of their voxels above ``threshold`` (all slices when none qualifies).

    Args:
        threshold: head threshold on the [0, 1] scale.
        min_foreground: smallest fraction of head voxels.
        label_key: key of the HR volume.
        output_key: where the indices go.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        min_foreground: float = 0.05,
        label_key: str = "label",
        output_key: str = "fg_slices",
    ) -> None:
        super().__init__([label_key])
        self.threshold, self.min_foreground = float(threshold), float(min_foreground)
        self.label_key, self.output_key = label_key, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        hr = plain_tensor(d[self.label_key])[0]
        fraction = (hr > self.threshold).float().flatten(1).mean(1)
        fg = torch.nonzero(fraction >= self.min_foreground)[:, 0]
        d[self.output_key] = fg if len(fg) else torch.arange(hr.shape[0])
        return d


class RandSliceCropd(Randomizable, MapTransform):
    """A random non-empty sagittal slice of the HR ``label`` (1, X, Y, Z), cropped in-plane to ``patch_size``.

    Returns ``{"label": (1, h, w)}``. The slice is drawn from ``fg_slices`` (see :class:`ForegroundSlicesd`, cached
    with the volume, so a draw costs one slice, not a scan of the volume); the crop is centred on a random head
    voxel (above ``threshold``) with probability ``pos_fraction``, else uniform; slices smaller than the patch are
    zero-padded (zero is air on the [0, 1] scale).

    Args:
        patch_size: in-plane crop size (h, w).
        num_samples: crops per call (a list when > 1).
        threshold: head threshold on the [0, 1] scale.
        pos_fraction: probability of centring the crop on a head voxel.
        label_key: key of the HR volume.
        slices_key: key of the non-empty slice indices.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        num_samples: int = 1,
        threshold: float = 0.1,
        pos_fraction: float = 0.9,
        label_key: str = "label",
        slices_key: str = "fg_slices",
    ) -> None:
        MapTransform.__init__(self, [label_key])
        self.patch_size = tuple(int(p) for p in patch_size)
        self.num_samples, self.threshold, self.pos_fraction = int(num_samples), float(threshold), float(pos_fraction)
        self.label_key, self.slices_key = label_key, slices_key

    def randomize(self, data: Any = None) -> None:
        pass

    def _start(self, size: int, patch: int, centre: int | None) -> int:
        room = size - patch
        if room <= 0:
            return 0
        if centre is None:
            return int(self.R.randint(0, room + 1))
        return min(max(centre - patch // 2, 0), room)

    def _one(self, hr: Tensor, fg_slices: Tensor) -> Tensor:
        plane = hr[int(fg_slices[self.R.randint(len(fg_slices))])]
        centre = None
        if self.R.rand() < self.pos_fraction:
            fg = torch.nonzero(plane > self.threshold)
            if len(fg):
                centre = fg[self.R.randint(len(fg))].tolist()
        starts = [
            self._start(plane.shape[a], self.patch_size[a], None if centre is None else centre[a]) for a in range(2)
        ]
        # a copy: the cached volume is shared with later draws (CacheDataset with copy_cache=False)
        crop = plane[tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))][None].clone()
        pad = [0, max(self.patch_size[1] - crop.shape[2], 0), 0, max(self.patch_size[0] - crop.shape[1], 0)]
        if any(pad):
            crop = torch.nn.functional.pad(crop, pad)
        return crop.float().contiguous()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict | list[dict]:
        hr = plain_tensor(data[self.label_key])[0]
        fg_slices = data.get(self.slices_key)
        if fg_slices is None:
            fg_slices = ForegroundSlicesd(self.threshold)(dict(data))["fg_slices"]
        out = [{self.label_key: self._one(hr, torch.as_tensor(fg_slices))} for _ in range(self.num_samples)]
        return out if self.num_samples > 1 else out[0]


def random_slice_crops(
    patch_size: Sequence[int], num_samples: int = 1, threshold: float = 0.1, pos_fraction: float = 0.9
) -> RandSliceCropd:
    """:class:`RandSliceCropd` with the bundle's defaults (kept as a function for the configs)."""
    return RandSliceCropd(patch_size, num_samples, threshold, pos_fraction)


class VESDEPrepareBatch(PrepareBatch):
    """Batch -> ``(x0 + σz, −z, (), {"sigma": σ, "raw": True})`` for the stock ``SupervisedTrainer``.

    ``MSELoss(network(x, sigma=σ, raw=True), −z)`` with a :class:`common.networks.score_net.ScoreNet` (whose raw
    output is ``σ·s_θ``) is the denoising score matching loss ``E‖σ·s_θ(x0 + σz, σ) + z‖²`` per voxel.

    Args:
        sigma_min: σ(0) (0.01 in SRMRI).
        sigma_max: σ(1), chosen by :func:`estimate_sigma_max` for the training crops.
        eps: smallest diffusion time (Song et al.'s 1e-5).
        label_key: key of the HR crops (B, 1, *spatial) in [0, 1].
        generator: random generator for σ and z (the global one when None).
    """

    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 378.0,
        eps: float = 1e-5,
        label_key: str = "label",
        generator: torch.Generator | None = None,
    ) -> None:
        self.sigma_min, self.sigma_max, self.eps = float(sigma_min), float(sigma_max), float(eps)
        self.label_key, self.generator = label_key, generator

    def __call__(
        self, batchdata: dict[str, Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor, tuple, dict]:
        x0 = plain_tensor(batchdata[self.label_key]).to(device=device, non_blocking=non_blocking, **kwargs).float()
        gen_device = self.generator.device if self.generator is not None else x0.device
        sigma = sample_sigma_vesde(x0.shape[0], self.sigma_min, self.sigma_max, self.eps, self.generator, gen_device)
        sigma = sigma.to(device=x0.device, dtype=x0.dtype)
        z = torch.randn(x0.shape, generator=self.generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        x = x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * z
        return x, -z, (), {"sigma": sigma, "raw": True}


def _module(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else net


class ExponentialMovingAverage:
    """An EMA copy of a network's weights, updated after every optimiser step (an ignite handler).

    ``ema ← d·ema + (1 − d)·θ`` for floating-point parameters and buffers (other buffers are copied), with
    ``d = decay`` or, with ``warmup``, ``min(decay, (1 + n)/(10 + n))`` after ``n`` updates (so a short run is not
    dominated by the initial weights). ``model`` is the EMA network (eval mode, no gradients): give it to the
    validator and to :class:`common.edm_training.FinalWeightsSaver`; put the handler itself in the checkpoint's
    ``save_dict``/``load_dict`` (it has ``state_dict``/``load_state_dict``) so a resumed run keeps its average.

    Args:
        network: the trained network (a DDP wrapper is unwrapped; it is deep-copied once).
        decay: EMA rate (0.999 in SRMRI).
        warmup: use the warm-up rate above.
        event: when to update (after every iteration by default).
    """

    def __init__(self, network: nn.Module, decay: float = 0.999, warmup: bool = False, event: Any = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.network = network
        self.decay, self.warmup = float(decay), bool(warmup)
        self.event = Events.ITERATION_COMPLETED if event is None else event
        self.model = copy.deepcopy(_module(network)).eval()
        self.model.requires_grad_(False)
        self.num_updates = 0

    def rate(self) -> float:
        """The decay used by the next update."""
        if self.warmup:
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the network's current weights."""
        d = self.rate()
        src = _module(self.network).state_dict()
        for name, v in self.model.state_dict().items():
            s = src[name].detach().to(v.device)
            if v.is_floating_point():
                v.mul_(d).add_(s.to(v.dtype), alpha=1.0 - d)
            else:
                v.copy_(s)
        self.num_updates += 1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(self.event, lambda _: self.update())

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state.get("num_updates", 0))


def sample_crops(items: Sequence[dict], patch_size: Sequence[int], num_crops: int = 1000, seed: int = 0) -> Tensor:
    """``num_crops`` training crops (N, 1, h, w) drawn as the trainer draws them, spread over the volumes.

    Args:
        items: datalist items with an HR ``label`` path.
        patch_size: in-plane crop size.
        num_crops: number of crops.
        seed: seed of the crop draw.
    """
    if not items:
        raise ValueError("no training volumes")
    load, crops = hr_preprocessing(), random_slice_crops(patch_size)
    crops.set_random_state(seed)
    out = []
    for k, item in enumerate(items):
        vol = load(dict(item))
        n = num_crops // len(items) + (1 if k < num_crops % len(items) else 0)
        out += [crops(vol)["label"] for _ in range(n)]
    return torch.stack(out)


def estimate_sigma_max(
    items: Sequence[dict], patch_size: Sequence[int], num_crops: int = 1000, seed: int = 0
) -> dict[str, float]:
    """σ_max for crops of ``patch_size`` by Song & Ermon's rule, with the crops' mean and standard deviation.

    Args:
        items: datalist items with an HR ``label`` path (the training split).
        patch_size: in-plane crop size of the training.
        num_crops: crops drawn (pairwise distances cost ``num_crops²``).
        seed: seed of the draw.
    """
    crops = sample_crops(items, patch_size, num_crops, seed)
    return {
        "sigma_max": round(sigma_max_rule(crops, max_images=None), 2),
        "data_mean": float(crops.mean()),
        "data_std": float(crops.std()),
        "num_crops": int(crops.shape[0]),
        "patch_size": [int(p) for p in patch_size],
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m common.score_training``: print σ_max (and the data statistics) for the training crops as JSON."""
    from common.data import training_datalist

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset_dir", required=True, help="folder of HR NIfTI volumes")
    ap.add_argument("--datalist", default=None, help="MONAI-style JSON whose 'training' items are used")
    ap.add_argument("--patch_size", type=int, nargs=2, default=[64, 64])
    ap.add_argument("--num_crops", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    split = training_datalist(args.dataset_dir, args.datalist)
    result = estimate_sigma_max(split["training"], args.patch_size, args.num_crops, args.seed)
    result["volumes"] = [str(it["label"]) for it in split["training"]]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
