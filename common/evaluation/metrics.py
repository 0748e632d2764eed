"""The one evaluation path of the project (methods.md §5): PSNR, 2D/3D SSIM, LPIPS, data consistency.

Inputs are 3D volumes (X, Y, Z) already scaled to [0, 1] (numpy arrays or torch tensors; leading singleton
batch/channel axes are dropped). Slices are taken along ``axis`` (0 = sagittal for RAS volumes).

Rules that avoid the defects of the source evaluation (methods.md §1):

- 2D SSIM is computed per slice and 3D SSIM on whole volumes; the two are never mixed, and 3D SSIM refuses a
  single slice or any axis shorter than its 11-voxel window.
- Slices that are empty in the reference (see :func:`nonempty_slices`) are not scored, so no slice gets an
  infinite or capped "100 dB" PSNR just because both images are zero there.
- Every metric also has a masked variant (head/brain mask) reported separately.
- LPIPS is reported only when its backbone weights are already on disk; otherwise it is "unavailable".

SSIM (Gaussian window σ 1.5, 11 taps, K1 0.01, K2 0.03) equals scikit-image's ``structural_similarity(
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``. MONAI's ``compute_ssim_and_cs`` is not used:
it casts to float32 and filters with a dense 11³ kernel, which puts 3D SSIM of bright, flat brain-like
content about 1.3e-4 away from scikit-image and takes ~5x longer in 3D. Here the local moments are float64
scipy Gaussian filters (scikit-image's own filtering), 2D over a stack of slices or 3D over the volume.
PSNR goes through MONAI's ``PSNRMetric`` (float64).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.metrics import PSNRMetric
from scipy.ndimage import gaussian_filter

__all__ = [
    "SSIM_WINDOW",
    "SSIM_SIGMA",
    "SSIM_K1",
    "SSIM_K2",
    "SUMMARY_KEYS",
    "SLICE_KEYS",
    "psnr",
    "psnr_slices",
    "ssim2d_slices",
    "ssim3d",
    "nonempty_slices",
    "data_consistency",
    "LPIPS",
    "evaluate_volume",
]


SSIM_WINDOW = 11


SSIM_SIGMA = 1.5


SSIM_K1 = 0.01


SSIM_K2 = 0.03


_HALF = SSIM_WINDOW // 2


_TRUNCATE = 3.5  # scipy's radius int(3.5 * 1.5 + 0.5) = 5: the 11-tap window scikit-image uses


SUMMARY_KEYS = (
    "subject", "psnr", "psnr_mask", "ssim2d", "ssim2d_mask", "ssim3d", "ssim3d_mask", "lpips",
    "data_consistency", "n_slices", "n_slices_scored", "tissue_dice_csf", "tissue_dice_gm", "tissue_dice_wm",
)


SLICE_KEYS = ("subject", "slice", "psnr", "ssim2d", "psnr_mask", "ssim2d_mask")


def _array(a: Any, ndim: int | None = None, name: str = "input") -> np.ndarray:
    """float64 numpy copy of an array or tensor; leading singleton axes are dropped down to ``ndim``."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()  # via torch: bfloat16/half have no numpy dtype
    a = np.asarray(a, dtype=np.float64)
    if ndim is not None:
        while a.ndim > ndim and a.shape[0] == 1:
            a = a[0]
        if a.ndim != ndim:
            raise ValueError(f"{name} must be a {ndim}D array, got shape {a.shape}")
    return a


def _mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = _array(mask, len(shape), "mask") != 0
    if mask.shape != tuple(shape):
        raise ValueError(f"mask shape {mask.shape} does not match the image shape {tuple(shape)}")
    return mask


def _pair(x: Any, y: Any, ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    x, y = _array(x, ndim, "x"), _array(y, ndim, "y")
    while x.ndim > y.ndim and x.shape[0] == 1:  # (1, 1, X, Y, Z) tensor against an (X, Y, Z) array
        x = x[0]
    while y.ndim > x.ndim and y.shape[0] == 1:
        y = y[0]
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    return x, y


def _check_axis(axis: int, ndim: int = 3) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}D volume")
    return axis % ndim


