"""Variance-exploding SDE (Song et al. 2021, "Score-Based Generative Modeling through SDEs"): schedule, loss, PC.

The forward process adds Gaussian noise of std ``σ(t) = σ_min (σ_max/σ_min)^t``, ``t ∈ [0, 1]`` (eq. 31). A score
model ``score_fn(x, sigma) -> s_θ(x, σ) ≈ ∇_x log p_σ(x)`` takes ``sigma`` as a (B,) tensor, as the EDM denoisers do.

Grids follow the convention of :mod:`common.diffusion.samplers`: decreasing, ``σ_0 = σ_max > ... > σ_{N−1} = σ_min``,
then ``σ_N = 0``. Step ``i`` moves from ``σ_i`` to ``σ_{i+1}``; methods.md writes the same update with increasing
indices (``σ_i² − σ_{i−1}²``). The last step, ``σ_min -> 0``, is the one Song et al.'s code takes with an adjacent
level of 0; like their ``denoise=True`` it adds no noise, so the sample ends on the Tweedie mean at ``σ_min``.

Noise comes from ``noise(like)`` (:func:`common.diffusion.samplers.make_noise`), so a seeded generator reproduces a
sample. Norms in the corrector are per sample (Song et al. average them over the batch; per sample keeps every image
independent of its batch-mates and is the same for one image at a time, as SRMRI samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .samplers import Callback, Denoiser, NoiseFn, make_noise

__all__ = [
    "ScoreFn",
    "vesde_sigma",
    "get_sigmas_vesde",
    "sample_sigma_vesde",
    "sigma_max_rule",
    "dsm_loss",
    "tweedie",
    "score_to_denoiser",
    "predictor_step",
    "corrector_step",
    "sample_pc",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _bcast(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _sigma_batch(sigma: float | Tensor, x: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1)
    return s.expand(x.shape[0]) if s.numel() == 1 else s


def vesde_sigma(t: Tensor | float, sigma_min: float = 0.01, sigma_max: float = 378.0) -> Tensor:
    """Song et al. 2021, eq. 31: ``σ(t) = σ_min (σ_max/σ_min)^t``.

    Args:
        t: diffusion time(s) in [0, 1].
        sigma_min: σ(0) (0.01 in SRMRI).
        sigma_max: σ(1) (378 for SRMRI's 720×512 images; see :func:`sigma_max_rule`).
    """
    t = torch.as_tensor(t, dtype=torch.float64 if not isinstance(t, Tensor) else t.dtype)
    return sigma_min * (sigma_max / sigma_min) ** t


def get_sigmas_vesde(
    n: int,
    sigma_min: float = 0.01,
    sigma_max: float = 378.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The N discrete VE levels of Song et al. 2021 (geometric, σ_max down to σ_min), then 0: ``n + 1`` values.

    Args:
        n: number of noise levels (2000 in SRMRI); ``n = 1`` gives ``[σ_max, 0]``.
        sigma_min: last non-zero level.
        sigma_max: first level.
        device: device of the grid.
        dtype: dtype of the grid.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t = torch.linspace(1.0, 0.0, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    sigmas = vesde_sigma(t, sigma_min, sigma_max)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)


def sample_sigma_vesde(
    batch: int,
    sigma_min: float = 0.01,
    sigma_max: float = 378.0,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training levels ``σ(t)``, ``t ~ U(eps, 1)`` (Song et al. 2021, continuous training): log-uniform σ, (B,).

    Args:
        batch: number of levels.
        sigma_min: σ(0).
        sigma_max: σ(1).
        eps: smallest t (Song et al.'s 1e-5).
        generator: random generator (on ``device``).
        device: device of the result.
    """
    t = eps + (1 - eps) * torch.rand(batch, generator=generator, device=device)
    return vesde_sigma(t, sigma_min, sigma_max)


@torch.no_grad()
def sigma_max_rule(images: Tensor, max_images: int | None = 1000, generator: torch.Generator | None = None) -> float:
    """Song & Ermon 2020, technique 1: σ_max = the largest Euclidean distance between two training images.

    A reverse process that starts at ``N(0, σ_max²)`` can then reach any training image from any other. The
    distance is taken over a sample of ``max_images`` images (all when None): a lower bound of the full data set's
    value that is close in practice. SRMRI's 378 for 720×512 images in [0, 1] is this rule; the value scales with
    the square root of the voxel count, so it must be recomputed for another image size.

    Args:
        images: (N, ...) training images, scaled as the model sees them.
        max_images: size of the random subset used (pairwise distances cost N²).
        generator: random generator choosing the subset.
    """
    flat = images.reshape(images.shape[0], -1)
    flat = flat if flat.is_floating_point() else flat.float()
    if flat.shape[0] < 2:
        raise ValueError("need at least two images")
    if max_images is not None and flat.shape[0] > max_images:
        flat = flat[torch.randperm(flat.shape[0], generator=generator)[:max_images].to(flat.device)]
    # rows in chunks: the full N×N distance matrix is small, but cdist's intermediates for 1000 images are not
    return max(float(torch.cdist(flat[i : i + 64], flat).max()) for i in range(0, flat.shape[0], 64))


def dsm_loss(
    score_fn: ScoreFn,
    x0: Tensor,
    sigma: Tensor,
    *,
    noise: NoiseFn | None = None,
    reduce_mean: bool = False,
) -> Tensor:
    """Denoising score matching, Song et al. 2021 eq. 7 with λ(σ) = σ²: ``E‖σ·s_θ(x0 + σz, σ) + z‖²``.

    With the true score of data ``N(μ, s²)`` the expected per-voxel value is ``s²/(s² + σ²)`` (its minimum).

    Args:
        score_fn: ``score_fn(x, sigma) -> s_θ(x, σ)``, ``sigma`` a (B,) tensor.
        x0: clean images (B, ...).
        sigma: noise level per image, (B,) (see :func:`sample_sigma_vesde`) or a scalar.
        noise: ``noise(like)`` standard normal source (see :func:`make_noise`); None: global RNG.
        reduce_mean: average over voxels (True) or sum (False, Song et al.'s default), then mean over the batch.
    """
    noise = make_noise() if noise is None else noise
    sigma = _sigma_batch(sigma, x0)
    z = noise(x0)
    s = _bcast(sigma, x0.ndim)
    residual = (s * score_fn(x0 + s * z, sigma) + z).flatten(1) ** 2
    per_image = residual.mean(1) if reduce_mean else residual.sum(1)
    return per_image.mean()


def tweedie(x: Tensor, score: Tensor, sigma: float | Tensor) -> Tensor:
    """Tweedie's formula (Efron 2011; methods.md §3): ``x̂0 = E[x0 | x] = x + σ²·s(x, σ)``.

    Args:
        x: noisy images (B, ...).
        score: the score at ``(x, σ)``.
        sigma: the noise level, a float or (B,) tensor.
    """
    s = _bcast(_sigma_batch(sigma, x), x.ndim)
    return x + s**2 * score


def score_to_denoiser(score_fn: ScoreFn) -> Denoiser:
    """An EDM denoiser ``D(x; σ) = x + σ²·s(x, σ)`` (Tweedie) from a VE score model, for the samplers of
    :mod:`common.diffusion.samplers` (the conditioning argument is ignored).

    Args:
        score_fn: ``score_fn(x, sigma) -> s_θ(x, σ)``.
    """

    def denoiser(x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        return tweedie(x, score_fn(x, sigma), sigma)

    return denoiser


def predictor_step(
    x: Tensor, score: Tensor, sigma: float, sigma_next: float, noise: NoiseFn, add_noise: bool = True
) -> tuple[Tensor, Tensor]:
    """Reverse-diffusion predictor (Song et al. 2021, eq. 47 for the VE SDE): returns ``(x_next, x_mean)``.

    ``x_mean = x + (σ_i² − σ_{i+1}²)·s``, ``x_next = x_mean + sqrt(σ_i² − σ_{i+1}²)·z``.

    Args:
        x: state at ``sigma``.
        score: ``s_θ(x, σ)``.
        sigma: current level σ_i.
        sigma_next: next (lower) level σ_{i+1}.
        noise: standard normal source.
        add_noise: False returns ``x_mean`` as ``x_next`` (the final, noise-free step).
    """
    var = sigma**2 - sigma_next**2
    x_mean = x + var * score
    return (x_mean + math.sqrt(var) * noise(x) if add_noise else x_mean), x_mean


def corrector_step(x: Tensor, score: Tensor, noise: NoiseFn, snr: float = 0.16) -> Tensor:
    """Langevin corrector (Song et al. 2021, Algorithm 4): ``ε = 2(r‖z‖/‖s‖)²``, ``x + ε·s + sqrt(2ε)·z``.

    Args:
        x: state at the current level.
        score: ``s_θ(x, σ)``.
        noise: standard normal source.
        snr: the signal-to-noise ratio ``r`` (0.16 in SRMRI).
    """
    z = noise(x)
    z_norm = z.flatten(1).norm(dim=1)
    s_norm = score.flatten(1).norm(dim=1).clamp_min(torch.finfo(score.dtype).tiny)
    eps = _bcast(2 * (snr * z_norm / s_norm) ** 2, x.ndim)
    return x + eps * score + (2 * eps).sqrt() * z


def sample_pc(
    score_fn: ScoreFn,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    cond: Tensor | None = None,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    snr: float = 0.16,
    n_corrector: int = 1,
    denoise: bool = True,
) -> Tensor:
    """Predictor-corrector sampler (Song et al. 2021, Algorithm 2, VE): corrector then predictor at every level.

    Args:
        score_fn: ``score_fn(x, sigma) -> s_θ(x, σ)``.
        x: initial state at ``sigmas[0]``, e.g. ``σ_max·z``.
        sigmas: decreasing levels ending with 0 (:func:`get_sigmas_vesde`).
        cond: unused (kept for the shared sampler signature).
        noise: standard normal source (see :func:`make_noise`); None: global RNG.
        callback: ``callback(i, n, sigma, x, denoised)`` once per level, ``denoised`` the Tweedie estimate that
            the predictor's score gives.
        snr: corrector signal-to-noise ratio.
        n_corrector: Langevin steps per level (1 in SRMRI; 0 gives the predictor alone).
        denoise: no noise on the final step to σ = 0 (Song et al.'s default).
    """
    grid = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    n_steps = len(grid) - 1
    noise = make_noise() if noise is None else noise
    for i in range(n_steps):
        sigma, sigma_next = grid[i], grid[i + 1]
        sig_b = _sigma_batch(sigma, x)
        for _ in range(n_corrector):
            x = corrector_step(x, score_fn(x, sig_b), noise, snr)
        score = score_fn(x, sig_b)
        if callback is not None:
            callback(i, n_steps, sigma, x, tweedie(x, score, sigma))
        x, _ = predictor_step(x, score, sigma, sigma_next, noise, add_noise=not (denoise and sigma_next == 0))
    return x
