"""AdaGN U-Net: the noise-conditioned U-Net of the EDM super-resolution study, for 2D (2.5D) and 3D inputs.

The architecture follows the U-Net of DIAMOND (Alonso et al. 2024, eloialonso/diamond, ``src/models/blocks.py``),
which the EDM study forked and extended to 3D (``methods.md`` section 1). Written from that structure, not copied:

- noise embedding: Fourier features of ``c_noise`` with a fixed random ``W ~ N(0, 1)`` (a buffer, no parameters),
  ``[cos 2πcW, sin 2πcW]``, then ``Linear-SiLU-Linear`` to a cond vector of width ``cond_channels``;
- ``conv_in`` 3x3 to ``channels[0]``; per level, ``num_res_blocks`` AdaGN residual blocks (the first takes the
  previous level's width); stride-2 3x3 conv down between levels (orthogonal init);
- each residual block: AdaGN (GroupNorm without affine, ``x * (1 + scale) + shift`` from ``Linear(cond)``), SiLU,
  3x3 conv, twice; the second conv has zero-initialised weights; a 1x1 conv projects the skip when the width
  changes; optional self-attention after the block (head dim 8, zero-initialised output projection);
- a two-block middle with attention;
- the decoder has ``num_res_blocks + 1`` blocks per level: each consumes one stored skip (the outputs of the
  level's encoder blocks, newest first, then the level's input after downsampling); the last block of a level
  returns to the previous level's width; nearest x2 + 3x3 conv up between levels;
- output head: GroupNorm (affine), SiLU, 3x3 conv with zero-initialised weights;
- GroupNorm groups = ``channels // 32`` (at least 1), eps 1e-5; inputs are zero-padded (at the end of each spatial
  axis, after ``conv_in``) to a multiple of ``2**(len(channels) - 1)`` and cropped back before the output head.

Parameter counts of the paper configurations (:func:`adagn_unet_paper_3d`, :func:`adagn_unet_paper_2p5d`), reached
by reproducing DIAMOND's structure above (3 decoder blocks per level, attention in every block of the deepest
level and both middle blocks, affine GroupNorm in the attention and output head, two cond Linear layers of width
``cond_channels``): 3D = 50,713,153 (50.71 M, the paper's number); 2.5D = 51,144,577 (51.14 M, the paper's number).

One deliberate difference from DIAMOND, with no effect on the parameter count: DIAMOND's attention adds its output
to the *normalised* input (``norm(x) + attn(norm(x))``); here the residual is the usual ``x + attn(norm(x))``, so
an attention block starts as the identity (its output projection is zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from common.utils import as_flag

__all__ = [
    "spatial_sizes",
    "padding_to_multiple",
    "AdaGNUNet",
    "AdaGroupNorm",
    "AttentionBlock",
    "FourierFeatures",
    "ResBlock",
    "PAPER_CONFIGS",
    "adagn_unet_paper_2p5d",
    "adagn_unet_paper_3d",
    "num_groups",
]

GN_GROUP_SIZE = 32
GN_EPS = 1e-5
ATTN_HEAD_DIM = 8


def num_groups(channels: int, group_size: int = GN_GROUP_SIZE) -> int:
    """GroupNorm groups for ``channels``: ``channels // group_size`` (at least 1), lowered until it divides.

    Args:
        channels: number of channels normalised.
        group_size: target channels per group (DIAMOND: 32).
    """
    groups = max(1, channels // group_size)
    while channels % groups:
        groups -= 1
    return groups


def _conv(spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Module:
    """A ``spatial_dims``-D convolution from MONAI's factory, padded to keep the size (before the stride)."""
    conv_type: Any = Conv[Conv.CONV, spatial_dims]
    return conv_type(in_ch, out_ch, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2)



def spatial_sizes(x: Tensor, spatial_dims: int) -> list[int]:
    """The spatial sizes of a (B, C, *spatial) tensor, for cropping back after :func:`padding_to_multiple`."""
    sizes: list[int] = []
    for d in range(spatial_dims):
        sizes.append(x.shape[2 + d])
    return sizes


