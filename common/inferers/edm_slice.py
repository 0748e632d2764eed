"""2.5D EDM super-resolution as a MONAI ``Inferer``: each sagittal slice conditioned on its LR neighbours.

:class:`EDMSliceInferer` upsamples the LR slices in-plane on the HR grid (grid-aligned cubic), stacks each slice
with its neighbours (:func:`common.transforms.slice_stack`) and samples the HR slice with one of
:mod:`common.diffusion.samplers` through the bundle's :class:`common.diffusion.SRDenoiser`.
Images enter and leave in [0, 1] (the percentile scaling of methods.md §0); networks see [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import Tensor

from common.diffusion.samplers import SAMPLERS, get_sigmas_karras, make_noise, sample_paper_2p5d
from common.inferers.utils import SliceProgress, autocast_context, channels_last_weights, sample_mean_std
from common.transforms.intensity import to_signed, to_unit
from common.transforms.slices import slice_stack
from common.transforms.upsample import GridUpsample
from common.utils import as_flag, optional

__all__ = ["SAMPLER_NAMES", "EDMSliceInferer"]


SAMPLER_NAMES = ("paper", "euler", "heun")


class EDMSliceInferer(Inferer):
    """2.5D EDM super-resolution of a volume, slice by slice along axis 0 (sagittal in RAS).

    For every slice, the condition is the stack of its LR neighbours at ``offsets`` (edge slices repeat), upsampled
    in-plane on the HR grid by grid-aligned cubic convolution; the HR slice is then sampled from noise with the
    chosen sampler. The default is the 2.5D study's one network call at σ = 5 after churn
    (:func:`common.diffusion.samplers.sample_paper_2p5d`); "euler" and "heun" run ``num_steps`` steps on a Karras
    grid. One ``torch.Generator`` seeded with ``seed`` feeds all noise, drawn in a fixed order (sample, then slice
    batch, then sampler), so a run is reproducible for given settings.

    Args:
        scale_factor: HR/LR factor per axis of the volume; the first (slicing) axis must be 1.
        offsets: neighbour offsets of the conditioning slices ((-1, 0): previous + target, the paper;
            (-1, 0, 1): both neighbours); must match the network's ``num_cond``.
        sampler: "paper" (one call at ``sigma_max`` with churn), "euler" or "heun".
        num_steps: steps of the Karras grid for "euler"/"heun".
        sigma_min: last non-zero level of the grid.
        sigma_max: first level (and the level of the "paper" sampler).
        rho: Karras grid exponent.
        s_churn: EDM ``S_churn`` (10 for "paper"; 0, deterministic, is the usual for the others).
        s_noise: EDM ``S_noise``.
        max_correction_gain: "heun" only: correct only the steps whose gain on the denoiser's error
            ``|Δσ|/(2σ_{i+1})`` is at most this, Euler steps elsewhere (see
            :func:`common.diffusion.samplers.takes_heun_correction`; 1 is the recommended value for few steps);
            None: every step but the last (EDM Algorithm 2).
        init_sigma_scale: the initial state is ``z · init_sigma_scale`` for "euler"/"heun" (False/0: ``z``, the
            study's convention; True: ``σ_max · z``, EDM's).
        slice_batch: slices per network call.
        num_samples: K; K > 1 returns the mean and the standard deviation over K samples (2 channels).
        seed: seed of the generator.
        amp: bf16 autocast (CPU or GPU).
        channels_last: run the network in channels-last memory format (faster convolutions on CPU).
        upsample_mode: the upsampling of the LR conditioning (see :class:`common.transforms.GridUpsample`).
        progress: print a progress line per slice batch.
    """

    def __init__(
        self,
        scale_factor: Sequence[int] = (1, 2, 2),
        offsets: Sequence[int] = (-1, 0),
        sampler: str = "paper",
        num_steps: int = 1,
        sigma_min: float = 2e-3,
        sigma_max: float = 5.0,
        rho: float = 7.0,
        s_churn: float | None = None,
        s_noise: float | None = None,
        max_correction_gain: float | None = None,
        init_sigma_scale: bool = False,
        slice_batch: int = 8,
        num_samples: int = 1,
        seed: int = 0,
        amp: bool = False,
        channels_last: bool = False,
        upsample_mode: str = "cubic",
        progress: bool = True,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {sampler!r}")
        self.scale_factor = tuple(int(f) for f in scale_factor)
        if len(self.scale_factor) != 3 or self.scale_factor[0] != 1:
            raise ValueError(f"2.5D super-resolution is in-plane: scale_factor must be (1, fy, fz), got {scale_factor}")
        self.offsets = tuple(int(o) for o in offsets)
        self.sampler, self.num_steps = sampler, int(num_steps)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        paper = sampler == "paper"
        self.s_churn = float((10.0 if paper else 0.0) if s_churn is None else s_churn)
        self.s_noise = float((0.9 if paper else 1.0) if s_noise is None else s_noise)
        self.max_correction_gain = optional(max_correction_gain, float)
        self.init_sigma_scale = as_flag(init_sigma_scale)
        self.slice_batch, self.num_samples, self.seed = int(slice_batch), int(num_samples), int(seed)
        self.amp, self.channels_last, self.progress = as_flag(amp), as_flag(channels_last), as_flag(progress)
        self.upsample = GridUpsample((1,) + self.scale_factor[1:], upsample_mode)

    def condition(self, lr: Tensor) -> Tensor:
        """Per-slice conditioning of one LR volume (X, y, z) in [0, 1]: (X, len(offsets), Y, Z) in [-1, 1]."""
        up = self.upsample(lr[None, None].float())[0, 0]
        return to_signed(slice_stack(up, self.offsets, axis=0))

    def _sample_batch(self, denoiser: Callable, cond: Tensor, noise: Callable, progress: SliceProgress) -> Tensor:
        like = cond[:, :1]

        def callback(i: int, n: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
            progress.step(i, n, sigma)

        if self.sampler == "paper":
            return sample_paper_2p5d(
                denoiser, like, cond, noise=noise, callback=callback, sigma_max=self.sigma_max,
                s_churn=self.s_churn, s_noise=self.s_noise,
            )
        sigmas = get_sigmas_karras(self.num_steps, self.sigma_min, self.sigma_max, self.rho, device=cond.device)
        x = noise(like) * (self.sigma_max if self.init_sigma_scale else 1.0)
        heun = {"max_correction_gain": self.max_correction_gain} if self.sampler == "heun" else {}
        return SAMPLERS[self.sampler](
            denoiser, x, sigmas, cond, noise=noise, callback=callback, s_churn=self.s_churn, s_noise=self.s_noise,
            **heun,
        )

    def _volume(self, lr: Tensor, network: Callable, generator: torch.Generator, k: int, label: str) -> Tensor:
        """One SR sample of one LR volume (X, y, z) -> (X, Y, Z) in [0, 1]."""
        cond_all = self.condition(lr)
        noise = make_noise(generator)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

        def denoiser(x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
            with autocast_context(x.device, self.amp):
                out = network(x.contiguous(memory_format=memory_format), sigma,
                              None if cond is None else cond.contiguous(memory_format=memory_format))
            return out.float()

        n = cond_all.shape[0]
        progress = SliceProgress(n, self.progress, label if self.num_samples == 1 else f"{label} sample {k + 1}")
        out = torch.empty((n,) + tuple(cond_all.shape[2:]), dtype=torch.float32, device=lr.device)
        for start in range(0, n, self.slice_batch):
            cond = cond_all[start : start + self.slice_batch]
            out[start : start + cond.shape[0]] = self._sample_batch(denoiser, cond, noise, progress)[:, 0].float()
            progress.batch(cond.shape[0])
        return to_unit(out)

    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
        """Super-resolve (B, 1, X, y, z) LR volumes in [0, 1] into (B, C, X, Y, Z) in [0, 1].

        Args:
            inputs: LR volumes, channel-first, in [0, 1].
            network: the denoiser ``network(x, sigma, cond) -> D`` (e.g. :class:`SRDenoiser`).
            args: unused (MONAI's inferer signature).
            kwargs: unused.

        Returns:
            C = 1 (the sample) for ``num_samples`` 1, else C = 2 (mean and standard deviation over the samples).
        """
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected LR volumes (B, 1, X, y, z), got shape {tuple(x.shape)}")
        self.upsample.to(x.device)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        outputs = []
        with channels_last_weights(network, self.channels_last):
            for b in range(x.shape[0]):
                label = f"volume {b + 1}/{x.shape[0]}" if x.shape[0] > 1 else "SR"
                outputs.append(
                    sample_mean_std(lambda k, b=b: self._volume(x[b, 0], network, generator, k, label)[None, None],
                                    self.num_samples)
                )
        return torch.cat(outputs, dim=0)
