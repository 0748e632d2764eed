"""Whole-volume denoiser D(x; σ) by Gaussian-blended sliding windows per sampler step (methods.md §1; MONAI).

The EDM super-resolution study sampled each 32³ window on its own (own noise, a full 20-step trajectory) and averaged
the windows uniformly, which leaves seams where the set of covering windows changes. Here the *denoiser* is
windowed instead of the sampler: :class:`WindowedDenoiser` has a denoiser's signature ``(x, sigma, cond) -> D`` and
evaluates the wrapped denoiser on overlapping windows of the whole volume with MONAI's
:func:`monai.inferers.sliding_window_inference` and Gaussian blending. A sampler that calls it moves the whole
volume along one trajectory from one noise field, and the blended ``D`` is smooth across window borders. Memory
for the network is bounded by ``sw_batch_size`` windows; only the volume-sized input, output and weight map are
held in full.

The noisy image ``x`` and the conditioning ``cond`` (the LR volume upsampled to the HR grid) are concatenated on
channels before windowing, so every window of ``x`` comes with the aligned window of ``cond``; the per-window
predictor splits them again and calls the wrapped denoiser with the window's ``x``, the window's ``cond`` and the σ
of the sample the window belongs to (MONAI batches windows of different samples together; ``with_coord`` tells
which sample each window is from).

Borders (the choice made here): windows never hang over the volume, so nothing is padded by default. A volume no
larger than one window goes straight to the denoiser; along an axis shorter than ``roi_size`` the window is clipped
to the axis (``pad_to_roi=False``), which is the same rule applied per axis, so the result is continuous in the
volume's shape. Padding would invent voxels the network then reads through its receptive field and GroupNorm
statistics: a constant pads a noise-free slab (out of distribution at large σ) and replicate pads streaks of
perfectly correlated noise. For networks that need a fixed input size, ``pad_to_roi=True`` lets MONAI pad; the
default mode there is ``"reflect"`` (keeps the per-voxel noise variance σ² and continues the image smoothly), and
it falls back to ``"replicate"`` on axes too short to reflect. Inside the volume, voxels at the volume border are
covered by windows whose edge lies there; MONAI's Gaussian map is clamped at 1e-3, so they keep a positive weight
and their value is exact wherever the windows agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from common.utils import as_flag

__all__ = ["window_slices", "WindowedDenoiser"]

# memory format of a channels-last window batch, by tensor rank (B, C, *spatial)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _as_tuple(v: Sequence[int] | int | Sequence[float] | float, n: int) -> tuple:
    if isinstance(v, (int, float)):
        return (v,) * n
    v = tuple(v)
    if len(v) != n:
        raise ValueError(f"expected {n} values, got {v}")
    return v


def _effective_roi(spatial: Sequence[int], roi_size: Sequence[int] | int, clip: bool) -> tuple[int, ...]:
    """``roi_size`` per axis (non-positive: the whole axis), clipped to the axis when ``clip``."""
    roi = tuple(int(r) if int(r) > 0 else int(s) for r, s in zip(_as_tuple(roi_size, len(spatial)), spatial))
    return tuple(min(r, s) for r, s in zip(roi, spatial)) if clip else roi


def window_slices(
    spatial_shape: Sequence[int],
    roi_size: Sequence[int] | int,
    overlap: Sequence[float] | float = 0.5,
) -> list[tuple[slice, ...]]:
    """The windows MONAI's ``sliding_window_inference`` visits on a volume, as tuples of spatial slices.

    Same rule as MONAI 1.x: the scan interval is ``int(roi·(1 − overlap))`` (at least 1; the whole axis when the
    window spans it) and the last window is shifted back to end at the volume's edge. The window is clipped to
    the volume on short axes (as :class:`WindowedDenoiser` does by default). Useful for cost estimates
    (``len(...)`` windows per denoiser call) and for baselines that need the same grid.

    Args:
        spatial_shape: spatial size of the volume, e.g. (D, H, W).
        roi_size: window size (an int for all axes; non-positive: the whole axis).
        overlap: fraction of overlap between neighbouring windows, per axis or one value, in [0, 1).
    """
    spatial = tuple(int(s) for s in spatial_shape)
    roi = _effective_roi(spatial, roi_size, clip=True)
    ov = _as_tuple(overlap, len(spatial))
    interval = tuple(r if r == s else max(int(r * (1 - o)), 1) for r, s, o in zip(roi, spatial, ov))
    return list(dense_patch_slices(spatial, roi, interval, return_slice=True))


class WindowedDenoiser(nn.Module):
    """A denoiser ``(x, sigma, cond) -> D(x; σ)`` evaluated on Gaussian-blended sliding windows of the volume.

    Wraps any denoiser with the samplers' signature (e.g. :class:`common.diffusion.edm.EDMPrecond`) so that
    ``sample_euler(WindowedDenoiser(precond, 32), z, sigmas, cond)`` samples the whole volume along one trajectory.
    If the wrapped denoiser is an ``nn.Module`` it is registered as a submodule (``.to``, ``.eval`` pass through).

    Args:
        denoiser: ``denoiser(x_win, sigma_win, cond_win) -> D`` on a batch of windows; ``sigma_win`` is a tensor
            with one σ per window, ``cond_win`` None when no ``cond`` is given.
        roi_size: window size per spatial axis (an int for all axes; non-positive: the whole axis). For the 3D
            study 32 on the HR grid, the size the network was trained on.
        sw_batch_size: windows per call of ``denoiser``: the bound on the network's batch and memory.
        overlap: overlap fraction of neighbouring windows in [0, 1) (0.5: every interior voxel is seen 2^3 times
            in 3D).
        mode: MONAI blend mode, "gaussian" (weights fall off towards window edges, where the network sees its own
            zero padding) or "constant" (uniform average).
        sigma_scale: standard deviation of the Gaussian weight as a fraction of the window size (MONAI's).
        pad_to_roi: False (default): clip the window to the volume on axes shorter than ``roi_size`` and never
            pad. True: keep every window at ``roi_size`` and let MONAI pad short axes (for fixed-size networks).
        padding_mode: padding for ``pad_to_roi=True`` ("reflect", "replicate", "constant", "circular"); "reflect"
            falls back to "replicate" where an axis is too short to reflect.
        cval: fill value for ``padding_mode="constant"`` (applies to ``x`` and ``cond`` alike; -1 is background
            for images in [-1, 1]).
        autocast_bf16: run the wrapped denoiser under bf16 autocast (1.2-1.9x faster on these CPUs); its output is
            cast back to the input's dtype before blending.
        channels_last: hand the windows to the denoiser channels-last (``torch.channels_last_3d`` for 3D windows,
            ``torch.channels_last`` for 2D): oneDNN then runs the convolutions in that layout, 1.07-1.26x faster per
            slab for the two 3D bundles on this CPU (docs/performance.md); the same values up to the float
            rounding of another summation order.
        sw_device: device the windows (and the network) run on; None: the input's. The result stays on the
            input's device.
        progress: show a tqdm bar over window batches.
    """

    def __init__(
        self,
        denoiser: Denoiser | nn.Module,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 4,
        overlap: Sequence[float] | float = 0.5,
        mode: str = "gaussian",
        sigma_scale: Sequence[float] | float = 0.125,
        pad_to_roi: bool = False,
        padding_mode: str = "reflect",
        cval: float = 0.0,
        autocast_bf16: bool = False,
        channels_last: bool = False,
        sw_device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.denoiser = denoiser
        self.roi_size = roi_size if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = overlap
        self.mode = mode
        self.sigma_scale = sigma_scale
        self.pad_to_roi = as_flag(pad_to_roi)
        self.padding_mode = padding_mode
        self.cval = float(cval)
        self.autocast_bf16 = as_flag(autocast_bf16)
        self.channels_last = as_flag(channels_last)
        self.sw_device = sw_device
        self.progress = as_flag(progress)

    def num_windows(self, spatial_shape: Sequence[int]) -> int:
        """Windows per sample for a volume of ``spatial_shape`` (1 when it fits in one window).

        Args:
            spatial_shape: spatial size of the volume.
        """
        return len(window_slices(spatial_shape, self.roi_size, self.overlap))

    def _call_denoiser(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        """The wrapped denoiser, under bf16 autocast when configured, returning ``x``'s dtype."""
        memory_format = _CHANNELS_LAST.get(x.ndim) if self.channels_last else None
        if memory_format is not None:  # the first convolution's input decides the layout of the whole network
            x = x.contiguous(memory_format=memory_format)
            cond = None if cond is None else cond.contiguous(memory_format=memory_format)
        if self.autocast_bf16:
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                out = self.denoiser(x, sigma, cond)
        else:
            out = self.denoiser(x, sigma, cond)
        return out.to(x.dtype)

    def _padding_mode(self, spatial: Sequence[int], roi: Sequence[int]) -> str:
        """``padding_mode``, with "reflect" replaced by "replicate" when a short axis cannot be reflected."""
        if self.padding_mode != "reflect":
            return self.padding_mode
        for s, r in zip(spatial, roi):
            diff = max(r - s, 0)
            if diff - diff // 2 >= s:  # torch's reflect needs pad < size on each side
                return "replicate"
        return "reflect"

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """``D(x; σ)`` over the whole volume, blended from windows.

        Args:
            x: noisy images (B, C, *spatial).
            sigma: noise level: a float, a 0-d or (1,) tensor, or one per sample (B,).
            cond: conditioning images on ``x``'s grid (B or 1, C_cond, *spatial), or None.
        """
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> Tensor
        b, c = x.shape[:2]
        spatial = tuple(x.shape[2:])
        dtype = x.dtype if x.is_floating_point() else torch.float32
        sig = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(b)
        elif sig.numel() != b:
            raise ValueError(f"sigma must be a scalar or have one value per sample ({b}), got shape {tuple(sig.shape)}")
        if cond is not None:
            cond = cond.as_tensor() if hasattr(cond, "as_tensor") else cond
            if tuple(cond.shape[2:]) != spatial:
                raise ValueError(f"cond's spatial shape {tuple(cond.shape[2:])} differs from x's {spatial}")
            cond = cond.to(device=x.device, dtype=x.dtype)
            if cond.shape[0] != b:
                cond = cond.expand(b, *cond.shape[1:])

        roi = _effective_roi(spatial, self.roi_size, clip=not self.pad_to_roi)
        if all(r >= s for r, s in zip(roi, spatial)) and not (self.pad_to_roi and roi != spatial):
            dev = x.device if self.sw_device is None else torch.device(self.sw_device)
            out = self._call_denoiser(x.to(dev), sig.to(dev), None if cond is None else cond.to(dev))
            return out.to(x.device)

        inputs = x if cond is None else torch.cat([x, cond], dim=1)

        def predictor(win: Tensor, coords: Sequence[Sequence[slice]]) -> Tensor:
            idx = torch.tensor([s[0].start for s in coords], device=sig.device)
            sig_win = sig[idx].to(win.device)
            x_win = win[:, :c]
            cond_win = win[:, c:] if cond is not None else None
            return self._call_denoiser(x_win, sig_win, cond_win)

        out = sliding_window_inference(
            inputs,
            roi_size=roi,
            sw_batch_size=self.sw_batch_size,
            predictor=predictor,
            overlap=self.overlap,
            mode=self.mode,
            sigma_scale=self.sigma_scale,
            padding_mode=self._padding_mode(spatial, roi),
            cval=self.cval,
            sw_device=self.sw_device,
            device=x.device,
            progress=self.progress,
            with_coord=True,
        )
        return out.as_tensor() if hasattr(out, "as_tensor") else out

    def extra_repr(self) -> str:
        return (
            f"roi_size={self.roi_size}, sw_batch_size={self.sw_batch_size}, overlap={self.overlap}, "
            f"mode={self.mode!r}, sigma_scale={self.sigma_scale}, pad_to_roi={self.pad_to_roi}, "
            f"padding_mode={self.padding_mode!r}, autocast_bf16={self.autocast_bf16}, "
            f"channels_last={self.channels_last}"
        )