def padding_to_multiple(sizes: list[int], multiple: int) -> list[int]:
    """``F.pad`` widths (last axis first, at the far end) that bring ``sizes`` up to a multiple of ``multiple``."""
    pads: list[int] = []
    for d in range(len(sizes) - 1, -1, -1):
        pads.extend([0, (multiple - sizes[d] % multiple) % multiple])
    return pads

class FourierFeatures(nn.Module):
    """Fourier features of a scalar per sample: ``[cos 2πcW, sin 2πcW]`` with a fixed ``W ~ N(0, 1)``.

    Args:
        num_features: output width (even); ``W`` has ``num_features // 2`` entries, stored as a buffer.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        if num_features % 2:
            raise ValueError(f"num_features must be even, got {num_features}")
        self.register_buffer("weight", torch.randn(num_features // 2))

    def forward(self, c: Tensor) -> Tensor:
        # elementwise product (not a matmul) so that it stays float32 under autocast: cos/sin of arguments up to ~20
        f = 2.0 * math.pi * c.float().reshape(-1, 1) * self.weight.float().reshape(1, -1)
        return torch.cat([f.cos(), f.sin()], dim=-1)


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine parameters, modulated per sample: ``GN(x) * (1 + scale) + shift``.

    Args:
        channels: channels of ``x``.
        cond_channels: width of the cond vector; ``Linear(cond_channels, 2 * channels)`` gives (scale, shift).
        spatial_dims: number of spatial axes of ``x``.
        group_size: target channels per group.
        eps: GroupNorm epsilon.
    """

    def __init__(
        self, channels: int, cond_channels: int, spatial_dims: int, group_size: int = GN_GROUP_SIZE, eps: float = GN_EPS
    ) -> None:
        super().__init__()
        self.channels = channels
        self.groups = num_groups(channels, group_size)
        self.eps = eps
        self.spatial_dims = spatial_dims
        self.linear = nn.Linear(cond_channels, 2 * channels)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.linear(cond).chunk(2, dim=1)  # (B, C) each
        for _ in range(self.spatial_dims):
            scale, shift = scale.unsqueeze(-1), shift.unsqueeze(-1)
        # one fused multiply-add instead of a multiply and an add over the whole tensor: on CPU those two passes cost
        # twice the normalisation itself (docs/performance.md). Folding the batch into GroupNorm's affine would be
        # one pass for contiguous inputs, but it ties the group count to the batch size (torch.export specialises
        # it) and copies channels-last inputs, the layout the bundles run in.
        return torch.addcmul(shift, F.group_norm(x, self.groups, eps=self.eps), 1 + scale)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all voxels, ``x + proj(attn(GN(x)))``, via ``scaled_dot_product_attention``.

    Args:
        channels: channels of ``x``.
        spatial_dims: number of spatial axes.
        head_dim: channels per head (heads = ``channels // head_dim``, at least 1).
        group_size: target channels per GroupNorm group.
    """

    def __init__(
        self, channels: int, spatial_dims: int, head_dim: int = ATTN_HEAD_DIM, group_size: int = GN_GROUP_SIZE
    ) -> None:
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        if channels % self.num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by the number of heads ({self.num_heads})")
        self.norm = nn.GroupNorm(num_groups(channels, group_size), channels, eps=GN_EPS)
        self.qkv = _conv(spatial_dims, channels, 3 * channels, 1)
        self.proj = _conv(spatial_dims, channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[0], x.shape[1]
        # Tokens (B, N, 3C), a view when x is channels-last, split so that q, k and v have unit stride along the head
        # dim whatever x's layout: the fused kernels of scaled_dot_product_attention need it, and strided inputs
        # take the math path, which materialises the N x N weights (a contiguous x did; a channels-last one did not).
        qkv = self.qkv(self.norm(x)).movedim(1, -1).reshape(b, -1, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, N, heads, head_dim)
        shape: list[int] = [b] + list(x.shape[2:]) + [c]
        y = y.reshape(shape).movedim(-1, 1)  # back to (B, C, *spatial), channels-last in memory
        return x + self.proj(y)


class ResBlock(nn.Module):
    """AdaGN residual block: ``(AdaGN, SiLU, conv3) x 2`` plus a (1x1-projected) skip, then optional attention.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        cond_channels: width of the cond vector.
        spatial_dims: number of spatial axes.
        attention: append a self-attention block.
        head_dim: channels per attention head.
        group_size: target channels per GroupNorm group.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_channels: int,
        spatial_dims: int,
        attention: bool = False,
        head_dim: int = ATTN_HEAD_DIM,
        group_size: int = GN_GROUP_SIZE,
    ) -> None:
        super().__init__()
        self.skip = nn.Identity() if in_channels == out_channels else _conv(spatial_dims, in_channels, out_channels, 1)
        self.norm1 = AdaGroupNorm(in_channels, cond_channels, spatial_dims, group_size)
        self.conv1 = _conv(spatial_dims, in_channels, out_channels, 3)
        self.norm2 = AdaGroupNorm(out_channels, cond_channels, spatial_dims, group_size)
        self.conv2 = _conv(spatial_dims, out_channels, out_channels, 3)
        nn.init.zeros_(self.conv2.weight)
        self.attn = AttentionBlock(out_channels, spatial_dims, head_dim, group_size) if attention else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        r = self.skip(x)
        x = self.conv1(F.silu(self.norm1(x, cond)))
        x = self.conv2(F.silu(self.norm2(x, cond)))
        return self.attn(x + r)


