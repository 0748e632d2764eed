"""EDM samplers (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

One signature for all, k-diffusion style::

    sample_xxx(denoiser, x, sigmas, cond=None, *, noise=None, callback=None, s_churn=0., s_tmin=0.,
               s_tmax=inf, s_noise=1., eval_at_sigma_hat=True) -> Tensor

(:func:`sample_heun` adds ``max_correction_gain=None``, below.)

- ``denoiser(x, sigma, cond)`` returns ``D(x; σ)``; ``sigma`` is passed as a (B,) tensor;
- ``x`` is the initial state (the caller scales it: EDM uses ``σ_max·z``, DIAMOND and the EDM-SR study ``z``);
- ``sigmas`` is the decreasing grid ``σ_0 > ... > σ_{N-1} > σ_N = 0`` (:func:`get_sigmas_karras`);
- ``noise(like)`` returns standard normal noise shaped like ``like`` (:func:`make_noise` builds one from a
  ``torch.Generator``), used only by churn;
- ``callback(i, n, sigma, x, denoised)`` is called once per step, with the state ``x`` the denoiser saw at ``sigma``.

Churn (EDM Algorithm 2): ``γ_i = min(S_churn/N, √2 − 1)`` when ``S_tmin ≤ σ_i ≤ S_tmax`` (else 0),
``σ̂ = σ_i(1 + γ_i)``, ``x̂ = x + S_noise·sqrt(σ̂² − σ_i²)·z``. EDM evaluates D at ``σ̂``; DIAMOND's sampler (used by
the EDM-SR study) evaluates it at ``σ_i`` while stepping from ``σ̂``: ``eval_at_sigma_hat=False`` reproduces that.

Heun's correction and the denoiser's error: the corrected step ``x + (d + d')/2·Δσ`` with
``d' = (x' − D(x'; σ_{i+1}))/σ_{i+1}`` and ``Δσ = σ_{i+1} − σ̂`` carries an error ``δ`` of ``D`` at ``σ_{i+1}`` into the
state multiplied by the gain ``g_i = |Δσ|/(2σ_{i+1})`` (:func:`heun_correction_gain`), while an Euler step
``x' = (σ_{i+1}/σ̂)·x + (1 − σ_{i+1}/σ̂)·D(x; σ̂)`` passes D's error on with a factor below 1. On a few-step Karras
grid the last intervals have large gains (4 steps, σ 5 -> 0.002: 2.5, 4.95, 19), and a trained denoiser is least
accurate at small σ (offset noise: not the identity there), so Heun collapses. ``max_correction_gain`` takes the
correction only where ``g_i`` is at most that value (:func:`takes_heun_correction`, shared with
:func:`common.diffusion.guidance.sample_heun_dps`), an Euler step elsewhere: EDM Algorithm 2 already takes an Euler
step on the last interval (to σ = 0, an infinite gain); this extends it to every interval whose gain is too large.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "Denoiser",
    "NoiseFn",
    "Callback",
    "SAMPLERS",
    "RECOMMENDED_MAX_CORRECTION_GAIN",
    "get_sigmas_karras",
    "make_noise",
    "heun_correction_gain",
    "takes_heun_correction",
    "num_evaluations",
    "sample_euler",
    "sample_heun",
    "sample_paper_2p5d",
    "sample_paper_3d",
    "paper_2p5d_sigmas",
]

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
NoiseFn = Callable[[Tensor], Tensor]
Callback = Callable[[int, int, float, Tensor, Tensor], None]

# g ≤ 1 <=> σ̂ ≤ 3·σ_{i+1}: no correction passes D's error on more strongly than an Euler step could (see
# takes_heun_correction); on the Karras grids (ρ 7) of the bundles it leaves EDM's 16 and 20 steps (σ 5 -> 0.002)
# and SRMRI's 16 (σ 53.57 -> 0.01) as they are and turns the collapsing few-step corrections into Euler steps
RECOMMENDED_MAX_CORRECTION_GAIN = 1.0


def get_sigmas_karras(
    n: int,
    sigma_min: float = 2e-3,
    sigma_max: float = 5.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Karras et al. 2022 eq. 5: ``σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``, then ``σ_n = 0``.

    Args:
        n: number of steps (noise levels before the appended 0); ``n = 1`` gives ``[σ_max, 0]``.
        sigma_min: last non-zero level.
        sigma_max: first level.
        rho: time-step exponent (7 in EDM).
        device: device of the grid.
        dtype: dtype of the grid (float64 computes it more exactly).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)  # n = 1: [0], so the grid is [σ_max, 0]
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)


def make_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """A noise source ``noise(like) -> N(0, I)`` shaped like ``like`` (a tensor or a shape), from ``generator``.

    The samples follow ``like``'s dtype and device; the global RNG is used when ``generator`` is None.

    Args:
        generator: random generator on the device of the tensors it will be asked for.
    """

    def noise(like: Tensor | Sequence[int]) -> Tensor:
        if isinstance(like, Tensor):
            return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return torch.randn(tuple(like), generator=generator, device=generator.device if generator else None)

    return noise


def _sigma_batch(sigma: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)


def _grid(sigmas: Tensor | Sequence[float]) -> list[float]:
    return [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]


def _gamma(sigma: float, n_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM Algorithm 2, line 4: ``γ = min(S_churn/N, √2 − 1)`` for ``S_tmin ≤ σ ≤ S_tmax``, else 0."""
    return min(s_churn / n_steps, math.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0


def _churn(
    x: Tensor, sigma: float, n_steps: int, noise: NoiseFn, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float
) -> tuple[Tensor, float]:
    """EDM Algorithm 2, lines 4-6: ``x̂ = x + S_noise·sqrt(σ̂² − σ²)·z``, ``σ̂ = σ(1 + γ)``; returns ``(x̂, σ̂)``."""
    gamma = _gamma(sigma, n_steps, s_churn, s_tmin, s_tmax)
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1.0 + gamma)
    return x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * noise(x), sigma_hat


