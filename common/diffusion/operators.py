"""Forward operators ``A`` for measurement-guided sampling: antialiased downsamplers and a learned degradation.

SRMRI (methods.md §3) chooses ``A`` at inference: a downsampler (bicubic by default; box, bilinear and Lanczos-3
within 0.15 dB of it in the paper) or a 2-layer CNN before a fixed downsampler, fitted on registered LR/HR pairs.

Antialiasing follows PIL's ``Image.resize`` (and Matlab's ``imresize``): for a reduction by ``f`` the kernel is
stretched by ``f``, ``w(d) = k(d/f)/f`` at HR offset ``d`` from the LR voxel centre. The centres sit at HR index
``f·i + (f − 1)/2`` (methods.md §0), so every operator here shares the LR geometry of :mod:`common.transforms.degrade`; trailing
HR voxels that do not fill a whole LR voxel are dropped, as there. At the borders the kernel is truncated to the
image and renormalised (PIL's rule), so constants are preserved everywhere. Each axis is one strided conv1d:
differentiable, any device, 2D or 3D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.transforms.upsample import keys_cubic

__all__ = [
    "lanczos3",
    "DOWNSAMPLE_KERNELS",
    "antialias_weights",
    "Downsample",
    "downsample",
    "LearnedOperator",
    "fit_learned_operator",
]


def lanczos3(t: Tensor) -> Tensor:
    """Lanczos-3 window ``sinc(t)·sinc(t/3)`` for ``|t| < 3`` (Duchon 1979; PIL's LANCZOS)."""
    return torch.where(t.abs() < 3, torch.sinc(t) * torch.sinc(t / 3), torch.zeros_like(t))


def _box(t: Tensor) -> Tensor:
    return ((t > -0.5) & (t <= 0.5)).to(t.dtype)  # PIL's half-open box


def _triangle(t: Tensor) -> Tensor:
    return (1 - t.abs()).clamp(min=0)


# name -> (kernel on LR units, support radius in LR units)
_KERNELS: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    "bicubic": (lambda t: keys_cubic(t, -0.5), 2.0),  # Keys a = -0.5, as PIL and Matlab
    "box": (_box, 0.5),
    "bilinear": (_triangle, 1.0),
    "lanczos": (lanczos3, 3.0),
}


DOWNSAMPLE_KERNELS = tuple(_KERNELS)