def _psnr_batch(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """PSNR per leading-axis item through MONAI's PSNRMetric (float64; inf where the item is identical)."""
    tx = torch.from_numpy(np.ascontiguousarray(x.reshape(x.shape[0], 1, -1)))
    ty = torch.from_numpy(np.ascontiguousarray(y.reshape(y.shape[0], 1, -1)))
    out = PSNRMetric(max_val=float(data_range), reduction="none")(tx, ty)
    return out.reshape(-1).numpy().astype(np.float64)


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, axes: Sequence[int]) -> np.ndarray:
    """Full-size float64 SSIM map with the Gaussian window applied over ``axes`` only (others are slices).

    scipy's 'reflect' boundary is the one scikit-image filters with, so the map equals its ``full=True`` map.
    """
    sigma = [SSIM_SIGMA if a in axes else 0.0 for a in range(x.ndim)]

    def local_mean(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma, mode="reflect", truncate=_TRUNCATE)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x * mu_x
    var_y = local_mean(y * y) - mu_y * mu_y
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))


def _interior(smap: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """The map away from a 5-voxel border on ``axes``: the region scikit-image averages."""
    return smap[tuple(slice(_HALF, -_HALF) if a in axes else slice(None) for a in range(smap.ndim))]


def _float_or_none(v: float) -> float | None:
    """NaN (a slice with no mask voxel) becomes None, the tables' "not computable"."""
    return None if math.isnan(v) else float(v)


def psnr(x: Any, y: Any, data_range: float = 1.0, mask: Any = None) -> float:
    """Peak signal-to-noise ratio in dB, 10·log10(data_range² / MSE); inf for identical inputs.

    Args:
        x: prediction, any shape.
        y: reference, same shape.
        data_range: peak-to-peak range of the data (1 for [0, 1] volumes).
        mask: optional bool array of the same shape; the MSE is taken over the masked voxels only.

    Raises:
        ValueError: shapes differ, or the mask selects no voxel.
    """
    x, y = _pair(x, y)
    m = _mask(mask, x.shape)
    if m is not None:
        if not m.any():
            raise ValueError("mask selects no voxel")
        x, y = x[m], y[m]
    return float(_psnr_batch(x.reshape(1, -1), y.reshape(1, -1), data_range)[0])


def psnr_slices(x: Any, y: Any, axis: int = 0, data_range: float = 1.0, mask: Any = None) -> np.ndarray:
    """PSNR of every slice along ``axis`` (all slices; use :func:`nonempty_slices` to select the scored ones).

    Args:
        x: prediction volume (X, Y, Z).
        y: reference volume.
        axis: slicing axis (0 = sagittal).
        data_range: peak-to-peak range of the data.
        mask: optional bool volume; each slice's MSE over its masked voxels (NaN where a slice has none).
    """
    x, y = _pair(x, y, 3)
    axis = _check_axis(axis)
    m = _mask(mask, x.shape)
    xs, ys = np.moveaxis(x, axis, 0), np.moveaxis(y, axis, 0)
    if m is None:
        return _psnr_batch(xs, ys, data_range)
    ms = np.moveaxis(m, axis, 0)
    out = np.full(xs.shape[0], np.nan)
    for i in np.flatnonzero(ms.reshape(ms.shape[0], -1).any(axis=1)):
        out[i] = _psnr_batch(xs[i][ms[i]][None], ys[i][ms[i]][None], data_range)[0]
    return out


def ssim2d_slices(x: Any, y: Any, axis: int = 0, data_range: float = 1.0, mask: Any = None) -> np.ndarray:
    """2D SSIM of every slice along ``axis`` (Gaussian window σ 1.5, 11 taps, K1 0.01, K2 0.03).

    Without a mask each value equals scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` of the slice pair (mean of the map away from a 5-pixel border).

    Args:
        x: prediction volume (X, Y, Z).
        y: reference volume.
        axis: slicing axis (0 = sagittal).
        data_range: peak-to-peak range of the data.
        mask: optional bool volume; each slice's value is the mean of its full-size SSIM map over its mask
            voxels (NaN for a slice whose mask is empty).

    Raises:
        ValueError: an in-plane size is below the 11-pixel window.
    """
    x, y = _pair(x, y, 3)
    axis = _check_axis(axis)
    xs, ys = np.moveaxis(x, axis, 0), np.moveaxis(y, axis, 0)
    if min(xs.shape[1:]) < SSIM_WINDOW:
        raise ValueError(f"slices of shape {xs.shape[1:]} are smaller than the {SSIM_WINDOW}-pixel SSIM window")
    smap = _ssim_map(xs, ys, data_range, axes=(1, 2))
    m = _mask(mask, x.shape)
    if m is None:
        return _interior(smap, (1, 2)).mean(axis=(1, 2))
    ms = np.moveaxis(m, axis, 0)
    counts = ms.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (smap * ms).sum(axis=(1, 2)) / np.maximum(counts, 1), np.nan)