class _Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.conv = _conv(spatial_dims, channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _EncoderLevel(nn.Module):
    """Optional stride-2 down conv, then residual blocks; returns the output and appends the skips."""

    def __init__(self, down: nn.Module, blocks: list[ResBlock]) -> None:
        super().__init__()
        self.down = down
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, cond: Tensor, skips: list[Tensor]) -> Tensor:
        x = self.down(x)
        skips.append(x)
        for block in self.blocks:
            x = block(x, cond)
            skips.append(x)
        return x


class _DecoderLevel(nn.Module):
    """Optional up block, then residual blocks each consuming the newest stored skip (concatenated on channels)."""

    def __init__(self, up: nn.Module, blocks: list[ResBlock]) -> None:
        super().__init__()
        self.up = up
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, cond: Tensor, skips: list[Tensor]) -> Tensor:
        x = self.up(x)
        for block in self.blocks:
            x = block(torch.cat([x, skips.pop()], dim=1), cond)
        return x


class AdaGNUNet(nn.Module):
    """Noise-conditioned U-Net with adaptive GroupNorm (DIAMOND / EDM-SR study), 2D or 3D; ``forward(x, c_noise)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (conditioning images + the noisy image, already concatenated).
        out_channels: output channels.
        channels: width of each level; ``len(channels) - 1`` downsamplings.
        cond_channels: width of the noise embedding and cond vector.
        num_res_blocks: encoder blocks per level (int or one per level); the decoder has one more per level.
        attention_levels: per level, whether its blocks carry self-attention (default: the deepest only).
        mid_attention: self-attention in the two middle blocks.
        head_dim: channels per attention head.
        gn_group_size: target channels per GroupNorm group.
        noise_cond_embedding: add a second Fourier embedding for the noise level of an augmented conditioning
            (DIAMOND's ``noise_cond_emb``; no parameters), passed as ``c_noise_cond`` to :meth:`forward`.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 64, 128, 256),
        cond_channels: int = 2048,
        num_res_blocks: int | Sequence[int] = 2,
        attention_levels: Sequence[bool] | None = None,
        mid_attention: bool = True,
        head_dim: int = ATTN_HEAD_DIM,
        gn_group_size: int = GN_GROUP_SIZE,
        noise_cond_embedding: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        channels = [int(c) for c in channels]
        n_levels = len(channels)
        if isinstance(num_res_blocks, int):
            depths = [num_res_blocks] * n_levels
        else:
            depths = [int(d) for d in num_res_blocks]
        attn = [False] * (n_levels - 1) + [True] if attention_levels is None else [as_flag(a) for a in attention_levels]
        if len(depths) != n_levels or len(attn) != n_levels:
            raise ValueError("num_res_blocks and attention_levels need one entry per level of channels")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_down = n_levels - 1
        self.pad_multiple = int(2**self.num_down)
        self.use_noise_cond = noise_cond_embedding

        def block(ci: int, co: int, a: bool) -> ResBlock:
            return ResBlock(ci, co, cond_channels, spatial_dims, a, head_dim, gn_group_size)

        self.noise_emb = FourierFeatures(cond_channels)
        self.noise_cond_emb = FourierFeatures(cond_channels) if noise_cond_embedding else nn.Identity()
        self.cond_proj = nn.Sequential(
            nn.Linear(cond_channels, cond_channels), nn.SiLU(), nn.Linear(cond_channels, cond_channels)
        )
        self.conv_in = _conv(spatial_dims, in_channels, channels[0], 3)

        encoder, decoder = [], []
        for i, (n, a) in enumerate(zip(depths, attn)):
            c_prev, c = channels[max(0, i - 1)], channels[i]
            down: nn.Module = nn.Identity() if i == 0 else _conv(spatial_dims, c_prev, c_prev, 3, stride=2)
            if i > 0:
                nn.init.orthogonal_(down.weight)
            encoder.append(_EncoderLevel(down, [block(c_prev if j == 0 else c, c, a) for j in range(n)]))
            up: nn.Module = nn.Identity() if i == n_levels - 1 else _Upsample(c, spatial_dims)
            dec_blocks = [block(2 * c, c, a) for _ in range(n)] + [block(c + c_prev, c_prev, a)]
            decoder.append(_DecoderLevel(up, dec_blocks))
        self.encoder = nn.ModuleList(encoder)
        self.middle = nn.ModuleList([block(channels[-1], channels[-1], mid_attention) for _ in range(2)])
        self.decoder = nn.ModuleList(decoder[::-1])

        self.norm_out = nn.GroupNorm(num_groups(channels[0], gn_group_size), channels[0], eps=GN_EPS)
        self.conv_out = _conv(spatial_dims, channels[0], out_channels, 3)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x: Tensor, c_noise: Tensor, c_noise_cond: Tensor | None = None) -> Tensor:
        """Map ``x`` (B, in_channels, *spatial) and ``c_noise`` (B,) to (B, out_channels, *spatial).

        Args:
            x: network input, any spatial size (padded internally to a multiple of ``2**(levels - 1)``).
            c_noise: noise conditioning, one value per sample (or one value for all).
            c_noise_cond: noise level of the augmented conditioning (only with ``noise_cond_embedding``).
        """
        emb = self.noise_emb(c_noise.reshape(-1).expand(x.shape[0]))
        if self.use_noise_cond and c_noise_cond is not None:
            emb = emb + self.noise_cond_emb(c_noise_cond.reshape(-1).expand(x.shape[0]))
        cond = self.cond_proj(emb)

        h = self.conv_in(x)
        sizes = spatial_sizes(x, self.spatial_dims)
        h = F.pad(h, padding_to_multiple(sizes, self.pad_multiple))

        skips: list[Tensor] = []
        for level in self.encoder:
            h = level(h, cond, skips)
        for block in self.middle:
            h = block(h, cond)
        for level in self.decoder:
            h = level(h, cond, skips)

        for d in range(self.spatial_dims):
            h = h.narrow(2 + d, 0, sizes[d])
        return self.conv_out(F.silu(self.norm_out(h)))


PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    # 3D EDM: input [LR trilinearly upsampled, noisy HR]; 50,713,153 parameters (paper: 50.71 M)
    "3d": dict(
        spatial_dims=3, in_channels=2, out_channels=1, channels=(32, 64, 128, 256), cond_channels=1024,
        num_res_blocks=2, attention_levels=(False, False, False, True),
    ),
    # 2.5D EDM: input [previous LR slice, target LR slice (both upsampled), noisy HR]; 51,144,577 (paper: 51.14 M)
    "2.5d": dict(
        spatial_dims=2, in_channels=3, out_channels=1, channels=(64, 64, 128, 256), cond_channels=2048,
        num_res_blocks=2, attention_levels=(False, False, False, True),
    ),
}


def adagn_unet_paper_3d(**overrides: Any) -> AdaGNUNet:
    """The 3D EDM study's network (50.71 M parameters); keyword ``overrides`` replace config entries."""
    return AdaGNUNet(**{**PAPER_CONFIGS["3d"], **overrides})


def adagn_unet_paper_2p5d(**overrides: Any) -> AdaGNUNet:
    """The 2.5D EDM study's network (51.14 M parameters); keyword ``overrides`` replace config entries."""
    return AdaGNUNet(**{**PAPER_CONFIGS["2.5d"], **overrides})
