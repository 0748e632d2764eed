"""3D EDM super-resolution of whole volumes: one sampler trajectory, the denoiser on Gaussian-blended windows.

:class:`EDMVolumeInferer` is the inferer of the 3D EDM bundle (methods.md §1, 3D), a MONAI ``Inferer``:

1. the LR volume (B, 1, x, y, z) in [0, 1] is upsampled onto the HR grid by grid-aligned trilinear interpolation
   (:class:`common.transforms.GridUpsample`, mode "linear"; HR voxel j sits at LR coordinate (j + 0.5)/f − 0.5) and
   mapped to [-1, 1]: the conditioning ``cond``;
2. one noise field ``z ~ N(0, I)`` of the HR volume's size starts one sampler trajectory (Euler or Heun on a
   Karras grid, optional churn; :mod:`common.diffusion.samplers`);
3. at every sampler step the denoiser ``D(x; σ, cond)`` is evaluated over the whole volume by
   :class:`common.inferers.WindowedDenoiser` (sliding windows, Gaussian blending), so memory for the
   network is bounded by ``sw_batch_size`` windows whatever the volume size, and the volume follows one trajectory
   (no seams where windows meet: the paper's per-window sampling with uniform averaging leaves them);
4. the result is mapped back to [0, 1]; with ``num_samples`` K > 1 the K samples are reduced to their mean and
   standard deviation by :func:`common.inferers.sample_volumes` (the loop the 2.5D inferer shares).

The paper's sampler is the default: 20 Euler steps, σ from 5 to 2e-3, ρ = 7, initial state ``z`` (not scaled by
σ_max, as DIAMOND). One ``torch.Generator`` seeded with ``seed`` per volume draws all noise (initial state, then
churn), so a volume's result depends only on the seed and the settings, not on its place in a batch.

The two-channel output of K > 1 samples is split into ``pred`` (mean) and ``pred_std`` by the shared
:class:`common.transforms.SplitMeanStdd` in the bundle's postprocessing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from torch import Tensor

from common.diffusion.samplers import SAMPLERS, get_sigmas_karras, make_noise
from common.diffusion.samplers import num_evaluations as count_evaluations
from common.inferers.utils import sample_volumes
from common.inferers.windowed import WindowedDenoiser
from common.transforms.intensity import to_signed, to_unit
from common.transforms.upsample import GridUpsample
from common.utils import as_flag, optional

__all__ = ["VOLUME_SAMPLERS", "hr_window", "EDMVolumeInferer"]


VOLUME_SAMPLERS = tuple(SAMPLERS)  # ("euler", "heun")


def hr_window(lr_patch_size: Sequence[int], scale_factor: Sequence[int]) -> list[int]:
    """The HR-grid window of an LR patch: ``lr_patch_size`` times ``scale_factor`` per axis (what training saw)."""
    return [int(p) * int(f) for p, f in zip(lr_patch_size, scale_factor)]


class _StepProgress:
    """One line per sampler step on stderr: step, σ, elapsed seconds."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled, self.label, self.t0 = enabled, label, time.perf_counter()

    def __call__(self, i: int, n: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.t0
            print(f"{self.label}: sampler step {i + 1}/{n} (σ = {sigma:.3g}), {elapsed:.1f} s", file=sys.stderr,
                  flush=True)


class EDMVolumeInferer(Inferer):
    """3D EDM super-resolution of LR volumes: one sampler trajectory per volume, windowed denoiser evaluations.

    Args:
        scale_factor: HR/LR factor per spatial axis, e.g. (1, 2, 2) (x2 in-plane of sagittal slices) or (1, 1, 4)
            (thick axial slices).
        roi_size: window size on the HR grid (the training patch: LR patch size times ``scale_factor``); a
            non-positive entry takes the whole axis, and windows are clipped to short axes.
        sw_batch_size: windows per network call (the bound on the network's memory).
        overlap: overlap of neighbouring windows, in [0, 1); one value or one per axis.
        blend_mode: "gaussian" (the default; weights fall off towards window edges) or "constant".
        sigma_scale: standard deviation of the Gaussian weights as a fraction of the window size.
        sampler: "euler" (the paper's) or "heun" (2 network calls per step but the last).
        num_steps: steps of the Karras grid (20 in the paper).
        sigma_min: last non-zero noise level.
        sigma_max: first noise level.
        rho: Karras grid exponent.
        s_churn: EDM ``S_churn`` (0: deterministic ODE sampling given the initial noise).
        s_noise: EDM ``S_noise``.
        max_correction_gain: "heun" only: correct only the steps whose gain on the denoiser's error
            ``|Δσ|/(2σ_{i+1})`` is at most this, Euler steps elsewhere (see
            :func:`common.diffusion.samplers.takes_heun_correction`; 1 is the recommended value for few steps);
            None: every step but the last (EDM Algorithm 2).
        init_sigma_scale: start from ``σ_max·z`` (EDM) instead of ``z`` (DIAMOND and the paper).
        start_from_condition: start from the conditioning plus noise, ``cond + σ_max·z``, instead of noise alone
            (SDEdit, Meng et al. 2022; CCDF, Chung et al. 2022): with a small ``sigma_max`` the sampler only
            refines the upsampled LR (for the 3D bundle's weights a loss at every σ_max measured; its card).
        num_samples: K; K > 1 returns the mean and the standard deviation of K samples as 2 channels.
        seed: seed of the per-volume generator.
        amp: run the network under bf16 autocast (CPU or GPU); the sampler state stays float32.
        channels_last: give the network its windows channels-last (faster 3D convolutions on CPU; see
            :class:`common.inferers.WindowedDenoiser`).
        upsample_mode: upsampling of the LR conditioning ("linear": trilinear, the paper's).
        sw_device: device of the network and the windows (None: the input's); the volume stays on the input's.
        progress: print one line per sampler step to stderr.
    """

    def __init__(
        self,
        scale_factor: Sequence[int] = (1, 2, 2),
        roi_size: Sequence[int] | int = (16, 32, 32),
        sw_batch_size: int = 8,
        overlap: Sequence[float] | float = 0.25,
        blend_mode: str = "gaussian",
        sigma_scale: Sequence[float] | float = 0.125,
        sampler: str = "euler",
        num_steps: int = 20,
        sigma_min: float = 2e-3,
        sigma_max: float = 5.0,
        rho: float = 7.0,
        s_churn: float = 0.0,
        s_noise: float = 1.0,
        max_correction_gain: float | None = None,
        init_sigma_scale: bool = False,
        start_from_condition: bool = False,
        num_samples: int = 1,
        seed: int = 0,
        amp: bool = False,
        channels_last: bool = False,
        upsample_mode: str = "linear",
        sw_device: torch.device | str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if sampler not in VOLUME_SAMPLERS:
            raise ValueError(f"sampler must be one of {VOLUME_SAMPLERS}, got {sampler!r}")
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.scale_factor = tuple(int(f) for f in scale_factor)
        if len(self.scale_factor) != 3:
            raise ValueError(f"scale_factor needs one factor per spatial axis (3), got {scale_factor}")
        self.roi_size = roi_size if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
        self.sw_batch_size, self.overlap = int(sw_batch_size), overlap
        self.blend_mode, self.sigma_scale = blend_mode, sigma_scale
        self.sampler, self.num_steps = sampler, int(num_steps)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.s_churn, self.s_noise = float(s_churn), float(s_noise)
        self.max_correction_gain = optional(max_correction_gain, float)
        self.init_sigma_scale = as_flag(init_sigma_scale)
        self.start_from_condition = as_flag(start_from_condition)
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.amp, self.sw_device, self.progress = as_flag(amp), sw_device, as_flag(progress)
        self.channels_last = as_flag(channels_last)
        self.upsample = GridUpsample(self.scale_factor, upsample_mode)

    @property
    def num_evaluations(self) -> int:
        """Whole-volume denoiser evaluations per sample (NFE): N for Euler, 2N − 1 for Heun (fewer with
        ``max_correction_gain``)."""
        return count_evaluations(self.sigmas(), 1 if self.sampler == "euler" else 2, self.max_correction_gain,
                                 self.s_churn)

    def condition(self, lr: Tensor) -> Tensor:
        """The conditioning of LR volumes (B, 1, x, y, z) in [0, 1]: upsampled onto the HR grid, in [-1, 1]."""
        self.upsample.to(lr.device)
        return to_signed(self.upsample(lr.float()))

    def sigmas(self, device: torch.device | str | None = None) -> Tensor:
        """The sampler's noise levels ``σ_0 > … > σ_{N−1} > 0`` (Karras et al. 2022, eq. 5)."""
        return get_sigmas_karras(self.num_steps, self.sigma_min, self.sigma_max, self.rho, device=device)

    def windowed(self, network: Callable[..., Tensor]) -> WindowedDenoiser:
        """``network(x, sigma, cond) -> D`` evaluated over whole volumes on Gaussian-blended windows."""
        return WindowedDenoiser(
            network, self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode=self.blend_mode,
            sigma_scale=self.sigma_scale, autocast_bf16=self.amp, channels_last=self.channels_last,
            sw_device=self.sw_device,
        )

    def sample(
        self, cond: Tensor, network: Callable[..., Tensor], generator: torch.Generator | None = None,
        label: str = "SR",
    ) -> Tensor:
        """One sample for conditioning ``cond`` (B, 1, X, Y, Z) in [-1, 1]: the sampler's output in [-1, 1].

        Args:
            cond: upsampled LR volumes (see :meth:`condition`).
            network: the denoiser ``network(x, sigma, cond) -> D(x; σ)`` (e.g. :class:`common.diffusion.SRDenoiser`).
            generator: source of the initial noise (then of churn noise); the global RNG when None.
            label: prefix of the progress lines.
        """
        noise = make_noise(generator)
        x = noise(cond[:, :1])
        if self.start_from_condition:
            x = cond[:, :1] + x * self.sigma_max
        elif self.init_sigma_scale:
            x = x * self.sigma_max
        heun = {"max_correction_gain": self.max_correction_gain} if self.sampler == "heun" else {}
        return SAMPLERS[self.sampler](
            self.windowed(network), x, self.sigmas(cond.device), cond, noise=noise,
            callback=_StepProgress(self.progress, label), s_churn=self.s_churn, s_noise=self.s_noise, **heun,
        )

    @torch.no_grad()
    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
        """Super-resolve LR volumes (B, 1, x, y, z) in [0, 1] into (B, C, x·f0, y·f1, z·f2) in [0, 1].

        Args:
            inputs: LR volumes, channel-first, in [0, 1].
            network: the denoiser ``network(x, sigma, cond) -> D(x; σ)``.
            args: unused (MONAI's inferer signature).
            kwargs: unused.

        Returns:
            C = 1 (the sample) when ``num_samples`` is 1, else C = 2 (mean and standard deviation of the samples).
        """
        return sample_volumes(
            inputs, self.condition,
            lambda cond, generator, label, k: to_unit(self.sample(cond, network, generator, label)),
            self.num_samples, self.seed,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scale_factor={self.scale_factor}, roi_size={self.roi_size}, "
            f"overlap={self.overlap}, "
            f"sampler={self.sampler!r}, num_steps={self.num_steps}, num_samples={self.num_samples}, amp={self.amp})"
        )