def ssim3d(x: Any, y: Any, data_range: float = 1.0, mask: Any = None) -> float:
    """True 3D SSIM with an 11³ Gaussian window (σ 1.5), equal to scikit-image's nD structural_similarity.

    Args:
        x: prediction volume (X, Y, Z).
        y: reference volume.
        data_range: peak-to-peak range of the data.
        mask: optional bool volume; the mean of the full-size 3D SSIM map over the mask voxels.

    Raises:
        ValueError: a 2D input (single slice), or any axis shorter than the window. Running an 11³ window over
            a single slice is the source study's defect (it inflated SSIM from about 0.88 to 0.99).
    """
    xa, ya = _array(x, name="x"), _array(y, name="y")
    if xa.ndim < 3 or (xa.ndim == 3 and min(xa.shape) == 1):
        raise ValueError(f"ssim3d needs a 3D volume, got shape {xa.shape} (a single slice): use ssim2d_slices")
    xa, ya = _pair(xa, ya, 3)
    if min(xa.shape) < SSIM_WINDOW:
        raise ValueError(
            f"volume {xa.shape} has an axis shorter than the {SSIM_WINDOW}-voxel 3D SSIM window; "
            "3D SSIM is undefined there (use ssim2d_slices)"
        )
    m = _mask(mask, xa.shape)
    if m is None:
        return float(_interior(_ssim_map(xa, ya, data_range, (0, 1, 2)), (0, 1, 2)).mean())
    if not m.any():
        raise ValueError("mask selects no voxel")
    return float(_ssim_map(xa, ya, data_range, (0, 1, 2))[m].mean())


def nonempty_slices(hr: Any, axis: int = 0, threshold: float = 1e-3, min_fraction: float = 0.01) -> np.ndarray:
    """Slices of the reference that carry signal: at least ``min_fraction`` of their voxels above ``threshold``.

    A fraction rather than "any voxel" keeps out edge slices holding a few stray bright voxels, whose
    whole-slice PSNR would be dominated by matching zeros.

    Args:
        hr: reference volume (X, Y, Z) in [0, 1].
        axis: slicing axis.
        threshold: intensity above which a voxel counts as signal.
        min_fraction: fraction of a slice's voxels that must be signal.

    Returns:
        bool array with one entry per slice along ``axis``.
    """
    hr = _array(hr, 3, "hr")
    axis = _check_axis(axis)
    hs = np.moveaxis(hr, axis, 0).reshape(hr.shape[axis], -1)
    return (hs > threshold).mean(axis=1) >= min_fraction


def data_consistency(sr: Any, lr: Any, degrade: Callable[[np.ndarray], Any]) -> float:
    """Relative data consistency ‖degrade(SR) − LR‖₂ / ‖LR‖₂ (0 for an SR that reproduces the LR exactly).

    Args:
        sr: super-resolved volume on the HR grid.
        lr: the observed low-resolution volume.
        degrade: callable mapping an HR array to the LR grid (the same degradation that made ``lr``).
    """
    lr_a = _array(lr, name="lr")
    pred = _array(degrade(_array(sr, name="sr")), name="degrade(sr)")
    while pred.ndim > lr_a.ndim and pred.shape[0] == 1:
        pred = pred[0]
    if pred.shape != lr_a.shape:
        raise ValueError(f"degrade(sr) has shape {pred.shape}, the LR volume {lr_a.shape}")
    norm = float(np.linalg.norm(lr_a))
    if norm == 0.0:
        raise ValueError("the LR volume is all zero: relative data consistency is undefined")
    return float(np.linalg.norm(pred - lr_a) / norm)


def _backbone_file(net: str) -> str:
    """File name torchvision gives the ImageNet weights that lpips' ``pretrained=True`` trunk loads."""
    from torchvision import models

    weights = {
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net]
    return weights.url.rsplit("/", 1)[-1]


