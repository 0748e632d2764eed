"""Super-resolution inferers: a sampler, the slice conditioning and the network calls, as MONAI ``Inferer`` objects.

- :class:`SRDenoiser` is the EDM denoiser ``D(x; σ, cond)`` of an SR bundle (an :class:`EDMPrecond` around a
  backbone) whose ``forward`` also answers MONAI's single-input tools (``verify_net_in_out``, ``ckpt_export``) and
  the stock supervised trainer (``raw=True`` returns the network output ``F`` for the F-space loss).
- :class:`AutocastInferer` runs a network under ``torch.autocast`` (bf16 on CPU) for the trainer and evaluators.
- :class:`EDMSliceInferer` is the 2.5D EDM inferer: each sagittal slice of the LR volume is conditioned on its
  LR neighbours (grid-aligned cubic upsampling in-plane) and sampled with one of :mod:`common.diffusion.samplers`.
- :func:`sample_mean_std` is the K-sample loop (mean, and standard deviation as an uncertainty map) that every
  stochastic SR inferer shares; :class:`SplitMeanStdd` splits its 2-channel output for writing.

Images enter and leave the inferers in [0, 1] (the percentile scaling of methods.md §0); networks see [-1, 1].
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform
from torch import Tensor, nn

from common.data import slice_stack
from common.diffusion.edm import EDMPrecond
from common.diffusion.samplers import SAMPLERS, get_sigmas_karras, make_noise, sample_paper_2p5d
from common.upsample import GridUpsample

__all__ = [
    "SRDenoiser",
    "AutocastInferer",
    "autocast_context",
    "to_signed",
    "to_unit",
    "sample_mean_std",
    "SplitMeanStdd",
    "SliceProgress",
    "EDMSliceInferer",
    "SAMPLER_NAMES",
]

logger = logging.getLogger("common")

SAMPLER_NAMES = ("paper", "euler", "heun")


def to_signed(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1] (the networks' range)."""
    return x * 2.0 - 1.0


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def autocast_context(device: torch.device | str, enabled: bool, dtype: torch.dtype = torch.bfloat16):
    """``torch.autocast`` for ``device`` (bf16 by default, CPU included) when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class SRDenoiser(EDMPrecond):
    """The EDM denoiser of an SR bundle: :class:`EDMPrecond` with a ``forward`` for the three ways it is called.

    - ``forward(x, sigma, cond)``: ``D(x; σ)`` for the samplers (the parent's denoiser);
    - ``forward(x, sigma, cond, raw=True)``: the raw network output ``F`` (the stock trainer's MSE on the
      F-space target, see :class:`common.edm_training.EDMPrepareBatch`);
    - ``forward(x)`` with the conditioning images and the noisy image stacked on channels (conditioning first):
      ``D`` at the fixed level ``probe_sigma``; this is what ``verify_net_in_out`` and a traced export call.

    Args:
        model: backbone ``F(x_in, c_noise)`` taking ``num_cond + 1`` channels.
        num_cond: number of conditioning channels (e.g. 2 for previous + target LR slice).
        probe_sigma: the noise level of the single-input call (5, the one-step sampler's level).
        sigma_data: standard deviation of the data.
        sigma_offset: standard deviation of the offset noise.
        p_mean: mean of ln σ in training.
        p_std: standard deviation of ln σ in training.
        sigma_min: lower clip of the training σ.
        sigma_max: upper clip of the training σ.
    """

    def __init__(
        self,
        model: nn.Module,
        num_cond: int = 2,
        probe_sigma: float = 5.0,
        sigma_data: float = 0.5,
        sigma_offset: float = 0.1,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 2e-3,
        sigma_max: float = 20.0,
    ) -> None:
        super().__init__(model, sigma_data, sigma_offset, p_mean, p_std, sigma_min, sigma_max)
        self.num_cond = int(num_cond)
        self.probe_sigma = float(probe_sigma)

    def forward(self, x: Tensor, sigma: Tensor | float | None = None, cond: Tensor | None = None, raw: bool = False):
        """``D(x; σ, cond)``, or ``F`` with ``raw``; with ``sigma`` None, ``x`` = [cond, noisy] at ``probe_sigma``.

        Args:
            x: noisy images (B, 1, *spatial), or (B, num_cond + 1, *spatial) when ``sigma`` is None.
            sigma: noise level (float, 0-d or (B,)); None for the single-input call.
            cond: conditioning images (B, num_cond, *spatial) in [-1, 1].
            raw: return the network output ``F`` instead of ``D``.
        """
        if sigma is None:
            if cond is not None or x.shape[1] != self.num_cond + 1:
                raise ValueError(
                    f"the single-input call takes (B, {self.num_cond + 1}, ...) = [cond, noisy], got {tuple(x.shape)}"
                )
            x, cond, sigma = x[:, self.num_cond :], x[:, : self.num_cond], self.probe_sigma
        denoised, f_x, _, _ = self.forward_with_output(x, sigma, cond)
        return f_x if raw else denoised


class AutocastInferer(Inferer):
    """``network(inputs, *args, **kwargs)`` under ``torch.autocast`` (bf16) on the inputs' device when enabled.

    MONAI's trainers only autocast on CUDA; this inferer gives the trainer and evaluators bf16 on CPU too.

    Args:
        enabled: use autocast.
        dtype: autocast dtype ("bfloat16" or "float16", or a torch dtype).
        channels_last: pass 4D tensors (inputs and tensor keyword arguments) in channels-last memory format.
    """

    def __init__(
        self, enabled: bool = True, dtype: str | torch.dtype = torch.bfloat16, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.enabled = bool(enabled)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.channels_last = bool(channels_last)

    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.channels_last:

            def fmt(t: Any) -> Any:
                return t.contiguous(memory_format=torch.channels_last) if isinstance(t, Tensor) and t.ndim == 4 else t

            inputs, kwargs = fmt(inputs), {k: fmt(v) for k, v in kwargs.items()}
        with autocast_context(inputs.device, self.enabled, self.dtype):
            out = network(inputs, *args, **kwargs)
        return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out


def sample_mean_std(sample: Callable[[int], Tensor], num_samples: int = 1, unbiased: bool = True) -> Tensor:
    """Draw ``num_samples`` outputs and return their mean, plus their standard deviation when ``num_samples > 1``.

    Streams the samples (Welford's update), so memory stays at two volumes whatever K is.

    Args:
        sample: ``sample(k)`` returns the k-th sample (B, 1, *spatial); called for k = 0 .. K-1 in order.
        num_samples: K.
        unbiased: divide by K - 1 (True) or K for the variance.

    Returns:
        (B, 1, *spatial) for K = 1, else (B, 2, *spatial): channel 0 the mean, channel 1 the standard deviation.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    mean = sample(0).float()
    if num_samples == 1:
        return mean
    m2 = torch.zeros_like(mean)
    for k in range(1, num_samples):
        x = sample(k).float()
        delta = x - mean
        mean = mean + delta / (k + 1)
        m2 = m2 + delta * (x - mean)
    var = m2 / (num_samples - 1 if unbiased else num_samples)
    return torch.cat([mean, var.clamp_min(0).sqrt()], dim=1)


class SplitMeanStdd(MapTransform):
    """Split a 2-channel (mean, standard deviation) prediction into ``key`` (mean) and ``<key>_std``.

    One-channel predictions pass through unchanged, so one postprocessing chain serves K = 1 and K > 1.

    Args:
        keys: prediction keys, channel-first (C, *spatial).
        std_suffix: suffix of the key that receives the standard deviation.
    """

    def __init__(self, keys: KeysCollection = "pred", std_suffix: str = "_std") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.std_suffix = std_suffix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].shape[0] == 2:
                d[f"{key}{self.std_suffix}"], d[key] = d[key][1:2], d[key][0:1]
        return d


class SliceProgress:
    """A progress line per slice batch, and per sampler step at most every ``interval`` seconds (stderr)."""

    def __init__(self, total: int, enabled: bool, label: str, interval: float = 0.0) -> None:
        self.total, self.enabled, self.label, self.interval = total, enabled, label, interval
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0

    def step(self, i: int, n: int, sigma: float) -> None:
        now = time.perf_counter()
        if self.enabled and n > 1 and (i == 0 or now - self.last >= self.interval):
            self.last = now
            print(f"{self.label}: slices {self.done}/{self.total}, sampler step {i + 1}/{n} (σ = {sigma:.3g})",
                  file=sys.stderr, flush=True)

    def batch(self, count: int) -> None:
        self.done += count
        if self.enabled:
            rate = (time.perf_counter() - self.t0) / max(self.done, 1)
            print(f"{self.label}: slices {self.done}/{self.total} ({rate:.3f} s/slice)", file=sys.stderr, flush=True)


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
        init_sigma_scale: the initial state is ``z · init_sigma_scale`` for "euler"/"heun" (False/0: ``z``, the
            study's convention; True: ``σ_max · z``, EDM's).
        slice_batch: slices per network call.
        num_samples: K; K > 1 returns the mean and the standard deviation over K samples (2 channels).
        seed: seed of the generator.
        amp: bf16 autocast (CPU or GPU).
        channels_last: run the network in channels-last memory format (faster convolutions on CPU).
        upsample_mode: the upsampling of the LR conditioning (see :class:`common.upsample.GridUpsample`).
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
        self.init_sigma_scale = bool(init_sigma_scale)
        self.slice_batch, self.num_samples, self.seed = int(slice_batch), int(num_samples), int(seed)
        self.amp, self.channels_last, self.progress = bool(amp), bool(channels_last), bool(progress)
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
        return SAMPLERS[self.sampler](
            denoiser, x, sigmas, cond, noise=noise, callback=callback, s_churn=self.s_churn, s_noise=self.s_noise
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
        if self.channels_last and isinstance(network, nn.Module):
            network.to(memory_format=torch.channels_last)
        self.upsample.to(x.device)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        outputs = []
        for b in range(x.shape[0]):
            label = f"volume {b + 1}/{x.shape[0]}" if x.shape[0] > 1 else "SR"
            outputs.append(
                sample_mean_std(lambda k, b=b: self._volume(x[b, 0], network, generator, k, label)[None, None],
                                self.num_samples)
            )
        return torch.cat(outputs, dim=0)