def heun_correction_gain(sigma_hat: float, sigma_next: float) -> float:
    """The factor ``|Δσ|/(2σ_{i+1})`` by which Heun's correction of the step ``σ̂ -> σ_{i+1}`` multiplies the
    denoiser's error at ``σ_{i+1}`` (infinite for ``σ_{i+1} = 0``).

    The corrected update ``x + (d + d')/2·Δσ`` holds ``−D(x'; σ_{i+1})/σ_{i+1}·Δσ/2``, so an error ``δ`` of ``D`` there
    moves the state by ``δ·|Δσ|/(2σ_{i+1})``.

    Args:
        sigma_hat: level the step starts from (``σ_i``, or ``σ̂_i`` after churn).
        sigma_next: level it ends at.
    """
    return math.inf if sigma_next <= 0 else (sigma_hat - sigma_next) / (2.0 * sigma_next)


def takes_heun_correction(sigma_hat: float, sigma_next: float, max_correction_gain: float | None = None) -> bool:
    """Whether Heun takes its 2nd-order correction on the step ``σ̂ -> σ_{i+1}`` (else an Euler step, one call).

    Never to ``σ_{i+1} = 0`` (EDM Algorithm 2: D/σ is undefined there); otherwise only where
    :func:`heun_correction_gain` is at most ``max_correction_gain``. The one rule of every Heun loop of the package.

    Why a gain bound: an Euler step ``x' = (σ_{i+1}/σ̂)·x + (1 − σ_{i+1}/σ̂)·D(x; σ̂)`` carries D's error into the
    state with a factor below 1; a correction with gain ``g`` adds D's error at ``σ_{i+1}`` with factor ``g``.
    :data:`RECOMMENDED_MAX_CORRECTION_GAIN` = 1 (``σ̂ ≤ 3σ_{i+1}``) keeps every correction at most as sensitive to
    the denoiser's error as an Euler step. Gains on Karras grids (ρ 7), last intervals: EDM σ 5 -> 0.002 with
    4 steps 2.5, 4.95, 19 (Heun collapses: −7.9 dB on the 3D card); 6 steps 1.6, 2.5, 5.1; 10 steps 0.9, 1.15, 1.6;
    20 steps ≤ 0.53 (fine). SRMRI σ 53.57 -> 0.01 with 8 steps 1.3, 2.0, 3.5 (collapses); 12 steps 0.85, 1.1, 1.5;
    16 steps ≤ 0.92 (its default, fine). The bound is relative, so one value serves every σ range.

    Args:
        sigma_hat: level the step starts from (``σ̂_i`` after churn).
        sigma_next: level it ends at.
        max_correction_gain: the largest gain that keeps the correction; None: no bound (EDM Algorithm 2).
    """
    if sigma_next <= 0:
        return False
    return max_correction_gain is None or heun_correction_gain(sigma_hat, sigma_next) <= max_correction_gain