class LPIPS:
    """LPIPS (lpips package) per slice, with the backbone taken only from the local torch hub cache.

    The lpips package ships the linear heads; the AlexNet/VGG/SqueezeNet trunk is torchvision's ImageNet
    weights, normally a download. Here it is used only when ``<torch.hub.get_dir()>/checkpoints/<file>``
    already exists; otherwise ``available`` is False, ``reason`` names the missing file (``weights_path``) and
    calls return None, so reports say "unavailable" instead of a made-up number. Nothing is ever downloaded.

    Args:
        net: 'alex' (the usual LPIPS), 'vgg' or 'squeeze'.
        backbone: 'pretrained' (ImageNet trunk from the local cache) or 'random' (seeded random trunk with the
            shipped linear heads: a test fixture only, its values are not comparable to published LPIPS).
        device: torch device for the network.
        batch_size: slices per forward pass.
        seed: seed of the random trunk.
    """

    MIN_SIZE = {"alex": 31, "vgg": 16, "squeeze": 17}  # smallest slice the trunk's pooling stack accepts

    def __init__(
        self, net: str = "alex", backbone: str = "pretrained", device: str | torch.device = "cpu",
        batch_size: int = 16, seed: int = 0,
    ):
        if net not in self.MIN_SIZE:
            raise ValueError(f"net must be one of {sorted(self.MIN_SIZE)}, got {net!r}")
        if backbone not in ("pretrained", "random"):
            raise ValueError(f"backbone must be 'pretrained' or 'random', got {backbone!r}")
        self.net_name, self.backbone = net, backbone
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.available, self.reason = False, ""
        self.weights_path: Path | None = None
        self.model: torch.nn.Module | None = None
        if backbone == "pretrained":
            self.weights_path = Path(torch.hub.get_dir()) / "checkpoints" / _backbone_file(net)
            if not self.weights_path.is_file():
                self.reason = (
                    f"LPIPS backbone weights not found: {self.weights_path} (torchvision's ImageNet '{net}' "
                    "weights; place that file there to enable LPIPS, nothing is downloaded)"
                )
                return
        try:
            import lpips as lpips_pkg

            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                # lpips 0.1.4 still passes torchvision's deprecated `pretrained=` argument
                warnings.simplefilter("ignore", UserWarning)
                torch.manual_seed(seed)
                model = lpips_pkg.LPIPS(net=net, pretrained=True, pnet_rand=backbone == "random", verbose=False)
        except Exception as err:  # a corrupt cache file or a missing package: say so, never fake a value
            self.reason = f"LPIPS could not be built ({type(err).__name__}: {err})"
            return
        self.model = model.to(self.device).eval()
        self.available = True

    def __repr__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"LPIPS(net={self.net_name!r}, backbone={self.backbone!r}, {state})"

    @torch.no_grad()
    def __call__(self, x: Any, y: Any, axis: int = 0, slices: Any = None) -> float | None:
        """Mean LPIPS over the reference's non-empty slices, or None when unavailable.

        Args:
            x: prediction volume (X, Y, Z) in [0, 1].
            y: reference volume; its non-empty slices (:func:`nonempty_slices`) are scored.
            axis: slicing axis.
            slices: optional bool array overriding which slices are scored.

        Raises:
            ValueError: no slice to score, or slices smaller than the trunk accepts.
        """
        if not self.available:
            return None
        x, y = _pair(x, y, 3)
        axis = _check_axis(axis)
        keep = nonempty_slices(y, axis) if slices is None else np.asarray(slices, dtype=bool)
        if keep.shape != (x.shape[axis],):
            raise ValueError(f"slices must have {x.shape[axis]} entries, got shape {keep.shape}")
        if not keep.any():
            raise ValueError("no non-empty slice to score with LPIPS")
        xs, ys = np.moveaxis(x, axis, 0)[keep], np.moveaxis(y, axis, 0)[keep]
        if min(xs.shape[1:]) < self.MIN_SIZE[self.net_name]:
            raise ValueError(
                f"slices of shape {xs.shape[1:]} are too small for LPIPS-{self.net_name} "
                f"(needs at least {self.MIN_SIZE[self.net_name]} pixels per side)"
            )
        values = []
        for start in range(0, xs.shape[0], self.batch_size):
            # [0, 1] -> [-1, 1], grey replicated to the 3 channels the ImageNet trunk expects
            a = torch.from_numpy(xs[start : start + self.batch_size]).float().to(self.device)
            b = torch.from_numpy(ys[start : start + self.batch_size]).float().to(self.device)
            a = (2 * a - 1)[:, None].expand(-1, 3, -1, -1)
            b = (2 * b - 1)[:, None].expand(-1, 3, -1, -1)
            values.append(self.model(a, b).reshape(-1).double().cpu())
        return float(torch.cat(values).mean())


