"""Attention residual U-Net with AdaDM: the single-pass generator of the 3T -> 7T thesis (methods.md §4).

Built like the DDPM U-Net of Ho et al. (2020), as MONAI's generative ``DiffusionModelUNet`` is, without the time
embedding; written from that structure and the thesis's description, not copied:

- input: the target LR slice and its 2 or 4 neighbouring LR slices as channels, all upsampled onto the HR grid;
  output: the HR slice (2D; ``spatial_dims=3`` builds the same network for volumes);
- stem conv3 to ``channels[0]``; encoder stage ``i`` = ``num_res_blocks`` :class:`AdaDMResBlock` (the first from
  the previous stage's width), each followed by cross-attention to the covariate tokens when
  ``cross_attention_levels[i]``; 2x max-pooling between stages;
- bottleneck at the deepest resolution: residual block, self-attention, cross-attention (when context is on),
  residual block;
- decoder stage ``i`` (deepest first): nearest x2 upsampling + conv3 to ``channels[i]`` (not for the deepest stage),
  concatenation with the output of encoder stage ``i``, ``num_res_blocks`` residual blocks (the first from
  ``2 * channels[i]``) with the same cross-attention as encoder stage ``i``: one skip per stage;
- head GroupNorm-SiLU-conv3, zero-initialised, so an untrained network outputs 0, or with ``residual_index`` the
  input channel ``residual_index`` (the upsampled target slice): the network learns the residual ``HR - LR↑``;
- attention (:class:`SpatialAttention`): GroupNorm, q/k/v projections, multi-head
  ``scaled_dot_product_attention`` over the flattened voxels, zero-initialised output projection, residual; for
  cross-attention the keys and values come from the :class:`CovariateEncoder` tokens;
- covariates (:data:`COVARIATES`): scaled age, sex, diagnosis group and slice position relative to the middle
  slice, each one token; NaN means unknown, which has its own learned embedding;
- inputs of any size: features zero-padded after the stem (at the end of each axis) to a multiple of
  ``2**(len(channels) - 1)``, cropped back before the head.

TorchScript-scriptable; ``forward(x)`` alone (what ``verify_net_in_out`` and ``ckpt_export`` call) treats every
covariate as unknown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Pool
from torch import Tensor, nn

from common.networks.adagn_unet import padding_to_multiple, spatial_sizes

from common.utils import as_flag

from .adadm import AdaDMResBlock, same_conv

__all__ = ["COVARIATES", "CovariateEncoder", "SpatialAttention", "AttentionResUNet"]

#: the entries of the context vector, in order: age (scaled), sex (0 female, 1 male), group (0 healthy/SCD,
#: 1 MCI/dementia), slice position relative to the middle slice; NaN = unknown
COVARIATES = ("age", "sex", "group", "slice_position")
COVARIATE_KINDS = ("continuous", "categorical", "categorical", "continuous")


class _ContinuousToken(nn.Module):
    """``Linear(1, d)`` of a value per sample, replaced by a learned "unknown" vector where the value is NaN."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(1, dim)
        self.unknown = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, v: Tensor) -> Tensor:
        known = ~torch.isnan(v)
        # zero the NaNs before the Linear, not after: NaN * 0 would reach the Linear's gradient
        emb = self.linear(torch.where(known, v, torch.zeros_like(v)).unsqueeze(-1)).float()
        return torch.where(known.unsqueeze(-1), emb, self.unknown.float().expand_as(emb))


class _CategoricalToken(nn.Module):
    """``nn.Embedding(n + 1, d)`` of a category ``0..n-1``; the last index is "unknown" (NaN or out of range)."""

    def __init__(self, num_categories: int, dim: int) -> None:
        super().__init__()
        self.num_categories = int(num_categories)
        self.embedding = nn.Embedding(num_categories + 1, dim)

    def forward(self, v: Tensor) -> Tensor:
        r = torch.nan_to_num(v, nan=-1.0).round()
        valid = (r >= 0) & (r < self.num_categories)  # a datalist's -1 or 9 for "unknown" is unknown too
        idx = torch.where(valid, r, torch.full_like(r, float(self.num_categories))).long()
        return self.embedding(idx).float()


