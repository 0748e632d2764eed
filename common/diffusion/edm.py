"""EDM preconditioning with offset noise (the DIAMOND variant used by the EDM super-resolution study).

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), Table 1, with the
offset noise of DIAMOND (Alonso et al. 2024): the training noise ``σ_off·n + σ·ε`` (``n`` one value per batch and
channel) has a per-voxel variance ``σ'² = σ² + σ_off²``, and every coefficient uses ``σ'``:

    c_in = 1 / sqrt(σ'² + σ_data²),  c_skip = σ_data² / (σ'² + σ_data²),  c_out = σ' · sqrt(c_skip),
    c_noise = ln(σ') / 4,            D(x; σ) = c_skip · x + c_out · F(cat[cond / σ_data, c_in · x], c_noise).

With ``sigma_offset = 0`` these are EDM's own (c_out = σ·σ_data / sqrt(σ² + σ_data²)). Identities that hold for any
``sigma_offset`` (tested): ``c_in² (σ'² + σ_data²) = 1``, ``c_skip + c_out² / σ_data² = 1``, ``c_out² = c_skip σ'²``,
and the unit variance of the training target, ``(1 − c_skip)² σ_data² + c_skip² σ'² = c_out²``. What does *not* hold
with offset noise: ``D(x; σ) → x`` as ``σ → 0`` (``c_skip → σ_data²/(σ_off² + σ_data²) < 1``); it holds for plain EDM.

Training: ``ln σ ~ N(P_mean, P_std²)`` clipped to ``[σ_min, σ_max]``, and the F-space loss
``‖F − (x0 − c_skip·x_noisy)/c_out‖²``, which equals EDM's ``λ(σ)·‖D − x0‖²`` with ``λ = 1/c_out²`` (eq. 8 and
Table 1). Images live in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["edm_coefficients", "sample_sigma_lognormal", "add_training_noise", "EDMPrecond", "SRDenoiser"]


def _as_batch(sigma: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """``sigma`` (float, 0-d, (1,) or (B,)) as a (B,) tensor with ``like``'s device and floating dtype."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    s = torch.as_tensor(sigma, device=like.device).to(dtype).reshape(-1)
    return s.expand(batch) if s.numel() == 1 else s


