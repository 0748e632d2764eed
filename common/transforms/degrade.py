"""Degradations that simulate a low-resolution scan from a high-resolution one, as MONAI-style transforms.

Every resampling degradation reduces each spatial axis by an integer factor f and puts LR voxel i at HR index
f*i + (f - 1)/2 (methods.md §0), so all of them share one LR affine (:func:`common.data.lr_affine`) and any SR output
maps back with :func:`common.data.hr_affine`. Trailing HR voxels that do not fill a whole LR voxel are dropped.
Inputs are channel-first arrays (C, *spatial), 2D or 3D; a MetaTensor input gets its affine updated.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandRicianNoise, Transform
from monai.utils import convert_to_dst_type
from scipy import ndimage

from common.data.io import lr_affine

__all__ = [
    "Degradation",
    "BlockAverage",
    "ThickSlices",
    "KSpaceTruncation",
    "GaussianDecimation",
    "SplineDownsample",
    "RicianNoise",
    "Degraded",
    "BlockAveraged",
    "ThickSlicesd",
    "KSpaceTruncationd",
    "GaussianDecimationd",
    "SplineDownsampled",
    "RicianNoised",
    "BlockDownscaled",
    "DEGRADATIONS",
    "degradation_by_name",
]


def _factors(factors: Sequence[int] | int, ndim: int) -> tuple[int, ...]:
    if isinstance(factors, int):
        factors = (factors,) * ndim
    factors = tuple(int(f) for f in factors)
    if len(factors) != ndim or any(f < 1 for f in factors):
        raise ValueError(f"need {ndim} integer factors >= 1 for a {ndim}D image, got {factors}")
    return factors


def _crop_to_multiple(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    sizes = [(s // f) * f for s, f in zip(x.shape[1:], factors)]
    if any(s == 0 for s in sizes):
        raise ValueError(f"image {tuple(x.shape[1:])} is smaller than the reduction factors {tuple(factors)}")
    return x[(slice(None),) + tuple(slice(0, s) for s in sizes)]


class Degradation(Transform):
    """Base class: reduces each spatial axis by an integer factor with the shared LR geometry.

    Args:
        factors: reduction per spatial axis (an int applies to all axes), e.g. (1, 2, 2) for x2 in-plane
            on sagittal slices of a RAS volume.
    """

    backend = [torch.float32]

    def __init__(self, factors: Sequence[int] | int):
        self.factors = factors

    def reduce(self, x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
        """Degrade a float tensor (C, *spatial) already cropped to a multiple of ``factors``."""
        raise NotImplementedError

    def lr_shape(self, hr_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the LR image for a given HR spatial shape."""
        factors = _factors(self.factors, len(hr_shape))
        return tuple(s // f for s, f in zip(hr_shape, factors))

    def __call__(self, img):
        x = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img, dtype=torch.float32)
        factors = _factors(self.factors, x.ndim - 1)
        out = self.reduce(_crop_to_multiple(x, factors), factors)
        if isinstance(img, MetaTensor):
            meta = dict(img.meta)
            meta["affine"] = torch.as_tensor(lr_affine(img.affine.numpy(), factors), dtype=torch.float64)
            return MetaTensor(out, meta=meta)
        return convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)[0]


def _along(x: torch.Tensor, axis: int, fn) -> torch.Tensor:
    """Apply a (N, 1, L) -> (N, 1, L') 1D operation along spatial ``axis`` (0-based, after the channel)."""
    moved = x.movedim(axis + 1, -1)
    shape = moved.shape
    out = fn(moved.reshape(-1, 1, shape[-1]))
    return out.reshape(*shape[:-1], out.shape[-1]).movedim(-1, axis + 1)


class BlockAverage(Degradation):
    """Mean over non-overlapping f-blocks (the seed task: LR = 2x2 block average of each sagittal slice)."""

    def reduce(self, x, factors):
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[x.ndim - 1]
        return pool(x[None], kernel_size=factors, stride=factors)[0]


class ThickSlices(BlockAverage):
    """Thick slices: the average of ``thickness`` consecutive slices along one axis (through-plane SR).

    Args:
        axis: spatial axis across the slices (2 = superior-inferior in RAS, for axial acquisitions).
        thickness: number of HR slices per thick slice.
        spatial_dims: number of spatial axes of the images.
    """

    def __init__(self, axis: int = 2, thickness: int = 4, spatial_dims: int = 3):
        factors = [1] * spatial_dims
        factors[axis] = int(thickness)
        super().__init__(factors)


