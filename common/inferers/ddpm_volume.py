"""Conditional DDPM super-resolution of whole volumes: one trajectory, the ε-network on Gaussian-blended windows.

:class:`DDPMSRInferer` is the inferer of the seed DDPM (methods.md §2), a MONAI ``Inferer``:

1. the LR volume (B, 1, x, y, z) in [0, 1] is upsampled onto the HR grid (:class:`common.transforms.GridUpsample`,
   grid-aligned cubic by default, as the other bundles) and mapped to [-1, 1]: the conditioning ``cond``;
2. one noise field ``x_T ~ N(0, I)`` of the HR volume's size starts one reverse trajectory; with ``start_timestep``
   t0 the trajectory starts instead at t0 from the conditioning diffused forward,
   ``x_t0 = √ᾱ_t0 · cond + √(1 − ᾱ_t0) · ε`` (Chung et al. 2022, "Come-Closer-Diffuse-Faster", CCDF: a
   good initial estimate lets the reverse process start at t0 < T with fewer steps and a smaller final error), so
   the steps from T to t0 are not paid and the steps where an ε-model's x̂0 is least accurate are skipped;
3. at every step the ε-network ``network(cat[x_t, cond], t)`` (MONAI's ``DiffusionInferer`` concat conditioning;
   e.g. :class:`monai.networks.nets.DiffusionModelUNet` with 2 input channels) is evaluated over the whole volume
   on Gaussian-blended windows by :class:`common.inferers.WindowedDenoiser` (the 3D EDM bundle's windowing, with t
   in the place of σ), and the scheduler steps: MONAI's ``DDPMScheduler`` (``sampler="ddpm"``, ancestral, all T
   steps, the seed's posterior) or :class:`common.diffusion.AlignedDDIMScheduler` (``sampler="ddim"``, ``num_steps``
   steps, η = 0 by default);
4. the result is mapped back to [0, 1]; with ``num_samples`` K > 1 the K samples are reduced to their mean and
   standard deviation by :func:`common.inferers.sample_volumes`; with ``antithetic`` they come in pairs whose
   initial noise fields are z and −z (antithetic variates, Hammersley & Morton 1956: the pair's mean cancels the
   part of the result that is odd in z, at no extra cost).

Why not ``DiffusionInferer.sample``: it calls the network on the whole input at once; a 256³ volume does not fit a
3D U-Net's activations, and windowing each step (not each window's whole trajectory) keeps one noise field per
volume, so no seams. The training side is MONAI's ``DiffusionInferer`` on the same schedule
(:func:`common.diffusion.ddpm_scheduler`): :class:`ConcatDiffusionInferer` fixes its conditioning mode to "concat"
(a trainer passes only what ``monai.engines.DiffusionPrepareBatch`` returns, and the default mode is cross-attention)
and adds bf16 autocast on CPU.

One ``torch.Generator`` seeded with ``seed`` per volume draws all noise (the initial field, then the DDPM / η > 0
step noise, sample after sample; an antithetic pair's second field is the first's negation, not a draw), so a
volume's result depends only on the seed and the settings.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.schedulers import Scheduler
from torch import Tensor

from common.diffusion.ddpm import SCHEDULE, ddim_scheduler, ddpm_scheduler
from common.inferers.utils import autocast_context, sample_volumes
from common.inferers.windowed import WindowedDenoiser, window_slices
from common.transforms.intensity import to_signed, to_unit
from common.transforms.upsample import GridUpsample
from common.utils import as_flag

__all__ = ["DDPM_SAMPLERS", "ConcatEpsilon", "ConcatDiffusionInferer", "DDPMSRInferer"]

DDPM_SAMPLERS = ("ddim", "ddpm")


class ConcatEpsilon:
    """``network(cat[x_t, cond], t)`` with the signature ``(x, t, cond)`` that :class:`WindowedDenoiser` windows.

    The windowed denoiser passes t (its "σ") as a float tensor, one value per window; the network gets integer
    timesteps, as MONAI's ``DiffusionInferer`` gives it in training (``torch.randint``).

    Args:
        network: the ε-network ``network(x_in, timesteps) -> ε`` (``x_in`` = noisy image, then the conditioning).
    """

    def __init__(self, network: Callable[..., Tensor]) -> None:
        self.network = network

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        x_in = x if cond is None else torch.cat([x, cond], dim=1)
        return self.network(x_in, t.round().long())


class ConcatDiffusionInferer(DiffusionInferer):
    """MONAI's training forward ``ε̂ = network(cat[add_noise(x0, ε, t), cond], t)`` with concat conditioning.

    With ``monai.engines.DiffusionPrepareBatch(num_train_timesteps, condition_name="cond")`` and a
    ``SupervisedTrainer`` (loss MSE against the returned noise) this is the seed's ε-prediction training step; the
    trainer's ``inferer(inputs, network, noise=…, timesteps=…, condition=…)`` call cannot choose the mode, so it is
    fixed here.

    Args:
        scheduler: the training scheduler (:func:`common.diffusion.ddpm_scheduler`: its ``add_noise``).
        mode: conditioning mode, "concat" (the seed's: the upsampled LR as extra input channels) or "crossattn".
        amp: run the network under bf16 autocast (CPU included; MONAI's trainers autocast only on CUDA); the
            prediction is returned as float32.
    """

    def __init__(self, scheduler: Scheduler, mode: str = "concat", amp: bool = False) -> None:
        super().__init__(scheduler)
        if mode not in ("concat", "crossattn"):
            raise ValueError(f"mode must be 'concat' or 'crossattn', got {mode!r}")
        self.mode, self.amp = mode, as_flag(amp)

    def __call__(  # type: ignore[override]
        self, inputs: Tensor, diffusion_model: Callable[..., Tensor], noise: Tensor, timesteps: Tensor,
        condition: Tensor | None = None, mode: str | None = None, seg: Tensor | None = None,
    ) -> Tensor:
        with autocast_context(inputs.device, self.amp):
            out = super().__call__(inputs, diffusion_model, noise, timesteps, condition, mode or self.mode, seg)
        return out.float()


class _Progress:
    """About ten lines per trajectory on stderr: step, timestep, elapsed seconds."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled, label, total
        self.every, self.t0 = max(1, total // 10), time.perf_counter()

    def __call__(self, i: int, t: int) -> None:
        if self.enabled and (i == 0 or (i + 1) % self.every == 0 or i + 1 == self.total):
            print(f"{self.label}: step {i + 1}/{self.total} (t = {t}), {time.perf_counter() - self.t0:.1f} s",
                  file=sys.stderr, flush=True)


class DDPMSRInferer(Inferer):
    """Conditional ε-prediction DDPM super-resolution of LR volumes, one trajectory per volume, windowed network.

    Args:
        scale_factor: HR/LR factor per spatial axis, e.g. (1, 2, 2) (x2 in-plane of sagittal slices).
        roi_size: window size on the HR grid (the training patch); a non-positive entry takes the whole axis, and
            windows are clipped to short axes.
        sw_batch_size: windows per network call (the bound on the network's memory).
        overlap: overlap of neighbouring windows, in [0, 1); one value or one per axis.
        blend_mode: "gaussian" (the default; weights fall off towards window edges) or "constant".
        sigma_scale: standard deviation of the Gaussian weights as a fraction of the window size.
        sampler: "ddim" (``num_steps`` steps, the fast default) or "ddpm" (ancestral, all ``num_train_timesteps``
            steps: the seed's sampler; ``num_steps`` is not used).
        num_steps: DDIM steps N (network evaluations per sample).
        eta: DDIM η (0: deterministic given the initial noise; 1: ancestral sampling of the respaced chain).
        timestep_spacing: DDIM timesteps, "trailing" (from T − 1 with stride T/N) or "linspace" (MONAI's).
        start_timestep: t0 of CCDF: start at t0 from the conditioning diffused forward to t0 ("ddim": the N steps
            are spaced over [0, t0], "trailing" only; "ddpm": the t0 + 1 steps t0 … 0); None: from pure noise at
            T − 1.
        num_train_timesteps: T of the trained model (1000 in the seed).
        schedule: MONAI ``NoiseSchedules`` name of the training schedule (the seed's clipped cosine).
        schedule_args: the schedule's arguments, e.g. ``{"max_beta": 0.3}``.
        clip_sample: clip x̂0 to [-1, 1] in every step.
        num_samples: K; K > 1 returns the mean and the standard deviation of K samples as 2 channels.
        antithetic: draw the samples in antithetic pairs: sample 2j + 1 starts from the negated initial noise field
            of sample 2j (its step noise, if any, is drawn anew), so the pair's mean cancels the part of the result
            that is odd in that field (variance reduction of the K-sample mean at no extra cost; the standard
            deviation channel then measures that odd part, not the spread of independent samples).
        seed: seed of the per-volume generator.
        amp: run the network under bf16 autocast (CPU or GPU); the trajectory stays float32.
        channels_last: give the network its windows channels-last (faster 3D convolutions on CPU; see
            :class:`common.inferers.WindowedDenoiser`).
        upsample_mode: upsampling of the LR conditioning ("cubic", as the bundle's training pairs).
        sw_device: device of the network and the windows (None: the input's); the volume stays on the input's.
        progress: print about ten lines per trajectory to stderr.
    """

    def __init__(
        self,
        scale_factor: Sequence[int] = (1, 2, 2),
        roi_size: Sequence[int] | int = (16, 32, 32),
        sw_batch_size: int = 8,
        overlap: Sequence[float] | float = 0.25,
        blend_mode: str = "gaussian",
        sigma_scale: Sequence[float] | float = 0.125,
        sampler: str = "ddim",
        num_steps: int = 50,
        eta: float = 0.0,
        timestep_spacing: str = "trailing",
        start_timestep: int | None = None,
        num_train_timesteps: int = 1000,
        schedule: str = SCHEDULE,
        schedule_args: Mapping[str, Any] | None = None,
        clip_sample: bool = True,
        num_samples: int = 1,
        antithetic: bool = False,
        seed: int = 0,
        amp: bool = False,
        channels_last: bool = False,
        upsample_mode: str = "cubic",
        sw_device: torch.device | str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if sampler not in DDPM_SAMPLERS:
            raise ValueError(f"sampler must be one of {DDPM_SAMPLERS}, got {sampler!r}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.scale_factor = tuple(int(f) for f in scale_factor)
        if len(self.scale_factor) != 3:
            raise ValueError(f"scale_factor needs one factor per spatial axis (3), got {scale_factor}")
        self.roi_size = roi_size if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
        self.sw_batch_size, self.overlap = int(sw_batch_size), overlap
        self.blend_mode, self.sigma_scale = blend_mode, sigma_scale
        self.sampler, self.num_steps, self.eta = sampler, int(num_steps), float(eta)
        self.timestep_spacing = timestep_spacing
        self.start_timestep = None if start_timestep is None else int(start_timestep)
        self.num_train_timesteps, self.schedule = int(num_train_timesteps), schedule
        self.schedule_args = dict(schedule_args or {})
        self.clip_sample = as_flag(clip_sample)
        self.num_samples, self.seed, self.antithetic = int(num_samples), int(seed), as_flag(antithetic)
        self.amp, self.sw_device, self.progress = as_flag(amp), sw_device, as_flag(progress)
        self.channels_last = as_flag(channels_last)
        self.upsample = GridUpsample(self.scale_factor, upsample_mode)
        self.scheduler()  # refuse bad schedule settings now, not after the first volume is loaded

    def scheduler(self) -> Scheduler:
        """A fresh sampling scheduler with its timesteps set (MONAI's DDPM, or the aligned DDIM)."""
        if self.sampler == "ddpm":
            return ddpm_scheduler(self.num_train_timesteps, self.schedule, clip_sample=self.clip_sample,
                                  start_timestep=self.start_timestep, **self.schedule_args)
        return ddim_scheduler(self.num_train_timesteps, self.num_steps, self.schedule, self.timestep_spacing,
                              clip_sample=self.clip_sample, start_timestep=self.start_timestep,
                              **self.schedule_args)

    @property
    def num_evaluations(self) -> int:
        """Whole-volume network evaluations per sample (NFE): T (or t0 + 1) for "ddpm", ``num_steps`` for "ddim"."""
        if self.sampler == "ddim":
            return self.num_steps
        return self.num_train_timesteps if self.start_timestep is None else self.start_timestep + 1

    def hr_shape(self, lr_spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The HR grid of an LR volume of spatial size ``lr_spatial_shape``."""
        return tuple(int(s) * f for s, f in zip(lr_spatial_shape, self.scale_factor))

    def num_windows(self, lr_spatial_shape: Sequence[int]) -> int:
        """Windows per whole-volume evaluation for an LR volume of spatial size ``lr_spatial_shape``."""
        return len(window_slices(self.hr_shape(lr_spatial_shape), self.roi_size, self.overlap))

    def num_window_evaluations(self, lr_spatial_shape: Sequence[int]) -> int:
        """Windows the network sees per volume (windows × NFE × K): the cost, whatever ``sw_batch_size``."""
        return self.num_windows(lr_spatial_shape) * self.num_evaluations * self.num_samples

    def num_network_calls(self, lr_spatial_shape: Sequence[int]) -> int:
        """Network forward calls per volume: ⌈windows / sw_batch_size⌉ × NFE × K."""
        batches = -(-self.num_windows(lr_spatial_shape) // self.sw_batch_size)
        return batches * self.num_evaluations * self.num_samples

    def condition(self, lr: Tensor) -> Tensor:
        """The conditioning of LR volumes (B, 1, x, y, z) in [0, 1]: upsampled onto the HR grid, in [-1, 1]."""
        self.upsample.to(lr.device)
        return to_signed(self.upsample(lr.float()))

    def windowed(self, network: Callable[..., Tensor]) -> WindowedDenoiser:
        """``network(cat[x_t, cond], t) -> ε`` evaluated over whole volumes on Gaussian-blended windows."""
        return WindowedDenoiser(
            ConcatEpsilon(network), self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap,
            mode=self.blend_mode, sigma_scale=self.sigma_scale, autocast_bf16=self.amp,
            channels_last=self.channels_last, sw_device=self.sw_device,
        )

    def sample(
        self, cond: Tensor, network: Callable[..., Tensor], generator: torch.Generator | None = None,
        label: str = "SR", noise: Tensor | None = None,
    ) -> Tensor:
        """One sample for conditioning ``cond`` (B, 1, X, Y, Z) in [-1, 1]: the trajectory's x_0 in [-1, 1].

        Args:
            cond: upsampled LR volumes (see :meth:`condition`).
            network: the ε-network ``network(cat[x_t, cond], timesteps) -> ε``.
            generator: source of all noise (on ``cond``'s device); the global RNG when None.
            label: prefix of the progress lines.
            noise: the initial noise field (B, 1, X, Y, Z); None draws it from ``generator``.
        """
        scheduler, eps = self.scheduler(), self.windowed(network)
        x = self.initial_noise(cond, generator) if noise is None else noise.float()
        if self.start_timestep is not None:  # CCDF: the conditioning diffused forward to the first timestep
            x = scheduler.add_noise(cond[:, :1].float(), x, scheduler.timesteps[:1].to(cond.device))
        step_kw = {"eta": self.eta} if self.sampler == "ddim" else {}
        progress = _Progress(self.progress, label, len(scheduler.timesteps))
        for i, t in enumerate(scheduler.timesteps):
            model_output = eps(x, float(t), cond).float()
            x, _ = scheduler.step(model_output, t, x, generator=generator, **step_kw)
            progress(i, int(t))
        return x

    @staticmethod
    def initial_noise(cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A standard normal field of one channel of ``cond``'s shape: x_T, or the ε of the CCDF start."""
        return torch.randn(cond[:, :1].shape, generator=generator, device=cond.device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
        """Super-resolve LR volumes (B, 1, x, y, z) in [0, 1] into (B, C, x·f0, y·f1, z·f2) in [0, 1].

        Args:
            inputs: LR volumes, channel-first, in [0, 1].
            network: the ε-network ``network(cat[x_t, cond], timesteps) -> ε``.
            args: unused (MONAI's inferer signature).
            kwargs: unused.

        Returns:
            C = 1 (the sample) when ``num_samples`` is 1, else C = 2 (mean and standard deviation of the samples).
        """
        previous: list[Tensor] = []  # the field of sample k - 1, kept only for an antithetic odd k

        def one(cond: Tensor, generator: torch.Generator, label: str, k: int) -> Tensor:
            if self.antithetic and k % 2 == 1:
                noise = -previous.pop()
            else:
                noise = self.initial_noise(cond, generator)
                if self.antithetic:
                    previous[:] = [noise]
            return to_unit(self.sample(cond, network, generator, label, noise=noise))

        return sample_volumes(inputs, self.condition, one, self.num_samples, self.seed)

    def __repr__(self) -> str:
        steps = f"num_steps={self.num_steps}, eta={self.eta}, " if self.sampler == "ddim" else ""
        steps += "" if self.start_timestep is None else f"start_timestep={self.start_timestep}, "
        return (
            f"{type(self).__name__}(scale_factor={self.scale_factor}, roi_size={self.roi_size}, "
            f"overlap={self.overlap}, sampler={self.sampler!r}, {steps}"
            f"num_train_timesteps={self.num_train_timesteps}, num_samples={self.num_samples}, "
            f"{'antithetic=True, ' if self.antithetic else ''}amp={self.amp})"
        )
