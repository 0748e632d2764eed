"""Unsupervised score-based super-resolution of volumes, slice by slice (SRMRI, methods.md §3), as a MONAI Inferer.

:class:`ScoreSRInferer` takes LR volumes (B, 1, X, y, z) in [0, 1] (RAS, percentile-scaled) and, for each batch of
sagittal slices (axis 0), samples the HR slice from ``N(0, σ_max²)`` with the score model, guided by the measured
LR slice ``y`` through a forward operator ``A`` chosen here, at inference (the model never saw LR images):

- ``operator``: "bicubic" (default), "box" (= the 2x2 block average of methods.md §0), "bilinear", "lanczos" (the
  antialiased kernels of :class:`common.diffusion.Downsample`, any integer factor per in-plane axis), or "learned"
  (:class:`common.diffusion.LearnedOperator`, weights fitted on registered pairs by :func:`fit_operator`);
- ``sampler``: "pc" = SRMRI's Algorithm 1 (:func:`common.diffusion.guidance.sample_srmri`: Langevin corrector then
  reverse-diffusion predictor, DPS after each, wavelet fusion at the skipped levels, N = 2000 VE levels, skip k);
  "heun" = the fast path (:func:`common.diffusion.guidance.sample_heun_dps`: EDM Heun on ``D = x + σ²s`` with a
  DPS update and wavelet fusion per step, on a Karras grid of ``num_steps``).

The result is clamped to [0, 1]. Slices whose LR maximum is below ``empty_threshold`` (air) are not sampled: they
get the grid-aligned cubic upsampling of ``y``; in the others only the bounding box of the head (plus a margin) is
sampled, the air around it gets the same upsampling. One ``torch.Generator`` seeded with ``seed`` feeds all noise in a
fixed order (sample, slice batch, sampler), so a run is reproducible. ``num_samples`` K > 1 returns the mean and
the standard deviation over K samples (:func:`common.inferers.sample_mean_std`); :class:`SplitMeanStdd` splits
them into ``pred`` and ``pred_std``. ``last_stats`` holds network calls per slice and seconds of the last call,
which :class:`SamplerStatsHandler` writes beside the evaluation tables.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import Tensor, nn

from common.data.io import atomic_path
from common.diffusion.guidance import sample_heun_dps, sample_srmri, upsample_measurement
from common.diffusion.operators import DOWNSAMPLE_KERNELS, Downsample, LearnedOperator, fit_learned_operator
from common.diffusion.samplers import get_sigmas_karras, make_noise, num_evaluations
from common.diffusion.vesde import get_sigmas_vesde
from common.inferers.utils import SliceProgress, autocast_context, sample_mean_std
from common.transforms.pipelines import inference_preprocessing
from common.utils import as_flag, is_unset, optional

__all__ = [
    "OPERATORS",
    "SCORE_SAMPLERS",
    "SAMPLER_DEFAULTS",
    "make_operator",
    "fit_operator",
    "ScoreSRInferer",
    "SamplerStatsHandler",
]

logger = logging.getLogger("common")


OPERATORS = DOWNSAMPLE_KERNELS + ("learned",)


SCORE_SAMPLERS = ("pc", "heun")


ZETA_REFERENCE_SIDE = 256  # "image" ζ scaling: ζ is given for a 256 x 256 HR slice ...


ZETA_REFERENCE_VOXELS = 4  # ... at x2 in-plane (one LR voxel averages 4 HR voxels)


# defaults per sampler: the paper's PC sampler, and the fast path (ζ acts once per step there, see sample_heun_dps)
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "pc": {"num_steps": 2000, "zeta": 0.28, "fusion": True, "zeta_scaling": "none"},
    "heun": {"num_steps": 16, "zeta": 16.0, "fusion": True, "zeta_scaling": "image"},
}


def make_operator(
    kind: str, factors: Sequence[int], weights: str | Path | None = None, kernel: str = "bicubic"
) -> nn.Module:
    """The forward operator ``A`` of one slice: (B, 1, H, W) -> (B, 1, H/f1, W/f2).

    Args:
        kind: one of :data:`OPERATORS`.
        factors: in-plane reduction factors (f1, f2).
        weights: state dict of a fitted :class:`LearnedOperator` (required for "learned").
        kernel: the fixed downsampler after the learned CNN.
    """
    factors = tuple(int(f) for f in factors)
    if kind in DOWNSAMPLE_KERNELS:
        return Downsample(factors, kind)
    if kind != "learned":
        raise ValueError(f"operator must be one of {OPERATORS}, got {kind!r}")
    if is_unset(weights) or not Path(weights).is_file():
        raise ValueError(f"the learned operator needs its fitted weights (operator_weights), got {weights!r}")
    op = LearnedOperator(factors, kernel)
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    op.load_state_dict(state.get("state_dict", state))
    return op.eval().requires_grad_(False)


def _slices(volume: Tensor) -> Tensor:
    """(1, X, Y, Z) or (X, Y, Z) -> (X, 1, Y, Z) sagittal slices."""
    return (volume[0] if volume.ndim == 4 else volume)[:, None].float()


def fit_operator(
    pairs: Sequence[dict],
    factors: Sequence[int],
    out_path: str | Path,
    kernel: str = "bicubic",
    steps: int = 2000,
    batch_size: int = 16,
    seed: int = 0,
) -> list[float]:
    """Fit SRMRI's learned operator on registered LR/HR volume pairs and save its weights (atomically).

    Each pair ``{"image": LR path, "label": HR path}`` is loaded in RAS; both are scaled by the LR's percentiles (as
    inference does); the HR is cropped to the LR grid; all non-empty sagittal slices become training pairs.

    Args:
        pairs: registered pairs, the LR on the HR grid divided by ``(1, *factors)``.
        factors: in-plane factors.
        out_path: where the state dict goes (give it to the inferer as ``operator_weights``).
        kernel: fixed downsampler after the CNN.
        steps: optimisation steps.
        batch_size: slices per step.
        seed: seed of the minibatches.
    """
    f = (1, *[int(v) for v in factors])
    load = inference_preprocessing(f)
    hr_all, lr_all = [], []
    for pair in pairs:
        d = load(dict(pair))
        lo, hi = float(d["image"].meta["norm_lo"]), float(d["image"].meta["norm_hi"])
        lr = _slices(torch.as_tensor(d["image"]))
        hr = ((_slices(torch.as_tensor(d["label"])) - lo) / (hi - lo)).clamp(0, 1)
        hr = hr[: lr.shape[0], :, : lr.shape[2] * f[1], : lr.shape[3] * f[2]]
        keep = lr.flatten(1).amax(1) > 0.05
        hr_all.append(hr[keep])
        lr_all.append(lr[keep])
    op = LearnedOperator(f[1:], kernel)
    gen = torch.Generator().manual_seed(seed)
    losses = fit_learned_operator(
        op, torch.cat(hr_all), torch.cat(lr_all), steps=steps, batch_size=batch_size, generator=gen
    )
    with atomic_path(Path(out_path)) as tmp:
        torch.save(op.state_dict(), tmp)
    return losses


class ScoreSRInferer(Inferer):
    """SRMRI super-resolution of LR volumes with a VE score model, per sagittal slice (see the module docstring).

    Args:
        scale_factor: HR/LR factor per RAS axis; the first (slicing) axis must be 1.
        operator: forward operator ``A`` (:data:`OPERATORS`).
        operator_weights: fitted weights for ``operator="learned"``.
        sampler: "heun" (fast path, default) or "pc" (SRMRI's Algorithm 1).
        num_steps: Karras steps ("heun"), VE levels N ("pc"); default from :data:`SAMPLER_DEFAULTS`.
        sigma_min: smallest noise level (0.01).
        sigma_max: largest level, the one the model was trained with (the start is ``σ_max·z``).
        sigma_start: None starts from pure noise ``σ_max·z`` (SRMRI); a level ``σ_s < σ_max`` starts from the
            upsampled measurement diffused to it, ``y_up + σ_s·z``, and samples from there (Chung et al. 2022,
            "Come-Closer-Diffuse-Faster": the LR image already fixes the coarse content, so fewer steps suffice).
        rho: Karras grid exponent ("heun").
        zeta: DPS step size ζ; default per sampler (0.28 for "pc", the paper's; 16 per 256 x 256 slice for "heun").
        zeta_scaling: "none" (ζ as given, the paper's convention) or "image" (ζ·sqrt(H·W)/256·sqrt(f_A·f_S)/2 for
            an H x W HR slice and in-plane factors f_A, f_S). The plain-norm DPS step ``ζ·∇‖y − A(x̂0)‖`` moves a
            slice by about ``ζ/sqrt(f_A·f_S)`` in L2 norm (A averages f_A·f_S voxels) whatever its size, so the
            per-voxel step shrinks as 1/sqrt(H·W) and with the factor; "image" keeps it the same for every slice
            size and factor, as given for a 256 x 256 slice at x2 (measured at x4 on dev03: ζ 32 = the scaled 16
            beat 16 and 64). Default per sampler ("none" for "pc", "image" for "heun").
        skip: SRMRI skip step k ("pc"; 1 = pure DPS).
        snr: Langevin corrector signal-to-noise ratio ("pc").
        fusion: wavelet fusion ("pc": at skipped levels; "heun": after every step); default per sampler.
        fusion_levels: DWT levels of the fusion (2).
        wavelet: fusion wavelet ("bior4.4").
        order: 2 (Heun) or 1 (Euler) for "heun".
        guidance_interval: "heun": the DPS update at every k-th step only, the last step always guided
            (:func:`common.diffusion.guidance.sample_heun_dps`); 1 guides every step.
        s_churn: EDM ``S_churn`` for "heun" (0: deterministic given the start).
        max_correction_gain: "heun" with ``order`` 2: correct only the steps whose gain on the denoiser's error
            ``|Δσ|/(2σ_{i+1})`` is at most this, Euler steps elsewhere (see
            :func:`common.diffusion.samplers.takes_heun_correction`; 1 is the recommended value for few steps);
            None: every step but the last (EDM Algorithm 2).
        slice_batch: slices sampled together (2 is the fastest per slice on CPU: larger batches leave the caches).
        num_samples: K; K > 1 returns (mean, std) channels.
        seed: seed of the generator.
        amp: bf16 autocast for the network (CPU or GPU).
        empty_threshold: slices whose LR maximum is below it are upsampled, not sampled (0 samples every slice).
        crop_margin: sample only the in-plane bounding box of the LR voxels >= ``empty_threshold`` of each slice
            batch, grown by this many LR voxels (the air around it gets the upsampled ``y``, ~0); None samples the
            whole plane.
        progress: progress lines on stderr.
        progress_interval: seconds between sampler-step lines.
        num_threads: CPU threads for the call (restored after); None or 0 keeps torch's setting. The network is
            small and the sampler runs many small operations: on a core shared with another job, 2 threads wait
            on each other (18-27x slower per slice than 1 thread, measured), so the CPU configuration uses 1.
    """

    def __init__(
        self,
        scale_factor: Sequence[int] = (1, 2, 2),
        operator: str = "bicubic",
        operator_weights: str | None = None,
        sampler: str = "heun",
        num_steps: int | None = None,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        sigma_start: float | None = None,
        rho: float = 7.0,
        zeta: float | None = None,
        zeta_scaling: str | None = None,
        skip: int = 2,
        snr: float = 0.16,
        fusion: bool | None = None,
        fusion_levels: int = 2,
        wavelet: str = "bior4.4",
        order: int = 2,
        guidance_interval: int = 1,
        s_churn: float = 0.0,
        max_correction_gain: float | None = None,
        slice_batch: int = 2,
        num_samples: int = 1,
        seed: int = 0,
        amp: bool = False,
        empty_threshold: float = 0.02,
        crop_margin: int | None = 4,
        progress: bool = True,
        progress_interval: float = 10.0,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        if sampler not in SCORE_SAMPLERS:
            raise ValueError(f"sampler must be one of {SCORE_SAMPLERS}, got {sampler!r}")
        self.scale_factor = tuple(int(f) for f in scale_factor)
        if len(self.scale_factor) != 3 or self.scale_factor[0] != 1 or min(self.scale_factor) < 1:
            raise ValueError(f"slice-wise SR needs scale_factor (1, f_A, f_S) with integer factors, got {scale_factor}")
        defaults = SAMPLER_DEFAULTS[sampler]
        self.sampler = sampler
        self.num_steps = int(defaults["num_steps"] if num_steps is None else num_steps)
        self.zeta = float(defaults["zeta"] if zeta is None else zeta)
        self.fusion = as_flag(defaults["fusion"] if fusion is None else fusion)
        self.zeta_scaling = str(defaults["zeta_scaling"] if zeta_scaling is None else zeta_scaling)
        if self.zeta_scaling not in ("none", "image"):
            raise ValueError(f"zeta_scaling must be 'none' or 'image', got {zeta_scaling!r}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.sigma_start = optional(sigma_start, lambda s: min(float(s), self.sigma_max))
        self.skip, self.snr, self.order, self.s_churn = int(skip), float(snr), int(order), float(s_churn)
        self.guidance_interval = int(guidance_interval)
        if self.guidance_interval < 1:
            raise ValueError(f"guidance_interval must be >= 1, got {guidance_interval}")
        self.max_correction_gain = optional(max_correction_gain, float)
        self.fusion_levels, self.wavelet = int(fusion_levels), str(wavelet)
        self.slice_batch, self.num_samples, self.seed = int(slice_batch), int(num_samples), int(seed)
        self.amp, self.empty_threshold = as_flag(amp), float(empty_threshold)
        self.crop_margin = optional(crop_margin, int)
        self.progress, self.progress_interval = as_flag(progress), float(progress_interval)
        threads = optional(num_threads, int)
        self.num_threads = threads if threads and threads > 0 else None  # 0 keeps torch's setting
        self.operator = make_operator(operator, self.scale_factor[1:], operator_weights)
        self.operator_name = operator
        self.last_stats: dict[str, Any] = {}

    def sigmas(self, device: torch.device | str | None = None) -> Tensor:
        """The noise grid of the chosen sampler (decreasing, ending with 0)."""
        top = self.sigma_max if self.sigma_start is None else self.sigma_start
        if self.sampler == "pc":
            return get_sigmas_vesde(self.num_steps, self.sigma_min, top, device=device)
        return get_sigmas_karras(self.num_steps, self.sigma_min, top, self.rho, device=device)

    def config(self) -> dict[str, Any]:
        """The settings that define a run (for the tables)."""
        return {
            "sampler": self.sampler, "num_steps": self.num_steps, "zeta": self.zeta, "zeta_scaling": self.zeta_scaling,
            "fusion": self.fusion,
            "skip": self.skip if self.sampler == "pc" else None, "operator": self.operator_name,
            "scale_factor": list(self.scale_factor), "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
            "sigma_start": self.sigma_start,
            "max_correction_gain": self.max_correction_gain if self.sampler == "heun" else None,
            "guidance_interval": self.guidance_interval if self.sampler == "heun" else None,
            "num_samples": self.num_samples, "seed": self.seed, "amp": self.amp,
        }

    def step_size(self, hr_plane: Sequence[int]) -> float:
        """The DPS step ζ used on HR slices of shape ``hr_plane`` (see ``zeta_scaling``)."""
        if self.zeta_scaling == "image":
            voxels_per_lr = self.scale_factor[1] * self.scale_factor[2]
            return (self.zeta * math.sqrt(hr_plane[0] * hr_plane[1]) / ZETA_REFERENCE_SIDE
                    * math.sqrt(voxels_per_lr / ZETA_REFERENCE_VOXELS))
        return self.zeta

    def sample_slices(self, score_fn: Callable, y: Tensor, noise: Callable, callback: Callable | None = None,
                      stats: dict | None = None) -> Tensor:
        """Sample HR slices (B, 1, H, W) for LR slices ``y`` (B, 1, h, w) in [0, 1]; not clamped."""
        hr_shape = (y.shape[0], 1, y.shape[2] * self.scale_factor[1], y.shape[3] * self.scale_factor[2])
        z = noise(y.new_empty(hr_shape))
        y_up = upsample_measurement(y, z) if self.fusion or self.sigma_start is not None else None
        x = z * self.sigma_max if self.sigma_start is None else y_up + z * self.sigma_start
        common = dict(zeta=self.step_size(hr_shape[2:]), fusion=self.fusion, y_up=y_up, wavelet=self.wavelet,
                      levels=self.fusion_levels, noise=noise, callback=callback, stats=stats)
        sigmas = self.sigmas(y.device)
        if self.sampler == "pc":
            return sample_srmri(score_fn, x, sigmas, y, self.operator, skip=self.skip, snr=self.snr, **common)
        return sample_heun_dps(score_fn, x, sigmas, y, self.operator, order=self.order, s_churn=self.s_churn,
                               max_correction_gain=self.max_correction_gain,
                               guidance_interval=self.guidance_interval, **common)

    def content_box(self, y: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """In-plane LR bounding box ``((r0, r1), (c0, c1))`` of the voxels >= ``empty_threshold`` of a slice batch
        (B, 1, h, w), grown by ``crop_margin`` voxels; the whole plane when ``crop_margin`` is None."""
        h, w = y.shape[-2:]
        if self.crop_margin is None:
            return (0, h), (0, w)
        mask = (y >= self.empty_threshold).flatten(0, 1).any(0)
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        if len(rows) == 0:
            return (0, h), (0, w)
        m = self.crop_margin
        return ((max(int(rows[0]) - m, 0), min(int(rows[-1]) + 1 + m, h)),
                (max(int(cols[0]) - m, 0), min(int(cols[-1]) + 1 + m, w)))

    def _volume(self, lr: Tensor, network: Callable, generator: torch.Generator, k: int, label: str) -> Tensor:
        """One SR sample of one LR volume (X, y, z) in [0, 1] -> (X, Y, Z) in [0, 1]."""
        y_all = _slices(lr)
        noise = make_noise(generator)

        def score_fn(x: Tensor, sigma: Tensor) -> Tensor:
            with autocast_context(x.device, self.amp):
                out = network(x, sigma)
            return out.float()

        n = y_all.shape[0]
        full = upsample_measurement(y_all, y_all.new_empty(
            (n, 1, y_all.shape[2] * self.scale_factor[1], y_all.shape[3] * self.scale_factor[2])))
        out = full[:, 0].clamp(0, 1).clone()
        todo = torch.nonzero(y_all.flatten(1).amax(1) >= self.empty_threshold).flatten().tolist()
        progress = SliceProgress(len(todo), self.progress, label if self.num_samples == 1 else f"{label} sample {k + 1}",
                                 self.progress_interval)

        def callback(i: int, n_steps: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
            progress.step(i, n_steps, sigma)

        f1, f2 = self.scale_factor[1:]
        for start in range(0, len(todo), self.slice_batch):
            idx = todo[start : start + self.slice_batch]
            stats: dict = {}
            (r0, r1), (c0, c1) = self.content_box(y_all[idx])
            hr = self.sample_slices(score_fn, y_all[idx][..., r0:r1, c0:c1], noise, callback, stats)
            out[idx, r0 * f1 : r1 * f1, c0 * f2 : c1 * f2] = hr[:, 0].clamp(0, 1)
            progress.batch(len(idx))
            self.last_stats["nfe_per_slice_counted"] = stats.get("nfe", 0)  # every slice of a batch shares the calls
        self.last_stats["sampled_slices"] = self.last_stats.get("sampled_slices", 0) + len(todo)
        self.last_stats["slices"] = self.last_stats.get("slices", 0) + n
        return out

    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
        """Super-resolve (B, 1, X, y, z) LR volumes in [0, 1] into (B, C, X, Y, Z) in [0, 1].

        Args:
            inputs: LR volumes, channel-first, in [0, 1].
            network: the score model ``network(x, sigma) -> s_θ`` (e.g. :class:`common.networks.ScoreNet`).
            args: unused (MONAI's inferer signature).
            kwargs: unused.

        Returns:
            C = 1 (the sample) for ``num_samples`` 1, else C = 2 (mean and standard deviation over the samples).
        """
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected LR volumes (B, 1, X, y, z), got shape {tuple(x.shape)}")
        self.operator.to(x.device)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        self.last_stats = {}
        threads = torch.get_num_threads()
        if self.num_threads is not None and x.device.type == "cpu":
            torch.set_num_threads(self.num_threads)
        t0 = time.perf_counter()
        outputs = []
        try:
            for b in range(x.shape[0]):
                label = f"volume {b + 1}/{x.shape[0]}" if x.shape[0] > 1 else "SR"
                outputs.append(sample_mean_std(
                    lambda k, b=b: self._volume(x[b, 0], network, generator, k, label)[None, None], self.num_samples))
        finally:
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - t0
        sampled = max(self.last_stats.get("sampled_slices", 0), 1)
        self.last_stats.update(seconds=seconds, volumes=int(x.shape[0]), seconds_per_sampled_slice=seconds / sampled,
                               nfe_per_slice=self.nfe_per_slice())
        return torch.cat(outputs, dim=0)

    def nfe_per_slice(self) -> int:
        """Network calls per sampled slice (a DPS evaluation counts once; its backward pass is extra work)."""
        if self.sampler == "pc":
            return 2 * len(range(0, self.num_steps, self.skip))
        return num_evaluations(self.sigmas(), self.order, self.max_correction_gain, self.s_churn)


class SamplerStatsHandler:
    """Write the inferer's settings and cost (network calls per slice, seconds) as ``sampler_stats.json``.

    For the NFE-vs-PSNR and k-ablation tables: each evaluate run leaves its metric tables and this file.

    Args:
        inferer: the :class:`ScoreSRInferer` of the evaluator.
        output_dir: destination folder.
    """

    def __init__(self, inferer: ScoreSRInferer, output_dir: str) -> None:
        self.inferer, self.output_dir = inferer, Path(output_dir)
        self.runs: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.runs.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: self.runs.append(dict(self.inferer.last_stats)))
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        sampled = sum(r.get("sampled_slices", 0) for r in self.runs)
        seconds = sum(r.get("seconds", 0.0) for r in self.runs)
        summary = {
            **self.inferer.config(),
            "nfe_per_slice": self.inferer.nfe_per_slice(),
            "volumes": len(self.runs),
            "sampled_slices": sampled,
            "seconds": seconds,
            "seconds_per_sampled_slice": seconds / max(sampled, 1),
            "per_volume": self.runs,
        }
        with atomic_path(self.output_dir / "sampler_stats.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        logger.info("sampler: %s, %d network calls per slice, %.2f s per sampled slice",
                    self.inferer.sampler, summary["nfe_per_slice"], summary["seconds_per_sampled_slice"])