class CovariateEncoder(nn.Module):
    """Context vector (B, K) -> tokens (B, K, context_dim), one token per covariate plus a learned type embedding.

    Args:
        context_dim: token width.
        kinds: per covariate, ``"continuous"`` (``Linear(1, d)`` of the value) or ``"categorical"``
            (``nn.Embedding(num_categories + 1, d)``); default the thesis's :data:`COVARIATES`.
        num_categories: categories of each categorical covariate (2; one more index is "unknown").

    NaN means unknown for every entry: a learned vector replaces the continuous value's embedding, the last index
    of the categorical embedding is used (also for a category outside ``0..num_categories-1``).
    """

    def __init__(
        self, context_dim: int, kinds: Sequence[str] = COVARIATE_KINDS, num_categories: int = 2
    ) -> None:
        super().__init__()
        tokens: list[nn.Module] = []
        for kind in kinds:
            if kind == "continuous":
                tokens.append(_ContinuousToken(context_dim))
            elif kind == "categorical":
                tokens.append(_CategoricalToken(num_categories, context_dim))
            else:
                raise ValueError(f"covariate kind must be 'continuous' or 'categorical', got {kind!r}")
        self.kinds = tuple(kinds)
        self.num_covariates = len(tokens)
        self.context_dim = int(context_dim)
        self.tokens = nn.ModuleList(tokens)
        self.type_embedding = nn.Parameter(torch.randn(len(tokens), context_dim) * 0.02)

    def forward(self, context: Tensor) -> Tensor:
        """Tokens (B, K, context_dim) in float32 of ``context`` (B, K), NaN = unknown."""
        if context.dim() != 2 or context.shape[1] != self.num_covariates:
            raise ValueError(f"context must be (B, {self.num_covariates}), got {context.shape}")
        context = context.float()
        out: list[Tensor] = []
        for i, token in enumerate(self.tokens):
            out.append(token(context[:, i]))
        return torch.stack(out, dim=1) + self.type_embedding.float()