def antialias_weights(kernel: str, factor: int) -> tuple[Tensor, int]:
    """Taps of the stretched kernel for a reduction by ``factor``: ``(weights, first)``, weights summing to 1.

    LR voxel ``i`` reads HR voxels ``f·i + first + t`` with weight ``weights[t]``; float64.

    Args:
        kernel: one of :data:`DOWNSAMPLE_KERNELS`.
        factor: integer reduction factor (>= 1).
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {DOWNSAMPLE_KERNELS}, got {kernel!r}")
    fn, support = _KERNELS[kernel]
    reach = math.ceil(support * factor)
    m = torch.arange(-reach, factor + reach, dtype=torch.float64)  # HR offsets from the block start f·i
    w = fn((m - (factor - 1) / 2) / factor)
    keep = (w != 0).nonzero().flatten()
    lo, hi = int(keep[0]), int(keep[-1]) + 1
    w = w[lo:hi]
    return w / w.sum(), int(m[lo])


def _factors(factors: Sequence[int] | int, ndim: int) -> tuple[int, ...]:
    if isinstance(factors, int):
        factors = (factors,) * ndim
    out = tuple(int(f) for f in factors)
    if len(out) != ndim or any(f < 1 for f in out):
        raise ValueError(f"need {ndim} integer factors >= 1, got {factors}")
    return out


class Downsample(nn.Module):
    """Antialiased downsampling of (B, C, *spatial) by an integer factor per axis (PIL/Matlab-style, §0 geometry).

    Args:
        factors: reduction per spatial axis, e.g. (2, 2) or (1, 2, 2); an int applies to every axis of a 2D image.
        kernel: "bicubic" (default), "box" (equals :class:`common.transforms.BlockAverage`), "bilinear" or "lanczos".
    """

    def __init__(self, factors: Sequence[int] | int, kernel: str = "bicubic"):
        super().__init__()
        if kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {DOWNSAMPLE_KERNELS}, got {kernel!r}")
        self.factors = _factors(factors, 2) if isinstance(factors, int) else _factors(factors, len(factors))
        self.kernel = kernel
        self.first: list[int] = []
        for axis, f in enumerate(self.factors):
            w, first = antialias_weights(kernel, f)
            self.register_buffer(f"w{axis}", w.reshape(1, 1, -1), persistent=False)
            self.first.append(first)

    def lr_shape(self, hr_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the result for an HR spatial shape."""
        return tuple(s // f for s, f in zip(hr_shape, self.factors))

    def _axis(self, v: Tensor, axis: int) -> Tensor:
        # v: (N, 1, L) -> (N, 1, L // f); zero padding, then divide by the kernel mass inside the image (PIL)
        f, first = self.factors[axis], self.first[axis]
        w = getattr(self, f"w{axis}").to(v.dtype)
        length, n_out = v.shape[-1], v.shape[-1] // f
        left = max(0, -first)
        right = max(0, f * (n_out - 1) + first + w.shape[-1] - length)
        start = first + left  # first tap's index in the padded signal, for i = 0

        def conv(u: Tensor) -> Tensor:
            return F.conv1d(F.pad(u, (left, right))[..., start:], w, stride=f)[..., :n_out]

        mass = conv(v.new_ones(1, 1, length))
        return conv(v) / mass

    def forward(self, x: Tensor) -> Tensor:
        nd = len(self.factors)
        if x.ndim != nd + 2:
            raise ValueError(f"expected (B, C, {nd} spatial axes), got shape {tuple(x.shape)}")
        if any(s < f for s, f in zip(x.shape[2:], self.factors)):
            raise ValueError(f"image {tuple(x.shape[2:])} is smaller than the factors {self.factors}")
        if self.kernel == "box":  # the block mean: bit-identical to BlockAverage
            sizes = [(s // f) * f for s, f in zip(x.shape[2:], self.factors)]
            x = x[(slice(None), slice(None)) + tuple(slice(0, s) for s in sizes)]
            return {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd](x, self.factors, self.factors)
        for axis, f in enumerate(self.factors):
            if f == 1:
                continue
            moved = x.movedim(axis + 2, -1)
            shape = moved.shape
            out = self._axis(moved.reshape(-1, 1, shape[-1]), axis)
            x = out.reshape(*shape[:-1], out.shape[-1]).movedim(-1, axis + 2)
        return x

    def extra_repr(self) -> str:
        return f"factors={self.factors}, kernel={self.kernel!r}"


def downsample(x: Tensor, factors: Sequence[int] | int, kernel: str = "bicubic") -> Tensor:
    """Functional form of :class:`Downsample` for (B, C, *spatial) tensors."""
    if isinstance(factors, int):
        factors = (factors,) * (x.ndim - 2)
    return Downsample(factors, kernel).to(x.device)(x)


class LearnedOperator(nn.Module):
    """SRMRI's learned degradation (methods.md §3): conv3 1→64, ReLU, conv3 64→1, then a fixed downsampler.

    Channels are processed independently. With ``identity_init`` two hidden channels carry ``relu(x)`` and
    ``relu(−x)`` and the output subtracts them, so the untrained operator is exactly the fixed downsampler and
    fitting starts from it (the other 62 channels keep PyTorch's init, their output weights start at 0).

    Args:
        factors: reduction per spatial axis (its length sets 2D or 3D).
        kernel: the fixed downsampler's kernel (see :class:`Downsample`).
        channels: hidden width (64 in the paper).
        identity_init: start from the identity map (see above).
        padding_mode: padding of the 3x3(x3) convolutions ("zeros" as PyTorch's default, or "replicate").
    """

    def __init__(
        self,
        factors: Sequence[int],
        kernel: str = "bicubic",
        channels: int = 64,
        identity_init: bool = True,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        nd = len(factors)
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[nd]
        self.net = nn.Sequential(
            conv(1, channels, 3, padding=1, padding_mode=padding_mode),
            nn.ReLU(),
            conv(channels, 1, 3, padding=1, padding_mode=padding_mode),
        )
        self.down = Downsample(factors, kernel)
        if identity_init:
            self._identity_init()

    @torch.no_grad()
    def _identity_init(self) -> None:
        first, last = self.net[0], self.net[2]
        centre = tuple(s // 2 for s in first.kernel_size)
        for c, sign in ((0, 1.0), (1, -1.0)):
            first.weight[c].zero_()
            first.weight[c][(0, *centre)] = sign
            first.bias[c] = 0.0
        last.weight.zero_()  # the other channels join once their output weights move from 0 (first step)
        last.weight[(0, 0, *centre)] = 1.0
        last.weight[(0, 1, *centre)] = -1.0
        last.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        v = self.net(x.reshape(b * c, 1, *x.shape[2:]))
        return self.down(v).reshape(b, c, *self.down.lr_shape(x.shape[2:]))


def fit_learned_operator(
    operator: nn.Module,
    hr_images: Tensor,
    lr_images: Tensor,
    *,
    steps: int = 1000,
    learning_rate: float = 1e-3,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Fit ``operator`` so that ``operator(hr) ≈ lr`` on registered pairs (MSE, Adam); returns the loss per step.

    Args:
        operator: e.g. a :class:`LearnedOperator`; trained in place.
        hr_images: (N, C, *spatial) HR images.
        lr_images: (N, C, *lr_spatial) the matching LR images, on the operator's LR grid.
        steps: optimisation steps.
        learning_rate: Adam learning rate.
        batch_size: pairs per step (all when None).
        generator: random generator for the minibatches.
    """
    if hr_images.shape[0] != lr_images.shape[0]:
        raise ValueError("hr_images and lr_images must hold the same number of pairs")
    opt = torch.optim.Adam(operator.parameters(), lr=learning_rate)
    n = hr_images.shape[0]
    losses = []
    operator.train()
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            hr, lr = hr_images, lr_images
        else:
            idx = torch.randperm(n, generator=generator)[:batch_size].to(hr_images.device)
            hr, lr = hr_images[idx], lr_images[idx]
        loss = F.mse_loss(operator(hr), lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    operator.eval()
    return losses