def num_evaluations(
    sigmas: Tensor | Sequence[float],
    order: int = 2,
    max_correction_gain: float | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
) -> int:
    """Denoiser calls (NFE) of :func:`sample_euler` (``order`` 1) or :func:`sample_heun` (2) on ``sigmas``.

    One per step, plus one per corrected Heun step (:func:`takes_heun_correction`; churn raises ``σ̂``, hence the
    gains): ``2N − 1`` for Heun without a bound, ``N`` for Euler.

    Args:
        sigmas: decreasing noise levels ending with 0.
        order: 1 (Euler) or 2 (Heun).
        max_correction_gain: see :func:`sample_heun`.
        s_churn: EDM ``S_churn``.
        s_tmin: churn only for ``σ_i >= s_tmin``.
        s_tmax: churn only for ``σ_i <= s_tmax``.
    """
    grid = _grid(sigmas)
    n_steps = len(grid) - 1
    if order == 1:
        return n_steps
    corrections = sum(
        takes_heun_correction(s * (1.0 + _gamma(s, n_steps, s_churn, s_tmin, s_tmax)), s_next, max_correction_gain)
        for s, s_next in zip(grid[:-1], grid[1:])
    )
    return n_steps + corrections


def _sample(
    order: int,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    cond: Tensor | None,
    noise: NoiseFn | None,
    callback: Callback | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    eval_at_sigma_hat: bool,
    max_correction_gain: float | None = None,
) -> Tensor:
    """Karras et al. 2022, Algorithm 2 (``order`` 2) or its Euler reduction (``order`` 1)."""
    grid = _grid(sigmas)
    n_steps = len(grid) - 1
    noise = make_noise() if noise is None else noise
    for i in range(n_steps):
        sigma, sigma_next = grid[i], grid[i + 1]
        x, sigma_hat = _churn(x, sigma, n_steps, noise, s_churn, s_tmin, s_tmax, s_noise)
        sigma_eval = sigma_hat if eval_at_sigma_hat else sigma
        denoised = denoiser(x, _sigma_batch(sigma_eval, x), cond)
        if callback is not None:
            callback(i, n_steps, sigma_eval, x, denoised)
        d = (x - denoised) / sigma_hat
        dt = sigma_next - sigma_hat
        if order == 1 or not takes_heun_correction(sigma_hat, sigma_next, max_correction_gain):
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, _sigma_batch(sigma_next, x), cond)) / sigma_next
            x = x + (d + d_2) / 2 * dt
    return x


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    cond: Tensor | None = None,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    eval_at_sigma_hat: bool = True,
) -> Tensor:
    """Euler sampler of the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the Heun correction).

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> D(x; σ)``, ``sigma`` a (B,) tensor.
        x: initial state at ``sigmas[0]`` (already scaled by the caller).
        sigmas: decreasing noise levels ending with 0.
        cond: conditioning passed through to the denoiser.
        noise: ``noise(like)`` standard normal source for churn (see :func:`make_noise`); None: global RNG.
        callback: ``callback(i, n, sigma, x, denoised)`` once per step.
        s_churn: EDM ``S_churn`` (0: deterministic).
        s_tmin: churn only for ``σ_i >= s_tmin``.
        s_tmax: churn only for ``σ_i <= s_tmax``.
        s_noise: EDM ``S_noise``.
        eval_at_sigma_hat: evaluate D at ``σ̂`` (EDM) or, False, at ``σ_i`` (DIAMOND).
    """
    return _sample(1, denoiser, x, sigmas, cond, noise, callback, s_churn, s_tmin, s_tmax, s_noise, eval_at_sigma_hat)


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    cond: Tensor | None = None,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    eval_at_sigma_hat: bool = True,
    max_correction_gain: float | None = None,
) -> Tensor:
    """Heun (2nd order) sampler with churn (Karras et al. 2022, Algorithm 2); Euler on the last step to ``σ = 0``.

    ``max_correction_gain`` also makes Euler steps of the intervals where the correction would multiply the
    denoiser's error at ``σ_{i+1}`` by more than that (:func:`takes_heun_correction`): the remedy for Heun's
    collapse at few steps. Each Euler step costs one denoiser call, each corrected step two
    (:func:`num_evaluations`).

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> D(x; σ)``, ``sigma`` a (B,) tensor.
        x: initial state at ``sigmas[0]`` (already scaled by the caller).
        sigmas: decreasing noise levels ending with 0.
        cond: conditioning passed through to the denoiser.
        noise: ``noise(like)`` standard normal source for churn (see :func:`make_noise`); None: global RNG.
        callback: ``callback(i, n, sigma, x, denoised)`` once per step (not for the correction evaluation).
        s_churn: EDM ``S_churn`` (0: deterministic).
        s_tmin: churn only for ``σ_i >= s_tmin``.
        s_tmax: churn only for ``σ_i <= s_tmax``.
        s_noise: EDM ``S_noise``.
        eval_at_sigma_hat: evaluate D at ``σ̂`` (EDM) or, False, at ``σ_i`` (DIAMOND).
        max_correction_gain: correct only steps whose gain ``|Δσ|/(2σ_{i+1})`` is at most this; None (default):
            every step but the last, bit for bit EDM's Algorithm 2; :data:`RECOMMENDED_MAX_CORRECTION_GAIN` (1):
            Euler steps where the correction would collapse (a no-op on 16- and 20-step Karras grids); 0: Euler.
    """
    return _sample(
        2, denoiser, x, sigmas, cond, noise, callback, s_churn, s_tmin, s_tmax, s_noise, eval_at_sigma_hat,
        max_correction_gain,
    )


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": sample_euler, "heun": sample_heun}


