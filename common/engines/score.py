"""Training a VE score model on HR sagittal slices only (SRMRI, methods.md §3) with MONAI's ``SupervisedTrainer``.

No LR/HR pairs are ever simulated: the model learns the prior of HR slices, and the forward operator is chosen at
inference (:mod:`common.inferers.score`), so one model serves every scale factor and degradation.

- data: :func:`common.transforms.hr_preprocessing` (HR -> RAS -> [0, 1] by the volume's 1st/99th percentiles,
  clipped; the list of non-empty sagittal slices; cached per volume) and :class:`common.transforms.RandSliceCropd`
  (a random non-empty sagittal slice, a random in-plane crop, mostly centred on the head), with
  :func:`common.data.repeat_dataset` for epochs of a chosen length over few volumes;
- :class:`VESDEPrepareBatch`: σ log-uniform on ``[σ_min, σ_max]`` (``σ(t)``, ``t ~ U(ε, 1)``), ``x = x0 + σz``;
  the trainer's ``MSELoss(σ·s_θ(x, σ), −z)`` is then :func:`common.diffusion.vesde.dsm_loss` averaged over voxels
  (Song et al. 2021, eq. 7 with λ(σ) = σ²; the tests check the two agree);
- :class:`ExponentialMovingAverage`: an ignite handler keeping an EMA copy of the weights (0.999 in SRMRI); the
  copy is checkpointed, validated and saved as the shipped weights.

σ_max for the training crops: :mod:`common.engines.sigma_max`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import PrepareBatch
from torch import Tensor, nn

from common.diffusion.vesde import sample_sigma_vesde
from common.engines.checkpoints import unwrap_module
from common.utils import as_flag, plain_tensor

__all__ = ["VESDEPrepareBatch", "ExponentialMovingAverage"]


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


class ExponentialMovingAverage:
    """An EMA copy of a network's weights, updated after every optimiser step (an ignite handler).

    ``ema ← d·ema + (1 − d)·θ`` for floating-point parameters and buffers (other buffers are copied), with
    ``d = decay`` or, with ``warmup``, ``min(decay, (1 + n)/(10 + n))`` after ``n`` updates (so a short run is not
    dominated by the initial weights). ``model`` is the EMA network (eval mode, no gradients): give it to the
    validator and to :class:`common.engines.FinalWeightsSaver`. At the engine's start, before any update, the copy is
    taken again, so weights loaded when training starts (fine-tuning) are where the average begins. Put the handler
    itself in the checkpoint's ``save_dict``/``load_dict`` (it has ``state_dict``/``load_state_dict``) so a resumed
    run keeps its average.

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
        self.decay, self.warmup = float(decay), as_flag(warmup)
        self.event = Events.ITERATION_COMPLETED if event is None else event
        self.model = copy.deepcopy(unwrap_module(network)).eval()
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
        src = unwrap_module(self.network).state_dict()
        for name, v in self.model.state_dict().items():
            s = src[name].detach().to(v.device)
            if v.is_floating_point():
                v.mul_(d).add_(s.to(v.dtype), alpha=1.0 - d)
            else:
                v.copy_(s)
        self.num_updates += 1

    @torch.no_grad()
    def sync(self) -> None:
        """Restart the average at the network's current weights (before any update)."""
        self.model.load_state_dict(unwrap_module(self.network).state_dict())

    def attach(self, engine: Engine) -> None:
        # a fine-tuning run loads its initial weights at STARTED (ResumeFromLatest, attached first): the average
        # starts there, not at the weights the network had when this handler was built; a resumed run has updates
        engine.add_event_handler(Events.STARTED, lambda _: self.sync() if self.num_updates == 0 else None)
        engine.add_event_handler(self.event, lambda _: self.update())

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state.get("num_updates", 0))
