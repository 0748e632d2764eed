"""Adaptive deviation modulation (AdaDM) and the AdaDM residual block of the 3T -> 7T thesis generator (methods.md §4).

AdaDM (Liu et al. 2023, "AdaDM: Enabling Normalization for Image Super-Resolution", reference code njulj/AdaDM)
observes that normalisation inside a super-resolution network removes the range of the features, which the output
needs; it gives it back by scaling the residual branch with a learned power of the block input's deviation:

    h <- h * exp(w * ln(σ(x) + eps) + b) = h * e^b * (σ(x) + eps)^w,

with σ(x) the standard deviation of each sample's block input over all its non-batch entries (channels and voxels)
and w, b learned scalars initialised to w = 1, b = 0 (at initialisation the branch is scaled by σ(x) itself).

:class:`AdaDMResBlock` is the residual block of the thesis's U-Net (the DDPM block of Ho et al. without the time
embedding): ``(GroupNorm, SiLU, conv3) x 2`` on the residual branch, AdaDM on the branch's output, plus the skip
(a 1x1 conv when the width changes). ``use_adadm=False`` gives the plain residual block of the ablation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from common.utils import as_flag

__all__ = ["same_conv", "AdaDM", "AdaDMResBlock"]


def same_conv(spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int, zero: bool = False) -> nn.Module:
    """A size-preserving ``spatial_dims``-D convolution from MONAI's factory; ``zero``: weights and bias at 0."""
    conv_type: Any = Conv[Conv.CONV, spatial_dims]
    conv = conv_type(in_ch, out_ch, kernel_size=kernel_size, padding=kernel_size // 2)
    if zero:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


def _deviation(x: Tensor) -> Tensor:
    """Per-sample standard deviation over all non-batch entries, in float32 (differentiable)."""
    # float32: under bf16 autocast the sum of 10^5-10^6 squares loses the deviation's digits
    return x.float().flatten(1).std(dim=1)


def _sample_rows(x: Tensor) -> Optional[Tensor]:
    """``x`` as (B, entries per sample) without a copy when each sample is one contiguous block, else None."""
    b = x.shape[0]
    if x.is_contiguous():
        return x.reshape(b, -1)
    channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.dim() in (4, 5) and x.is_contiguous(memory_format=channels_last):
        return x.movedim(1, -1).reshape(b, -1)
    return None


def _deviation_float64(x: Tensor) -> Tensor:
    """:func:`_deviation` from the sum and the sum of squares of every entry accumulated in float64."""
    dims = list(range(1, x.dim()))
    n = x[0].numel()
    total = x.sum(dim=dims, dtype=torch.float64)
    squares = torch.linalg.vector_norm(x, dim=dims, dtype=torch.float64).square()
    return ((squares - total * total / n) / (n - 1)).clamp(min=0).sqrt().float()


def _deviation_no_grad(x: Tensor, piece: int = 1024, max_mean_sq_to_var: float = 100.0) -> Tensor:
    """:func:`_deviation` without copying ``x``, cheaper on CPU: no float32 copy, no layout change of a
    channels-last ``x``, vectorised reductions instead of Welford's (docs/performance.md).

    A float32 (or float64) ``x`` gets float64 sums of every entry: exact to float32 rounding, as its entries are
    exact in float64. A bf16/fp16 ``x`` (autocast inference, where the scale it gives is rounded to bf16 anyway)
    gets float32 sums of pieces of ``piece`` entries with float64 totals, half the cost for 8x16x256x256: each
    piece's sums are accurate to a few float32 ulps, and the totals lose at most mean²/var times that in the
    difference of the sums, so while mean² <= ``max_mean_sq_to_var`` * var (activations are far below it) the
    result is within 1e-5 relative of :func:`_deviation`. Beyond it, for a constant sample, a layout that is not
    one block per sample, or in a traced program (``torch.export``, ``torch.compile``: no data-dependent choice),
    the float64 sums of every entry run.

    Args:
        x: the block input (B, ...).
        piece: entries per float32 partial sum (default arguments, not module constants: TorchScript compiles this
            function and reads no global numbers).
        max_mean_sq_to_var: the conditioning above which float64 sums take over.
    """
    if x.dtype != torch.bfloat16 and x.dtype != torch.float16:
        return _deviation_float64(x)
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling():  # torch.export / torch.compile trace no data-dependent branch
            return _deviation_float64(x)
    rows = _sample_rows(x)
    n = x[0].numel()
    full = (n // piece) * piece
    if rows is None or full == 0:
        return _deviation_float64(x)
    pieces = rows[:, :full].reshape(rows.shape[0], -1, piece)
    total = pieces.sum(-1, dtype=torch.float32).double().sum(1)
    squares = torch.linalg.vector_norm(pieces, dim=-1, dtype=torch.float32).double().square().sum(1)
    if full < n:
        tail = rows[:, full:]
        total = total + tail.sum(1, dtype=torch.float64)
        squares = squares + torch.linalg.vector_norm(tail, dim=1, dtype=torch.float64).square()
    var = (squares - total * total / n) / (n - 1)
    if bool(((total / n).square() > max_mean_sq_to_var * var).any()):
        return _deviation_float64(x)
    return var.clamp(min=0).sqrt().float()


class AdaDM(nn.Module):
    """``forward(h, x) = h * exp(w * ln(std(x) + eps) + b)``, std per sample over all non-batch dims of ``x``.

    Args:
        eps: added to the standard deviation inside the log (a constant input, e.g. an empty slice, gives a finite
            scale ``eps^w`` and, with torch's ``std`` backward, a zero gradient instead of ``-inf``/NaN).
        init_weight: initial ``w`` (1: the branch starts scaled by the input's deviation, as in the paper).
        init_bias: initial ``b`` (0).
    """

    def __init__(self, eps: float = 1e-6, init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.full((1,), float(init_weight)))
        self.bias = nn.Parameter(torch.full((1,), float(init_bias)))

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        """Scale ``h`` (B, ...) by the modulated deviation of ``x`` (B, ...), one factor per sample.

        Args:
            h: the residual branch's output.
            x: the block's input (its statistics only; any shape with the same batch size).
        """
        std = _deviation(x) if torch.is_grad_enabled() and x.requires_grad else _deviation_no_grad(x)
        scale = torch.exp(self.weight * torch.log(std + self.eps) + self.bias)
        while scale.dim() < h.dim():
            scale = scale.unsqueeze(-1)
        return h * scale.to(h.dtype)


class AdaDMResBlock(nn.Module):
    """Residual block ``skip(x) + AdaDM(branch(x), x)``, ``branch = (GroupNorm, SiLU, conv3) x 2``, 2D or 3D.

    Args:
        spatial_dims: number of spatial axes (2 or 3).
        in_channels: input channels.
        out_channels: output channels (a 1x1 conv projects the skip when it differs from ``in_channels``).
        norm_num_groups: GroupNorm groups; must divide both ``in_channels`` and ``out_channels``.
        use_adadm: modulate the branch with :class:`AdaDM`; False gives a plain residual block (the ablation),
            with no AdaDM parameters.
        norm_eps: GroupNorm epsilon (1e-6, as MONAI's diffusion U-Net).
        adadm_eps: the eps of :class:`AdaDM`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm_num_groups: int = 32,
        use_adadm: bool = True,
        norm_eps: float = 1e-6,
        adadm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        for c in (in_channels, out_channels):
            if c % norm_num_groups:
                raise ValueError(f"norm_num_groups ({norm_num_groups}) must divide the block's channels ({c})")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = same_conv(spatial_dims, in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        # Zero-initialised (weights and bias): the branch outputs 0, so the block starts as its skip and a deep stack
        # starts as a short chain of convolutions (well-conditioned, as in Ho et al.'s DDPM U-Net). It matters more
        # with AdaDM: the branch is multiplied by std(x), which is unbounded, and a random branch would compound
        # that gain block after block at initialisation.
        self.conv2 = same_conv(spatial_dims, out_channels, out_channels, 3, zero=True)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else same_conv(spatial_dims, in_channels, out_channels, 1))
        self.use_adadm = as_flag(use_adadm)
        self.adadm = AdaDM(adadm_eps) if self.use_adadm else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.adadm is not None:
            h = self.adadm(h, x)
        return self.skip(x) + h
