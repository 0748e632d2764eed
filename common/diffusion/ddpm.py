"""The seed DDPM's noise schedule on MONAI's schedulers: clipped cosine ᾱ, DDPM and DDIM steps (methods.md §2).

The conditional DDPM of the seed (ε-prediction, T = 1000) uses the cosine schedule of Nichol & Dhariwal 2021
("Improved Denoising Diffusion Probabilistic Models", eq. 17) with the betas clipped at 0.3 instead of 0.999:

    ᾱ(t) = f(t)/f(0),  f(t) = cos²((t/T + s)/(1 + s) · π/2),  s = 0.008,
    β_t = min(1 − ᾱ(t)/ᾱ(t − 1), 0.3),  ᾱ_t = ∏_{i ≤ t} (1 − β_i)  (t = 1 … T).

The clip only changes the last six betas (ᾱ_T ≈ 1.03e-5 instead of ≈ 0). MONAI's own ``"cosine"`` schedule is the
same formula clipped at 0.999 (ᾱ_T ≈ 2.4e-9); :func:`cosine_clipped_schedule` is registered in MONAI's
``NoiseSchedules`` store as ``"cosine_clipped"``, so any MONAI scheduler takes it by name once this module is imported
(``DDPMScheduler(1000, schedule="cosine_clipped")``). MONAI stores ``ᾱ`` as ``alphas_cumprod[i]`` for t = i + 1 and
uses ᾱ_0 = 1 before the first step.

Ancestral sampling is MONAI's :class:`~monai.networks.schedulers.DDPMScheduler` with the seed's posterior
(Ho et al. 2020, eqs. 6-7; ``variance_type="fixed_small"``, the variance β̃_t):

    μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) · x̂0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) · x_t,   β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t,

with x̂0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t. :func:`posterior_mean_variance` writes these out (MONAI's are private).
MONAI's DDPM step always steps to t − 1, so it must run all T steps.

DDIM (Song et al. 2021, eq. 12) is :class:`AlignedDDIMScheduler`, MONAI's DDIM step with one repair: MONAI 1.6
spaces the inference timesteps with ``linspace(T − 1, 0, N)`` (MONAI PR #8623) but its ``step`` still steps to
``t − T // N``, so for T = 1000 and N = 10 every step lands 11 timesteps away from the one the network is asked about
next (the stride is 111, the step 100), and the last step before t = 0 stops at ᾱ_11 (the same defect as
huggingface/diffusers#12633 for their "linspace" spacing). Here the previous timestep is the next one in
``timesteps`` (−1, i.e. ᾱ = 1, after the last), and the default spacing is "trailing" (Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", Table 2): N steps from t = T − 1 with stride T/N, the last
one from t = T/N − 1 straight to x̂0, so no evaluation is spent at t = 0 where ᾱ_0 ≈ 1. η = 1 gives the ancestral
sampler of the respaced chain (DDPM with fewer steps). ``start_timestep`` t0 < T − 1 spaces the N steps over
[0, t0] instead (stride (t0 + 1)/N): the grid of a trajectory that starts from a forward-diffused initial estimate
(Chung et al. 2022, "Come-Closer-Diffuse-Faster", CCDF; see :class:`common.inferers.DDPMSRInferer`).
"""

from __future__ import annotations

import math

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules
from monai.networks.schedulers.ddpm import DDPMPredictionType
from torch import Tensor

__all__ = [
    "SCHEDULE",
    "TIMESTEP_SPACINGS",
    "cosine_clipped_schedule",
    "posterior_mean_variance",
    "check_timestep",
    "AlignedDDIMScheduler",
    "ddpm_scheduler",
    "ddim_scheduler",
]

SCHEDULE = "cosine_clipped"
TIMESTEP_SPACINGS = ("trailing", "linspace")


@NoiseSchedules.add_def(SCHEDULE, "Cosine alpha-bar schedule (Nichol & Dhariwal 2021) with betas clipped at max_beta")
def cosine_clipped_schedule(
    num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.3
) -> tuple[Tensor, Tensor, Tensor]:
    """The seed's cosine schedule: ``(betas, alphas, alphas_cumprod)`` for t = 1 … T (float32, computed in float64).

    Args:
        num_train_timesteps: T.
        s: offset of the cosine (0.008: β_1 is about the size of a quantisation step of 8-bit images).
        max_beta: upper clip of β_t (0.3 in the seed; 0.999 gives MONAI's "cosine").
    """
    if int(num_train_timesteps) < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 0 < max_beta < 1:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta}")
    if s < 0:
        raise ValueError(f"s must be >= 0, got {s}")
    t = torch.arange(int(num_train_timesteps) + 1, dtype=torch.float64) / int(num_train_timesteps)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0.0, max_beta)
    # β is rounded with α = 1 − β so that 1 − α is exact in float32 (α ≥ 0.7): MONAI's steps compute 1 − ᾱ_t, and at
    # t = 1 (ᾱ_1 = α_1 ≈ 1 − 4e-5) a β rounded on its own would leave the last DDPM step a factor 1 − 5e-4 off x̂0
    alphas = (1 - betas).float()
    # ᾱ from the clipped betas (not the closed form): the process the scheduler's steps actually describe
    return 1 - alphas, alphas, torch.cumprod(alphas.double(), 0).float()