def evaluate_volume(
    sr: Any, hr: Any, *, mask: Any = None, lr: Any = None, degrade: Callable[[np.ndarray], Any] | None = None,
    axis: int = 0, lpips: LPIPS | None = None, subject: str = "", data_range: float = 1.0,
) -> tuple[dict, list[dict]]:
    """Score one subject: a summary dict and one row per scored (non-empty) slice.

    Summary: ``psnr`` over all voxels of the non-empty slices; ``ssim2d`` the mean per-slice 2D SSIM over
    them; ``ssim3d`` the 3D SSIM of the volume cropped to the span of non-empty slices along ``axis``; the
    ``_mask`` variants over the mask voxels (``ssim2d_mask`` is the mean of the per-slice full 2D SSIM maps
    over all mask voxels). A value that cannot be computed (no mask given, empty mask, a volume smaller than
    the 3D window, no non-empty slice) is None. ``lpips`` is a float, "unavailable" when the LPIPS object could
    not load its weights, or None when not asked for.

    Args:
        sr: super-resolved volume (X, Y, Z) in [0, 1].
        hr: reference volume, same shape.
        mask: optional bool head/brain mask.
        lr: optional LR volume; with ``degrade`` it gives the data-consistency term (else None).
        degrade: callable HR -> LR grid.
        axis: slicing axis (0 = sagittal).
        lpips: optional :class:`LPIPS`.
        subject: identifier written in every row.
        data_range: peak-to-peak range of the data.
    """
    sr_a, hr_a = _pair(sr, hr, 3)
    axis = _check_axis(axis)
    m = _mask(mask, hr_a.shape)
    keep = nonempty_slices(hr_a, axis)
    idx = np.flatnonzero(keep)
    xs, ys = np.moveaxis(sr_a, axis, 0)[keep], np.moveaxis(hr_a, axis, 0)[keep]

    summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    summary.update(subject=subject, n_slices=int(hr_a.shape[axis]), n_slices_scored=int(keep.sum()))
    rows: list[dict] = []
    if idx.size:
        slice_psnr = psnr_slices(xs, ys, 0, data_range)
        slice_ssim = ssim2d_slices(xs, ys, 0, data_range)
        summary["psnr"] = psnr(xs, ys, data_range)
        summary["ssim2d"] = float(slice_ssim.mean())
        rows = [
            {"subject": subject, "slice": int(i), "psnr": float(p), "ssim2d": float(s),
             "psnr_mask": None, "ssim2d_mask": None}
            for i, p, s in zip(idx, slice_psnr, slice_ssim)
        ]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        span = np.moveaxis(sr_a, axis, 0)[lo:hi], np.moveaxis(hr_a, axis, 0)[lo:hi]
        if min(span[0].shape) >= SSIM_WINDOW:
            summary["ssim3d"] = ssim3d(*span, data_range)

    if m is not None and m.any():
        summary["psnr_mask"] = psnr(sr_a, hr_a, data_range, m)
        mask_ssim = ssim2d_slices(sr_a, hr_a, axis, data_range, m)
        counts = np.moveaxis(m, axis, 0).reshape(m.shape[axis], -1).sum(axis=1)
        summary["ssim2d_mask"] = float(np.nansum(mask_ssim * counts) / counts.sum())
        if min(hr_a.shape) >= SSIM_WINDOW:
            summary["ssim3d_mask"] = ssim3d(sr_a, hr_a, data_range, m)
        mask_psnr = psnr_slices(sr_a, hr_a, axis, data_range, m)
        for row in rows:
            row["psnr_mask"] = _float_or_none(mask_psnr[row["slice"]])
            row["ssim2d_mask"] = _float_or_none(mask_ssim[row["slice"]])

    if lpips is not None:
        if not lpips.available:
            summary["lpips"] = "unavailable"
        elif idx.size:
            summary["lpips"] = lpips(sr_a, hr_a, axis, slices=keep)
    if lr is not None and degrade is not None:
        summary["data_consistency"] = data_consistency(sr_a, lr, degrade)
    return summary, rows