def paper_2p5d_sigmas(sigma_max: float = 5.0, device: torch.device | str | None = None) -> Tensor:
    """The 2.5D study's one-step grid ``[σ_max, 0]`` (``get_sigmas_karras(1, sigma_max=σ_max)``).

    Args:
        sigma_max: the single noise level (5 in the study).
        device: device of the grid.
    """
    return get_sigmas_karras(1, sigma_max=sigma_max, device=device)


def sample_paper_2p5d(
    denoiser: Denoiser,
    like: Tensor,
    cond: Tensor | None = None,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    sigma_max: float = 5.0,
    s_churn: float = 10.0,
    s_noise: float = 0.9,
) -> Tensor:
    """The 2.5D study's "single-step Heun": one denoiser call at σ = 5 after churn (S_churn 10, S_noise 0.9).

    With one step to σ = 0 Heun takes no correction, so this is :func:`sample_heun` on ``[5, 0]`` with DIAMOND's
    conventions: initial state ``z ~ N(0, I)`` (not scaled by σ_max) and D evaluated at σ_0 = 5 (not σ̂ = 5√2).
    The result is ``D(z + S_noise·5·z'; 5)``.

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> D(x; σ)``.
        like: a tensor with the output's shape, dtype and device (its values are not used).
        cond: conditioning passed through to the denoiser.
        noise: standard normal source (see :func:`make_noise`); draws the initial state, then the churn noise.
        callback: ``callback(i, n, sigma, x, denoised)``, called once.
        sigma_max: the noise level.
        s_churn: EDM ``S_churn`` (γ = min(S_churn, √2 − 1) for one step).
        s_noise: EDM ``S_noise``.
    """
    noise = make_noise() if noise is None else noise
    sigmas = paper_2p5d_sigmas(sigma_max, like.device)
    return sample_heun(
        denoiser, noise(like), sigmas, cond, noise=noise, callback=callback, s_churn=s_churn, s_noise=s_noise,
        eval_at_sigma_hat=False,
    )


def sample_paper_3d(
    denoiser: Denoiser,
    like: Tensor,
    cond: Tensor | None = None,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    steps: int = 20,
    sigma_min: float = 2e-3,
    sigma_max: float = 5.0,
    rho: float = 7.0,
) -> Tensor:
    """The 3D study's sampler: Euler on a Karras grid (20 steps, σ 5 -> 2e-3, ρ 7) from ``z ~ N(0, I)`` (unscaled).

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> D(x; σ)``.
        like: a tensor with the output's shape, dtype and device (its values are not used).
        cond: conditioning passed through to the denoiser.
        noise: standard normal source (see :func:`make_noise`) for the initial state.
        callback: ``callback(i, n, sigma, x, denoised)`` once per step.
        steps: number of steps (denoiser calls).
        sigma_min: last non-zero noise level.
        sigma_max: first noise level.
        rho: grid exponent.
    """
    noise = make_noise() if noise is None else noise
    sigmas = get_sigmas_karras(steps, sigma_min, sigma_max, rho, device=like.device)
    return sample_euler(denoiser, noise(like), sigmas, cond, noise=noise, callback=callback)