def check_timestep(name: str, timestep: int, num_train_timesteps: int) -> int:
    """``timestep`` as an int, refused with a ValueError naming ``name`` unless it is in [0, T − 1]."""
    if not 0 <= int(timestep) < int(num_train_timesteps):
        raise ValueError(f"{name} must be in [0, {int(num_train_timesteps) - 1}], got {timestep}")
    return int(timestep)


def _alpha_bar_prev(scheduler: DDPMScheduler | DDIMScheduler, timestep: int) -> Tensor:
    return scheduler.alphas_cumprod[timestep - 1] if timestep > 0 else torch.ones((), dtype=scheduler.betas.dtype)


def posterior_mean_variance(
    scheduler: DDPMScheduler | DDIMScheduler, x0: Tensor, x_t: Tensor, timestep: int
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t−1} | x_t, x0) on ``scheduler``'s schedule (Ho et al. 2020, eqs. 6-7).

    ``μ̃ = √ᾱ_{t−1} β_t/(1 − ᾱ_t) · x0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) · x_t`` and
    ``β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t`` (ᾱ_{−1} = 1: at timestep 0 the mean is x0 and the variance 0). The
    DDPM step with ``variance_type="fixed_small"`` draws ``μ̃(x̂0, x_t) + √β̃_t · z``.

    Args:
        scheduler: a MONAI scheduler (its ``betas``, ``alphas``, ``alphas_cumprod``).
        x0: clean image (or the prediction x̂0).
        x_t: noisy image at ``timestep``.
        timestep: MONAI's index of t (0 … T − 1).
    """
    t = int(timestep)
    beta, alpha, a_bar = scheduler.betas[t], scheduler.alphas[t], scheduler.alphas_cumprod[t]
    a_bar_prev = _alpha_bar_prev(scheduler, t)
    mean = (a_bar_prev.sqrt() * beta / (1 - a_bar)) * x0 + (alpha.sqrt() * (1 - a_bar_prev) / (1 - a_bar)) * x_t
    return mean, (1 - a_bar_prev) / (1 - a_bar) * beta


class AlignedDDIMScheduler(DDIMScheduler):
    """MONAI's :class:`~monai.networks.schedulers.DDIMScheduler` stepping to the *next listed* timestep.

    MONAI's ``step`` goes from t to ``t − T // N`` whatever ``timesteps`` holds; here it goes to the next entry of
    ``timesteps`` (ᾱ = 1 after the last), so the state after a step is at the noise level the network is asked about
    next. The update itself is MONAI's (eq. 12 of Song et al. 2021, x̂0 clipped when ``clip_sample``, σ_t(η) of eq. 16);
    where MONAI's stride matches the list (T divisible by N with "trailing" spacing) the two give the same result.

    Args:
        num_train_timesteps: T.
        schedule: name of a MONAI ``NoiseSchedules`` entry (default the seed's clipped cosine).
        timestep_spacing: "trailing" (N steps from T − 1 with stride T/N, the last to x̂0 directly) or "linspace"
            (MONAI's ``round(linspace(T − 1, 0, N))``, which spends its last evaluation at t = 0).
        start_timestep: first timestep t0 of the "trailing" grid (N steps with stride (t0 + 1)/N); None: T − 1.
        kwargs: MONAI's DDIM arguments (``clip_sample``, ``set_alpha_to_one``, ``steps_offset`` for "linspace",
            ``prediction_type``, ``clip_sample_min/max``) and the schedule's (``s``, ``max_beta``).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = SCHEDULE,
        timestep_spacing: str = "trailing",
        start_timestep: int | None = None,
        **kwargs,
    ) -> None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        if start_timestep is not None:
            if timestep_spacing != "trailing":
                raise ValueError("start_timestep needs timestep_spacing='trailing'")
            check_timestep("start_timestep", start_timestep, num_train_timesteps)
        # read by set_timesteps, which MONAI's __init__ calls with N = T (every timestep)
        self.timestep_spacing, self.start_timestep = timestep_spacing, None
        super().__init__(num_train_timesteps, schedule, **kwargs)
        if start_timestep is not None:  # as MONAI's __init__: every timestep, here those up to t0
            self.start_timestep = int(start_timestep)
            self.set_timesteps(self.start_timestep + 1)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set the N inference timesteps (descending, unique).

        Args:
            num_inference_steps: N, 1 … T.
            device: device of ``timesteps``.
        """
        if self.timestep_spacing == "linspace":
            super().set_timesteps(num_inference_steps, device)
            return
        n = int(num_inference_steps)
        span = self.num_train_timesteps if self.start_timestep is None else self.start_timestep + 1
        if not 1 <= n <= span:
            raise ValueError(f"num_inference_steps must be in [1, {span}], got {num_inference_steps}")
        self.num_inference_steps = n
        # stride span/N >= 1, so the rounded values are unique; the first is span − 1 (T − 1 or t0)
        steps = (torch.arange(n, 0, -1, dtype=torch.float64) * span / n).round().long() - 1
        self.timesteps = steps.to(device)

    def previous_timestep(self, timestep: int | Tensor) -> int:
        """The timestep after ``timestep`` in ``timesteps`` (−1 after the last: ᾱ = 1, the clean image).

        Args:
            timestep: one of ``timesteps``.
        """
        hits = (self.timesteps.cpu() == int(timestep)).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"timestep {int(timestep)} is not among the scheduler's timesteps")
        i = int(hits[0, 0]) + 1
        return int(self.timesteps[i]) if i < len(self.timesteps) else -1

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One DDIM step from ``timestep`` to :meth:`previous_timestep`: ``(x_prev, x̂0)``.

        Args:
            model_output: the network's output (ε, x0 or v, per ``prediction_type``).
            timestep: current timestep (one of ``timesteps``).
            sample: current state x_t.
            eta: η of DDIM (0: deterministic; 1: ancestral sampling of the respaced chain).
            generator: source of the noise when η > 0.
        """
        t, prev = int(timestep), self.previous_timestep(timestep)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        if self.prediction_type == DDPMPredictionType.EPSILON:
            x0, eps = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt(), model_output
        elif self.prediction_type == DDPMPredictionType.SAMPLE:
            x0 = model_output
            eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        else:  # v-prediction
            x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
            eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * sample
        if self.clip_sample:
            x0 = x0.clamp(*self.clip_sample_values)
        std = eta * self._get_variance(t, prev).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
        if eta > 0:
            noise = torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator,
                                device=model_output.device)
            x_prev = x_prev + std * noise
        return x_prev, x0