class SpatialAttention(nn.Module):
    """Multi-head attention of a feature map's voxels: self-attention, or cross-attention to context tokens.

    ``x + proj(attn(q = GN(x), k, v))`` with ``k, v`` from ``GN(x)`` (``context_dim=None``) or from the tokens;
    the voxels of a 2D or 3D map are flattened to one sequence. The output projection starts at zero, so the block
    starts as the identity.

    Args:
        channels: channels of ``x``.
        num_head_channels: channels per head (heads = ``channels // num_head_channels``, at least 1).
        norm_num_groups: GroupNorm groups.
        context_dim: token width for cross-attention; None for self-attention.
        norm_eps: GroupNorm epsilon.
    """

    def __init__(
        self,
        channels: int,
        num_head_channels: int = 32,
        norm_num_groups: int = 32,
        context_dim: Optional[int] = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_heads = max(1, channels // num_head_channels)
        if channels % self.num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by the number of heads ({self.num_heads})")
        self.cross = context_dim is not None
        kv_dim = channels if context_dim is None else int(context_dim)
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(kv_dim, channels)
        self.to_v = nn.Linear(kv_dim, channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``x`` (B, C, *spatial); ``context`` (B, T, context_dim) tokens, required for cross-attention."""
        b, c = x.shape[0], x.shape[1]
        spatial: list[int] = list(x.shape[2:])
        # channels-last sequence (B, N, C): a view when x is channels_last, and what nn.Linear expects
        h = self.norm(x).movedim(1, -1).reshape(b, -1, c)
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs context tokens")
            kv = context.to(h.dtype)
        else:
            kv = h
        q, k, v = self._heads(self.to_q(h)), self._heads(self.to_k(kv)), self._heads(self.to_v(kv))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        y = self.proj(y)
        shape = [b] + spatial + [c]
        return x + y.reshape(shape).movedim(-1, 1)


class _NoAttention(nn.Module):
    """Placeholder of a stage without cross-attention (keeps every stage's loop one TorchScript signature)."""

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        return x


class _Stage(nn.Module):
    """Residual blocks, each followed by its (cross-)attention or a placeholder."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)

    def forward(self, h: Tensor, tokens: Optional[Tensor]) -> Tensor:
        for block, attn in zip(self.blocks, self.attns):
            h = attn(block(h), tokens)
        return h


class _Upsample(nn.Module):
    """Nearest x2 (float scale factor: TorchScript fails on an int one) then conv3."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = same_conv(spatial_dims, in_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionResUNet(nn.Module):
    """The thesis's generator: AdaDM residual U-Net with bottleneck self-attention and covariate cross-attention.

    Args:
        spatial_dims: 2 (slices) or 3.
        in_channels: input channels: the target LR slice and 2 or 4 neighbours (3 or 5), upsampled to the HR grid.
        out_channels: output channels (the HR slice).
        channels: width of each stage; ``len(channels) - 1`` poolings.
        num_res_blocks: residual blocks per encoder and per decoder stage.
        norm_num_groups: GroupNorm groups (must divide every width, and twice it).
        cross_attention_levels: per stage, cross-attention after each residual block (thesis: from the third
            stage on); the bottleneck has cross-attention whenever context is on.
        context_dim: covariate token width; 0 or None disables the covariates and every cross-attention (ablation).
        num_head_channels: channels per attention head.
        use_adadm: AdaDM in every residual block (False: plain residual blocks, the ablation).
        residual_index: when set, ``output = x[:, residual_index] + head(h)``: the untrained network returns that
            input channel (the bundle's centre, target slice); needs ``out_channels == 1``.
        covariate_kinds: the kind of each context entry (see :class:`CovariateEncoder`).
        norm_eps: GroupNorm epsilon.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 128, 128, 128),
        num_res_blocks: int = 3,
        norm_num_groups: int = 32,
        cross_attention_levels: Sequence[bool] = (False, False, True, True),
        context_dim: Optional[int] = 64,
        num_head_channels: int = 32,
        use_adadm: bool = True,
        residual_index: Optional[int] = None,
        covariate_kinds: Sequence[str] = COVARIATE_KINDS,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        channels = [int(c) for c in channels]
        levels = [as_flag(a) for a in cross_attention_levels]
        if len(levels) != len(channels):
            raise ValueError("cross_attention_levels needs one entry per stage of channels")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be at least 1, got {num_res_blocks}")
        if residual_index is not None:
            if not -in_channels <= residual_index < in_channels:
                raise ValueError(f"residual_index {residual_index} is not a channel of {in_channels}")
            if out_channels != 1:
                raise ValueError("residual_index needs out_channels == 1")
            residual_index = residual_index % in_channels
        use_context = bool(context_dim)
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.channels = tuple(channels)
        self.pad_multiple = int(2 ** (len(channels) - 1))
        self.residual_index: Optional[int] = residual_index
        self.num_covariates = len(covariate_kinds)

        def res(ci: int, co: int) -> nn.Module:
            return AdaDMResBlock(spatial_dims, ci, co, norm_num_groups, use_adadm, norm_eps)

        def cross(c: int, on: bool) -> nn.Module:
            if use_context and on:
                return SpatialAttention(c, num_head_channels, norm_num_groups, int(context_dim or 0), norm_eps)
            return _NoAttention()

        self.covariate_encoder: Optional[CovariateEncoder] = (
            CovariateEncoder(int(context_dim or 0), covariate_kinds) if use_context else None
        )
        self.stem = same_conv(spatial_dims, in_channels, channels[0], 3)
        pool_type: Any = Pool[Pool.MAX, spatial_dims]
        self.pool = pool_type(kernel_size=2)

        encoder, decoder, ups = [], [], []
        for i, (c, on) in enumerate(zip(channels, levels)):
            c_in = channels[max(0, i - 1)]
            encoder.append(
                _Stage([res(c_in if j == 0 else c, c) for j in range(num_res_blocks)],
                       [cross(c, on) for _ in range(num_res_blocks)])
            )
            decoder.append(
                _Stage([res(2 * c if j == 0 else c, c) for j in range(num_res_blocks)],
                       [cross(c, on) for _ in range(num_res_blocks)])
            )
            ups.append(nn.Identity() if i == len(channels) - 1 else _Upsample(spatial_dims, channels[i + 1], c))
        self.encoder = nn.ModuleList(encoder)
        c = channels[-1]
        self.mid_block1 = res(c, c)
        self.mid_attn = SpatialAttention(c, num_head_channels, norm_num_groups, None, norm_eps)
        self.mid_cross = cross(c, True)
        self.mid_block2 = res(c, c)
        self.ups = nn.ModuleList(ups[::-1])
        self.decoder = nn.ModuleList(decoder[::-1])

        self.head = nn.Sequential(
            nn.GroupNorm(norm_num_groups, channels[0], eps=norm_eps),
            nn.SiLU(),
            same_conv(spatial_dims, channels[0], out_channels, 3, zero=True),  # untrained output: 0 (+ the residual)
        )

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """The HR slice (B, out_channels, *spatial) from ``x`` (B, in_channels, *spatial), any spatial size.

        Args:
            x: the LR slice stack on the HR grid.
            context: covariates (B, 4) float ``[age_scaled, sex, group, slice_position]`` (see
                :data:`COVARIATES`), NaN = unknown; None = every covariate unknown. Ignored without context.
        """
        tokens: Optional[Tensor] = None
        encoder = self.covariate_encoder
        if encoder is not None:
            if context is None:
                context = torch.full([x.shape[0], self.num_covariates], math.nan, device=x.device)
            tokens = encoder(context.to(x.device))

        h = self.stem(x)
        sizes = spatial_sizes(x, self.spatial_dims)
        h = F.pad(h, padding_to_multiple(sizes, self.pad_multiple))

        skips: list[Tensor] = []
        for i, stage in enumerate(self.encoder):
            if i > 0:
                h = self.pool(h)
            h = stage(h, tokens)
            skips.append(h)
        h = self.mid_block1(h)
        h = self.mid_cross(self.mid_attn(h), tokens)
        h = self.mid_block2(h)
        for up, stage in zip(self.ups, self.decoder):
            h = stage(torch.cat([up(h), skips.pop()], dim=1), tokens)

        for d in range(self.spatial_dims):
            h = h.narrow(2 + d, 0, sizes[d])
        out = self.head(h)
        idx = self.residual_index
        if idx is not None:
            # no cast: under autocast the bf16 head output is promoted to the input's float32 (the slice kept exact)
            out = out + x[:, idx : idx + 1]
        return out
