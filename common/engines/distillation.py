"""Distilling a few-step EDM sampler into fewer steps with MONAI's stock ``SupervisedTrainer`` (issue 18).

Luhman & Luhman 2021 ("Knowledge Distillation in Iterative Generative Models for Improved Sampling Speed") regress
a student's one-step output onto the teacher's deterministic sample from the same noise; Salimans & Ho 2022
("Progressive Distillation") halve the steps at a time. Here both samplers are a handful of Euler steps, so the
student's whole trajectory is unrolled with gradients: :class:`SamplerDistillationPrepareBatch` draws the initial
noise ``z``, runs the frozen teacher's sampler on ``(z, cond)`` without gradients and returns ``inputs`` = ``z``,
``targets`` = the teacher's sample and ``{"cond": cond}``; the trainer's network is :class:`UnrolledSampler` around
the student denoiser, so ``MSELoss`` on its output is the distillation loss and the student's weights (the
wrapped denoiser's) are what the checkpoints and the final weights hold. :func:`check_student_sampler` keeps a
bundle's student weights to the sampler they were trained for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from torch import Tensor, nn

from common.diffusion.samplers import SAMPLERS, get_sigmas_karras
from common.engines.checkpoints import load_state
from common.engines.edm import batch_pair
from common.utils import as_flag

__all__ = [
    "karras_grid", "frozen_denoiser", "check_student_sampler", "UnrolledSampler", "SamplerDistillationPrepareBatch"
]


def karras_grid(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """The sampler grid ``σ_0 > … > σ_{N−1} > σ_N = 0`` of :func:`common.diffusion.get_sigmas_karras` as floats."""
    return [float(s) for s in get_sigmas_karras(int(num_steps), float(sigma_min), float(sigma_max), float(rho))]


def frozen_denoiser(network: nn.Module, path: str, large_files: str | None = None) -> nn.Module:
    """``network`` filled from the weights file ``path``, in eval mode and without gradients: the teacher.

    Args:
        network: a fresh instance of the denoiser (in a config: ``"%network_def"``, a copy, not the student).
        path: the teacher's weights (checked as :func:`common.engines.load_state` checks them).
        large_files: the bundle's ``large_files.yml``, to check the file's hash when it lists it.
    """
    return load_state(network, path, large_files=large_files).eval().requires_grad_(False)


def check_student_sampler(student: bool | str, sampler: str, trained_for: str = "paper") -> None:
    """Refuse to run a student's weights with another sampler than the one they were trained for.

    A student is trained at its own sampler's noise levels only (the 2.5D bundle's at σ = 5), so any other sampler
    would run it where it never learned; the error names the option that loads the general weights instead.

    Args:
        student: the bundle's ``student`` option (a flag; ``"false"`` from the command line is False).
        sampler: the sampler asked for.
        trained_for: the student's sampler.
    """
    if as_flag(student) and sampler != trained_for:
        raise ValueError(f"the student weights (student true) are trained for the {trained_for!r} sampler only: "
                         f"add --student false to sample with {sampler!r} and the general weights")


class UnrolledSampler(nn.Module):
    """The student's sampler as a module: ``forward(z, cond)`` runs ``sampler(denoiser, z, sigmas, cond)`` with
    gradients through every denoiser evaluation (Luhman & Luhman 2021, the student's side).

    Args:
        denoiser: the student ``denoiser(x, sigma, cond) -> D(x; σ)`` (its parameters are the ones trained).
        sigmas: the student's grid, decreasing and ending with 0 (:func:`karras_grid`).
        sampler: "euler" or "heun" (:data:`common.diffusion.SAMPLERS`).
    """

    def __init__(self, denoiser: nn.Module, sigmas: Sequence[float], sampler: str = "euler") -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        grid = [float(s) for s in sigmas]
        if len(grid) < 2 or grid[-1] != 0.0 or any(a <= b for a, b in zip(grid[:-1], grid[1:])):
            raise ValueError(f"sigmas must decrease strictly and end with 0, got {grid}")
        self.denoiser, self.sigmas, self.sampler = denoiser, grid, sampler

    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return SAMPLERS[self.sampler](self.denoiser, z, self.sigmas, cond)


class SamplerDistillationPrepareBatch(PrepareBatch):
    """Batch -> (``z``, the teacher's sample from ``z``, (), {cond}) for the stock ``SupervisedTrainer``.

    ``z`` is standard normal noise shaped like the HR images, scaled by ``σ_0`` when ``init_sigma_scale`` (the
    inferers' convention: :class:`common.inferers.EDMVolumeInferer` starts from ``z``); the teacher runs its
    sampler on ``(z, cond)`` without gradients, under bf16 autocast when ``amp`` (as at inference).

    Args:
        teacher: the frozen teacher denoiser (:func:`frozen_denoiser`).
        sigmas: the teacher's grid, decreasing and ending with 0 (:func:`karras_grid`).
        sampler: the teacher's sampler, "euler" or "heun".
        image_key: key of the conditioning images (B, C_cond, *spatial), [0, 1].
        label_key: key of the HR images (B, 1, *spatial), [0, 1] (only their shape is used).
        init_sigma_scale: start from ``σ_0·z`` instead of ``z``.
        amp: run the teacher under bf16 autocast.
        signed: map the conditioning from [0, 1] to [-1, 1] (the denoisers' range).
        generator: random generator of ``z`` (the global one when None).
    """

    def __init__(
        self,
        teacher: nn.Module,
        sigmas: Sequence[float],
        sampler: str = "euler",
        image_key: str = "image",
        label_key: str = "label",
        init_sigma_scale: bool = False,
        amp: bool = False,
        signed: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.teacher = UnrolledSampler(teacher, sigmas, sampler)
        self.image_key, self.label_key, self.signed = image_key, label_key, signed
        self.init_sigma_scale, self.amp, self.generator = bool(init_sigma_scale), bool(amp), generator

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor, tuple, dict]:
        cond, hr = batch_pair(batchdata, self.image_key, self.label_key, self.signed, device, non_blocking, **kwargs)
        z = torch.randn(hr.shape, generator=self.generator, device=hr.device, dtype=hr.dtype)
        if self.init_sigma_scale:
            z = z * self.teacher.sigmas[0]
        self.teacher.to(hr.device)
        with torch.no_grad(), torch.autocast(hr.device.type, dtype=torch.bfloat16, enabled=self.amp):
            target = self.teacher(z, cond).float()
        return z, target, (), {"cond": cond}