def ddpm_scheduler(
    num_train_timesteps: int = 1000,
    schedule: str = SCHEDULE,
    variance_type: str = "fixed_small",
    clip_sample: bool = True,
    prediction_type: str = "epsilon",
    start_timestep: int | None = None,
    **schedule_args,
) -> DDPMScheduler:
    """MONAI's DDPM scheduler on the seed's schedule: the training noiser (``add_noise``) and the ancestral sampler.

    Args:
        num_train_timesteps: T (1000 in the seed).
        schedule: ``NoiseSchedules`` entry (the seed's clipped cosine by default).
        variance_type: "fixed_small" (β̃_t, the seed's posterior variance) or "fixed_large" (β_t).
        clip_sample: clip x̂0 to [-1, 1] in each step (images live in [-1, 1]).
        prediction_type: "epsilon" (the seed's), "sample" or "v_prediction".
        start_timestep: keep only the timesteps t0 … 0 (a trajectory started at t0; None: all T).
        schedule_args: the schedule's arguments (``s``, ``max_beta``).
    """
    scheduler = DDPMScheduler(num_train_timesteps, schedule, variance_type=variance_type, clip_sample=clip_sample,
                              prediction_type=prediction_type, **schedule_args)
    if start_timestep is not None:
        check_timestep("start_timestep", start_timestep, num_train_timesteps)
        scheduler.timesteps = scheduler.timesteps[scheduler.timesteps <= int(start_timestep)]
    return scheduler


def ddim_scheduler(
    num_train_timesteps: int = 1000,
    num_inference_steps: int = 50,
    schedule: str = SCHEDULE,
    timestep_spacing: str = "trailing",
    clip_sample: bool = True,
    prediction_type: str = "epsilon",
    start_timestep: int | None = None,
    **schedule_args,
) -> AlignedDDIMScheduler:
    """:class:`AlignedDDIMScheduler` on the seed's schedule with ``num_inference_steps`` set.

    Args:
        num_train_timesteps: T of the trained model.
        num_inference_steps: N (network evaluations per sample).
        schedule: ``NoiseSchedules`` entry.
        timestep_spacing: "trailing" or "linspace" (see :class:`AlignedDDIMScheduler`).
        clip_sample: clip x̂0 to [-1, 1] in each step.
        prediction_type: "epsilon", "sample" or "v_prediction".
        start_timestep: first timestep t0 of the grid ("trailing" only; None: T − 1).
        schedule_args: the schedule's arguments (``s``, ``max_beta``).
    """
    scheduler = AlignedDDIMScheduler(num_train_timesteps, schedule, timestep_spacing, start_timestep,
                                     clip_sample=clip_sample, prediction_type=prediction_type, **schedule_args)
    scheduler.set_timesteps(int(num_inference_steps))
    return scheduler
