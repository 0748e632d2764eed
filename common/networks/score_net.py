"""NCSN++-style score network of the SRMRI bundle (methods.md §3): ``s_θ(x, σ)`` for the VE SDE, 2D or 3D.

Written from the structure of NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", the
``ncsnpp`` model with BigGAN residual blocks), not copied:

- noise embedding: Gaussian Fourier projection of ``log σ`` (fixed ``W ~ N(0, fourier_scale²)``, a buffer),
  ``[sin 2π·logσ·W, cos 2π·logσ·W]`` of width ``2·nf``, then ``Linear-SiLU-Linear`` to ``4·nf``;
- ``conv_in`` 3x3 to ``nf``; per level ``num_res_blocks`` BigGAN residual blocks of width ``nf·ch_mult[level]``
  (GroupNorm, SiLU, conv3, + ``Linear(SiLU(temb))``, GroupNorm, SiLU, dropout, conv3 with zero init; 1x1 conv on
  the skip when the width changes or the block resamples; output ``(skip + h)/√2``), a resampling residual block
  (2x2 average pooling down, nearest x2 up, on both paths) between levels;
- a middle of residual block, self-attention, residual block; optional attention after the blocks of chosen levels
  (NCSN++ puts it at resolution 16; here per level, as the network sees crops and whole slices of any size);
- decoder with ``num_res_blocks + 1`` blocks per level, each consuming one stored skip (concatenated on channels);
- head: GroupNorm, SiLU, conv3 with zero-initialised weights (the score starts at 0: the loss starts at 1 per voxel);
- output divided by σ (NCSN++'s ``scale_by_sigma``): the network predicts ``σ·s ≈ −z``, a unit-scale target.
  GroupNorm groups ``min(channels // 4, 32)`` as NCSN++.

Deviations from NCSN++, each deliberate (see the bundle's model card):

- no progressive input/output branches and no FIR resampling (NCSN++'s ``progressive='output_skip'``,
  ``progressive_input='input_skip'``, ``fir=True``): plain average pooling / nearest upsampling, the
  ``fir=False`` option of the original; fewer parameters and faster on CPU;
- input preconditioning (Karras et al. 2022): the network sees ``x / sqrt(σ² + σ_data²)`` (unit variance at every
  level) instead of the raw ``x`` (up to hundreds at σ_max); ``sigma_data=None`` gives the raw input of NCSN++.
  The score is still ``F/σ``, so the loss ``E‖σ·s_θ + z‖²`` of methods.md §3 is unchanged;
- inputs of any size: zero-padded at the end of each axis to a multiple of ``2**(levels − 1)``, cropped back.

:class:`ScoreNet` answers three calls: ``net(x, sigma)`` the score ``s_θ(x, σ)``; ``net(x, sigma, raw=True)`` the
network output ``σ·s_θ`` (the training target is ``−z``); ``net(x)`` the Tweedie denoiser ``x + σ²·s_θ`` at the
fixed level ``probe_sigma`` (what MONAI's ``verify_net_in_out`` and a traced ``ckpt_export`` call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Pool
from torch import Tensor, nn

from common.networks.adadm import same_conv
from common.utils import as_flag

__all__ = [
    "ScoreNet",
    "GaussianFourierProjection",
    "BigGANResBlock",
    "SelfAttention",
    "PAPER_CONFIG",
    "CPU_CONFIG",
    "score_net_paper",
    "gn_groups",
]


def gn_groups(channels: int) -> int:
    """GroupNorm groups of NCSN++: ``min(channels // 4, 32)`` (at least 1), lowered until it divides."""
    groups = max(1, min(channels // 4, 32))
    while channels % groups:
        groups -= 1
    return groups




class GaussianFourierProjection(nn.Module):
    """``[sin 2πcW, cos 2πcW]`` with a fixed ``W ~ N(0, scale²)`` (NCSN++'s noise embedding of ``c = log σ``).

    Args:
        embedding_size: entries of ``W`` (output width is twice this).
        scale: standard deviation of ``W`` (16 in NCSN++ and SRMRI).
    """

    def __init__(self, embedding_size: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(embedding_size) * scale)

    def forward(self, c: Tensor) -> Tensor:
        # elementwise in float32, so cos/sin of large arguments stay exact under autocast
        f = 2.0 * math.pi * c.float().reshape(-1, 1) * self.weight.float().reshape(1, -1)
        return torch.cat([f.sin(), f.cos()], dim=-1)


class BigGANResBlock(nn.Module):
    """NCSN++'s BigGAN residual block with the noise embedding added after the first conv; optional resampling.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        temb_channels: width of the noise embedding.
        resample: "none", "down" (2x2 average pooling) or "up" (nearest x2), applied to both paths.
        dropout: dropout probability before the second conv.
        skip_rescale: divide the sum by √2 (NCSN++'s ``skip_rescale=True``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        resample: str = "none",
        dropout: float = 0.0,
        skip_rescale: bool = True,
    ) -> None:
        super().__init__()
        if resample not in ("none", "down", "up"):
            raise ValueError(f"resample must be 'none', 'down' or 'up', got {resample!r}")
        self.resample = resample
        self.norm0 = nn.GroupNorm(gn_groups(in_channels), in_channels, eps=1e-6)
        self.conv0 = same_conv(spatial_dims, in_channels, out_channels, 3)
        self.dense = nn.Linear(temb_channels, out_channels)
        nn.init.zeros_(self.dense.bias)
        self.norm1 = nn.GroupNorm(gn_groups(out_channels), out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = same_conv(spatial_dims, out_channels, out_channels, 3, zero=True)
        needs_skip = in_channels != out_channels or resample != "none"
        self.skip = same_conv(spatial_dims, in_channels, out_channels, 1) if needs_skip else nn.Identity()
        pool_type: Any = Pool[Pool.AVG, spatial_dims]
        self.pool = pool_type(kernel_size=2, stride=2)
        self.spatial_dims = spatial_dims
        self.scale = 1.0 / math.sqrt(2.0) if skip_rescale else 1.0

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return self.pool(x)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")  # a float factor: TorchScript-safe
        return x

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = F.silu(self.norm0(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv0(h)
        t = self.dense(F.silu(temb))
        for _ in range(self.spatial_dims):
            t = t.unsqueeze(-1)
        h = h + t
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        return (self.skip(x) + h) * self.scale


class SelfAttention(nn.Module):
    """Single-head self-attention over all voxels (NCSN++'s ``AttnBlockpp``), zero-initialised output projection.

    Args:
        spatial_dims: 2 or 3.
        channels: channels of ``x``.
        skip_rescale: divide the sum by √2.
    """

    def __init__(self, spatial_dims: int, channels: int, skip_rescale: bool = True) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(gn_groups(channels), channels, eps=1e-6)
        self.qkv = same_conv(spatial_dims, channels, 3 * channels, 1)
        self.proj = same_conv(spatial_dims, channels, channels, 1, zero=True)
        self.scale = 1.0 / math.sqrt(2.0) if skip_rescale else 1.0

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[0], x.shape[1]
        qkv = self.qkv(self.norm(x)).flatten(2)  # (B, 3C, N)
        q, k, v = qkv.reshape(b, 3, c, qkv.shape[-1]).transpose(2, 3).unbind(1)  # each (B, N, C)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return (x + self.proj(y)) * self.scale


class _Level(nn.Module):
    """Residual blocks, each followed by attention when asked (decoder blocks pop one skip each)."""

    def __init__(self, blocks: list[BigGANResBlock], attention: list[nn.Module], resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = nn.ModuleList(attention)
        self.resample = nn.ModuleList([] if resample is None else [resample])  # 0 or 1 block (scriptable)


class ScoreNet(nn.Module):
    """NCSN++-style VE score model ``s_θ(x, σ) = F(c_in·x, log σ)/σ`` (see the module docstring).

    Args:
        spatial_dims: 2 (sagittal slices, the bundle) or 3.
        in_channels: image channels.
        nf: width of the first level (64 in SRMRI's NCSN++).
        ch_mult: width multipliers per level ((1, 2, 2, 2) in SRMRI); ``len - 1`` downsamplings.
        num_res_blocks: residual blocks per encoder level (4 in SRMRI).
        attention_levels: per level, self-attention after its blocks (default: none; the middle has its own).
        mid_attention: self-attention in the middle.
        dropout: dropout probability in the residual blocks.
        fourier_scale: standard deviation of the Fourier projection (16).
        sigma_data: input preconditioning ``c_in = 1/sqrt(σ² + σ_data²)``; None feeds the raw ``x`` (NCSN++).
        probe_sigma: noise level of the single-input call ``net(x)``.
        skip_rescale: residual sums divided by √2.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        nf: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attention_levels: Sequence[bool] | None = None,
        mid_attention: bool = True,
        dropout: float = 0.0,
        fourier_scale: float = 16.0,
        sigma_data: float | None = 0.5,
        probe_sigma: float = 0.5,
        skip_rescale: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        widths = [int(nf * m) for m in ch_mult]
        n_levels = len(widths)
        attn = [False] * n_levels if attention_levels is None else [as_flag(a) for a in attention_levels]
        if len(attn) != n_levels:
            raise ValueError("attention_levels needs one entry per level of ch_mult")
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.sigma_data = None if sigma_data is None else float(sigma_data)
        self.probe_sigma = float(probe_sigma)
        self.pad_multiple = int(2 ** (n_levels - 1))
        temb = 4 * nf

        def block(ci: int, co: int, resample: str = "none") -> BigGANResBlock:
            return BigGANResBlock(spatial_dims, ci, co, temb, resample, dropout, skip_rescale)

        def attention(c: int, on: bool) -> nn.Module:
            return SelfAttention(spatial_dims, c, skip_rescale) if on else nn.Identity()

        self.fourier = GaussianFourierProjection(nf, fourier_scale)
        self.temb = nn.Sequential(nn.Linear(2 * nf, temb), nn.SiLU(), nn.Linear(temb, temb))
        for layer in (self.temb[0], self.temb[2]):
            nn.init.zeros_(layer.bias)
        self.conv_in = same_conv(spatial_dims, in_channels, nf, 3)

        encoder, skip_ch, ch = [], [nf], nf
        for i, w in enumerate(widths):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, w))
                attns.append(attention(w, attn[i]))
                ch = w
                skip_ch.append(ch)
            down = block(ch, ch, "down") if i < n_levels - 1 else None
            if down is not None:
                skip_ch.append(ch)
            encoder.append(_Level(blocks, attns, down))
        self.encoder = nn.ModuleList(encoder)
        self.mid = nn.ModuleList([block(ch, ch), attention(ch, mid_attention), block(ch, ch)])

        decoder = []
        for i in reversed(range(n_levels)):
            w = widths[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skip_ch.pop(), w))
                attns.append(attention(w, attn[i]))
                ch = w
            up = block(ch, ch, "up") if i > 0 else None
            decoder.append(_Level(blocks, attns, up))
        self.decoder = nn.ModuleList(decoder)
        self.norm_out = nn.GroupNorm(gn_groups(ch), ch, eps=1e-6)
        self.conv_out = same_conv(spatial_dims, ch, in_channels, 3, zero=True)

    def backbone(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """The raw network ``F(x_in, c_noise)``: (B, C, *spatial) and (B,) -> (B, C, *spatial)."""
        temb = self.temb(self.fourier(c_noise))
        sizes: list[int] = []
        for d in range(self.spatial_dims):
            sizes.append(x.shape[2 + d])
        pads: list[int] = []
        for d in range(self.spatial_dims - 1, -1, -1):  # F.pad lists the last axis first
            pads.extend([0, (self.pad_multiple - sizes[d] % self.pad_multiple) % self.pad_multiple])
        h = self.conv_in(F.pad(x, pads))
        skips = [h]
        for level in self.encoder:
            for blk, att in zip(level.blocks, level.attention):
                h = att(blk(h, temb))
                skips.append(h)
            for down in level.resample:
                h = down(h, temb)
                skips.append(h)
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for level in self.decoder:
            for blk, att in zip(level.blocks, level.attention):
                h = att(blk(torch.cat([h, skips.pop()], dim=1), temb))
            for up in level.resample:
                h = up(h, temb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        for d in range(self.spatial_dims):
            h = h.narrow(2 + d, 0, sizes[d])
        return h

    def forward(self, x: Tensor, sigma: Optional[Tensor] = None, raw: bool = False) -> Tensor:
        """The score ``s_θ(x, σ)``; with ``raw`` the network output ``σ·s_θ``; with no ``sigma`` the Tweedie
        denoiser ``x + σ²·s_θ(x, σ)`` at ``probe_sigma``.

        Args:
            x: noisy images (B, C, *spatial), any spatial size, in the data scale ([0, 1] plus noise).
            sigma: noise level, a 0-d, (1,) or (B,) tensor.
            raw: return ``σ·s_θ`` (the network output that the training loss compares with ``−z``).
        """
        probe = sigma is None
        if sigma is None:
            sig = torch.full([x.shape[0]], self.probe_sigma, device=x.device, dtype=torch.float32)
        else:
            sig = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        s = sig.reshape(shape)
        x_in = x if self.sigma_data is None else x / torch.sqrt(s * s + self.sigma_data**2)
        out = self.backbone(x_in.to(x.dtype), torch.log(sig)).float()
        if raw:
            return out
        if probe:
            return x.float() + s * out  # x + σ²·(out/σ)
        return out / s


# SRMRI's NCSN++ (methods.md §3); sigma_data None would be the source's raw input, kept on here (see docstring)
PAPER_CONFIG: dict[str, Any] = dict(
    spatial_dims=2, nf=64, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attention_levels=None, mid_attention=True,
    dropout=0.0, fourier_scale=16.0,
)
# the bundle's CPU configuration (trained on 2 threads; see the model card)
CPU_CONFIG: dict[str, Any] = dict(
    spatial_dims=2, nf=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attention_levels=None, mid_attention=True,
    dropout=0.0, fourier_scale=16.0,
)


def score_net_paper(**overrides: Any) -> ScoreNet:
    """The SRMRI paper's network size (nf 64, mults (1, 2, 2, 2), 4 blocks); ``overrides`` replace entries."""
    return ScoreNet(**{**PAPER_CONFIG, **overrides})