def _bcast(c: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions in all."""
    return c.reshape(c.shape + (1,) * (ndim - c.ndim))


def edm_coefficients(
    sigma: Tensor, sigma_data: float = 0.5, sigma_offset: float = 0.1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1), DIAMOND offset noise: ``(c_skip, c_out, c_in, c_noise)``.

    Args:
        sigma: noise levels σ (any shape); the coefficients have the same shape.
        sigma_data: standard deviation of the data.
        sigma_offset: standard deviation of the offset noise; 0 gives plain EDM.
    """
    sigma_eff = (sigma**2 + sigma_offset**2).sqrt()  # σ'
    c_skip = sigma_data**2 / (sigma_eff**2 + sigma_data**2)
    c_out = sigma_eff * c_skip.sqrt()
    c_in = 1 / (sigma_eff**2 + sigma_data**2).sqrt()
    c_noise = sigma_eff.log() / 4
    return c_skip, c_out, c_in, c_noise


def sample_sigma_lognormal(
    n: int,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_min: float = 2e-3,
    sigma_max: float = 20.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training noise levels: ``ln σ ~ N(P_mean, P_std²)`` (Karras et al. 2022, Table 1), clipped to [min, max].

    Args:
        n: number of samples.
        p_mean: mean of ln σ.
        p_std: standard deviation of ln σ.
        sigma_min: lower clip (DIAMOND: 2e-3).
        sigma_max: upper clip (DIAMOND: 20).
        generator: random generator (on ``device``).
        device: device of the result.
    """
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return (z * p_std + p_mean).exp().clamp(sigma_min, sigma_max)


def add_training_noise(
    x0: Tensor, sigma: Tensor, sigma_offset: float = 0.1, generator: torch.Generator | None = None
) -> Tensor:
    """Training noising with offset noise (DIAMOND): ``x0 + σ_off·n + σ·ε``, ``n`` one value per (batch, channel).

    Args:
        x0: clean images (B, C, *spatial).
        sigma: noise level per sample (B,).
        sigma_offset: standard deviation of the offset noise ``n``.
        generator: random generator (on ``x0``'s device); draws ``n`` first, then ``ε``.
    """
    shape_n = tuple(x0.shape[:2]) + (1,) * (x0.ndim - 2)
    n = torch.randn(shape_n, generator=generator, device=x0.device, dtype=x0.dtype)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return x0 + sigma_offset * n + _bcast(sigma.to(x0.dtype), x0.ndim) * eps


class EDMPrecond(nn.Module):
    """Denoiser ``D(x; σ) = c_skip·x + c_out·F(cat[cond/σ_data, c_in·x], c_noise)`` around a backbone ``F``.

    Karras et al. 2022 (EDM) eq. 7 and Table 1, with DIAMOND's offset noise (``sigma_offset``; 0 gives plain EDM).
    ``forward`` is the denoiser the samplers call: ``denoiser(x, sigma, cond)``. :meth:`loss` is the training loss.

    Args:
        model: backbone ``F(x_in, c_noise)``, ``c_noise`` of shape (B,), returning the shape of ``x``.
        sigma_data: standard deviation of the data (0.5 for images in [-1, 1]).
        sigma_offset: standard deviation of the offset noise (DIAMOND: 0.1).
        p_mean: mean of ln σ in training.
        p_std: standard deviation of ln σ in training.
        sigma_min: lower clip of the training σ.
        sigma_max: upper clip of the training σ.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[Tensor, Tensor], Tensor],
        sigma_data: float = 0.5,
        sigma_offset: float = 0.1,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 2e-3,
        sigma_max: float = 20.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_offset = float(sigma_offset)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def get_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` (see :func:`edm_coefficients`).

        Args:
            sigma: noise levels (any shape).
        """
        return edm_coefficients(sigma, self.sigma_data, self.sigma_offset)

    def network_input(self, x: Tensor, c_in: Tensor, cond: Tensor | None = None) -> Tensor:
        """``cat[cond / σ_data, c_in · x]`` on channels (just ``c_in · x`` without ``cond``).

        Args:
            x: noisy images (B, C, *spatial).
            c_in: input scaling broadcastable to ``x``.
            cond: conditioning images (B, C_cond, *spatial) in the data range, or None.
        """
        x_in = c_in * x
        if cond is None:
            return x_in
        return torch.cat([cond.to(x_in.dtype) / self.sigma_data, x_in], dim=1)

    def forward_with_output(
        self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(D, F, c_skip, c_out)``: the denoised image, the raw network output and the two output scalings.

        Args:
            x: noisy images (B, C, *spatial).
            sigma: noise level: float, 0-d, or one per sample (B,).
            cond: conditioning images, concatenated before ``x`` on channels, or None.
        """
        sigma = _as_batch(sigma, x.shape[0], x)
        c_skip, c_out, c_in, c_noise = self.get_scalings(sigma)
        c_skip, c_out, c_in = (_bcast(c, x.ndim) for c in (c_skip, c_out, c_in))
        f_x = self.model(self.network_input(x, c_in, cond), c_noise)
        denoised = c_skip * x + c_out * f_x.to(x.dtype)
        return denoised, f_x, c_skip, c_out

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """``D(x; σ)`` (Karras et al. 2022, eq. 7).

        Args:
            x: noisy images (B, C, *spatial).
            sigma: noise level: float, 0-d, or one per sample (B,).
            cond: conditioning images, concatenated before ``x`` on channels, or None.
        """
        return self.forward_with_output(x, sigma, cond)[0]

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Training σ from the configured log-normal (see :func:`sample_sigma_lognormal`).

        Args:
            n: number of samples.
            generator: random generator.
            device: device of the result.
        """
        return sample_sigma_lognormal(n, self.p_mean, self.p_std, self.sigma_min, self.sigma_max, generator, device)

    def loss(
        self,
        x0: Tensor,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
        sigma: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """F-space training loss ``MSE(F, (x0 − c_skip·x_noisy)/c_out)`` (= EDM's λ(σ)-weighted D loss, λ = 1/c_out²).

        Draws σ (unless given), then the offset noise and ε, all from ``generator`` in that order.

        Args:
            x0: clean images in [-1, 1] (B, C, *spatial).
            cond: conditioning images (B, C_cond, *spatial) or None.
            generator: random generator (on ``x0``'s device); None uses the global one.
            sigma: noise levels (B,) to use instead of sampling them.
            reduction: "mean" (a scalar) or "none" (per-sample mean, shape (B,)).
        """
        b = x0.shape[0]
        sigma = self.sample_sigma(b, generator, x0.device) if sigma is None else _as_batch(sigma, b, x0)
        x_noisy = add_training_noise(x0, sigma, self.sigma_offset, generator)
        _, f_x, c_skip, c_out = self.forward_with_output(x_noisy, sigma, cond)
        target = (x0 - c_skip * x_noisy) / c_out
        if reduction == "mean":
            return F.mse_loss(f_x.float(), target.float())
        if reduction == "none":
            return (f_x.float() - target.float()).pow(2).flatten(1).mean(1)
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

    def extra_repr(self) -> str:
        return (
            f"sigma_data={self.sigma_data}, sigma_offset={self.sigma_offset}, p_mean={self.p_mean}, "
            f"p_std={self.p_std}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
        )


class SRDenoiser(EDMPrecond):
    """The EDM denoiser of an SR bundle: :class:`EDMPrecond` with a ``forward`` for the three ways it is called.

    - ``forward(x, sigma, cond)``: ``D(x; σ)`` for the samplers (the parent's denoiser);
    - ``forward(x, sigma, cond, raw=True)``: the raw network output ``F`` (the stock trainer's MSE on the
      F-space target, see :class:`common.engines.EDMPrepareBatch`);
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