class KSpaceTruncation(Degradation):
    """Keep the central 1/f of k-space on each axis: what a lower-resolution acquisition measures.

    A linear phase moves the samples to the LR voxel centres (HR index f*i + (f-1)/2), so the result shares the
    LR geometry of the other degradations; intensities keep their units (a constant stays that constant).
    """

    def reduce(self, x, factors):
        y = x.to(torch.complex64)
        for axis, f in enumerate(factors):
            if f == 1:
                continue
            dim = axis + 1
            n = y.shape[dim]
            m = n // f
            k = torch.fft.fftfreq(n, d=1.0 / n)  # integer frequencies 0, 1, ..., -1
            spec = torch.fft.fft(y, dim=dim)
            shape = [1] * y.ndim
            shape[dim] = n
            spec = spec * torch.exp(2j * math.pi * k * (f - 1) / 2.0 / n).reshape(shape).to(spec.dtype)
            keep = torch.cat([torch.arange(0, (m + 1) // 2), torch.arange(n - m // 2, n)])
            y = torch.fft.ifft(spec.index_select(dim, keep), dim=dim) * (m / n)
        return y.real.contiguous()


class GaussianDecimation(Degradation):
    """Gaussian blur then decimation, the kernel centred on each LR voxel centre.

    Args:
        factors: reduction per spatial axis.
        sigma: blur standard deviation per axis in HR voxels; default 2f/6 (the usual anti-aliasing choice of
            image pyramids), 0 on axes that are not reduced.
    """

    def __init__(self, factors: Sequence[int] | int, sigma: Sequence[float] | float | None = None):
        super().__init__(factors)
        self.sigma = sigma

    def reduce(self, x, factors):
        sigmas = self.sigma
        if sigmas is None:
            sigmas = [2.0 * f / 6.0 if f > 1 else 0.0 for f in factors]
        elif isinstance(sigmas, (int, float)):
            sigmas = [float(sigmas) if f > 1 else 0.0 for f in factors]
        for axis, (f, sigma) in enumerate(zip(factors, sigmas)):
            if f == 1 and sigma == 0:
                continue
            radius = max(1, math.ceil(3 * sigma))
            taps = torch.arange(-radius, f + radius, dtype=torch.float64) - (f - 1) / 2.0
            kernel = torch.exp(-0.5 * (taps / max(sigma, 1e-6)) ** 2)
            kernel = (kernel / kernel.sum()).to(x.dtype).reshape(1, 1, -1)

            def conv(v, kernel=kernel, radius=radius, f=f):
                return F.conv1d(F.pad(v, (radius, radius), mode="replicate"), kernel, stride=f)

            x = _along(x, axis, conv)
        return x


class SplineDownsample(Degradation):
    """Cubic B-spline resampling onto the LR grid (no anti-aliasing), as scipy.ndimage.zoom(order=3)."""

    def reduce(self, x, factors):
        arr = x.numpy()
        zoom = [1.0] + [1.0 / f for f in factors]
        out = ndimage.zoom(arr, zoom, order=3, grid_mode=True, mode="grid-mirror")
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


class RicianNoise(RandRicianNoise):
    """Additive Rician noise of fixed ``std`` (MONAI's RandRicianNoise with probability 1); geometry unchanged.

    Args:
        std: noise standard deviation in the image's intensity units.
        seed: seed of the noise generator (set_random_state(seed) of MONAI's transforms).
    """

    def __init__(self, std: float, seed: int | None = None):
        super().__init__(prob=1.0, mean=0.0, std=std, channel_wise=False, relative=False, sample_std=False)
        if seed is not None:
            self.set_random_state(seed)


class Degraded(MapTransform):
    """Dictionary wrapper: degrade ``keys`` into ``output_keys`` (e.g. HR "label" -> LR "image").

    Args:
        keys: keys of the HR images.
        degradation: an array degradation (any of this module's transforms).
        output_keys: where to store the results; the input keys when None.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        degradation: Transform,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.degradation = degradation
        self.output_keys = self.keys if output_keys is None else tuple(
            [output_keys] if isinstance(output_keys, str) else output_keys
        )
        if len(self.output_keys) != len(self.keys):
            raise ValueError("output_keys must match keys one to one")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.degradation(d[key])
        return d


def _dict_version(array_cls: type, doc: str) -> type:
    """A MONAI-style dictionary transform taking (keys, output_keys, **array_kwargs)."""

    def __init__(self, keys, output_keys=None, allow_missing_keys=False, **kwargs):
        Degraded.__init__(self, keys, array_cls(**kwargs), output_keys, allow_missing_keys)

    return type(array_cls.__name__ + "d", (Degraded,), {"__init__": __init__, "__doc__": doc})


BlockAveraged = _dict_version(BlockAverage, "Dictionary version of :class:`BlockAverage`.")


ThickSlicesd = _dict_version(ThickSlices, "Dictionary version of :class:`ThickSlices`.")


KSpaceTruncationd = _dict_version(KSpaceTruncation, "Dictionary version of :class:`KSpaceTruncation`.")


GaussianDecimationd = _dict_version(GaussianDecimation, "Dictionary version of :class:`GaussianDecimation`.")


SplineDownsampled = _dict_version(SplineDownsample, "Dictionary version of :class:`SplineDownsample`.")


RicianNoised = _dict_version(RicianNoise, "Dictionary version of :class:`RicianNoise`.")


class BlockDownscaled(MapTransform):
    """Block-average ``keys`` by the item's ``factor_key``, geometry included: an integer (e.g. 2) along every axis
    (:func:`common.data.with_downscaled_copies` marks such copies) or one factor per axis (e.g. [1, 2, 2]: the
    coarser target of a cascade's earlier stage, :func:`common.data.downscaled_split`); items without it pass
    unchanged.

    Args:
        keys: the HR volume(s).
        factor_key: key of the factor in the item.
    """

    def __init__(self, keys: KeysCollection = "label", factor_key: str = "downscale") -> None:
        super().__init__(keys)
        self.factor_key = factor_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        factor = d.get(self.factor_key, 1)
        factors = [int(f) for f in factor] if isinstance(factor, Sequence) else [int(factor)]
        if any(f > 1 for f in factors):
            for key in self.key_iterator(d):
                d[key] = BlockAverage(factors if len(factors) > 1 else factors[0])(d[key])
        return d


DEGRADATIONS: dict[str, type[Degradation]] = {
    "block": BlockAverage,
    "kspace": KSpaceTruncation,
    "gaussian": GaussianDecimation,
    "spline": SplineDownsample,
}
"""The resampling degradations by the names the command lines and datalists use (factors are their one argument)."""


def degradation_by_name(name: str, factors: Sequence[int] | int) -> Degradation:
    """The degradation ``name`` (a key of :data:`DEGRADATIONS`) reducing by ``factors``; a clear error otherwise.

    Args:
        name: "block", "kspace", "gaussian" or "spline".
        factors: reduction per spatial axis.
    """
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; choose from {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[name](factors)
