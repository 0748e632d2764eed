"""Result figures as PNG files, like a results page: metric bars, three-plane views, error maps, curves.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state, no display needed, safe in worker
processes) and written through :func:`common.data.atomic_path`, so a failed write leaves no file behind.

Volumes are RAS arrays (X, Y, Z) in [0, 1]: a fixed index on axis 0 is a sagittal slice, on axis 1 coronal, on
axis 2 axial. Slices are shown transposed with ``origin='lower'`` so that superior (sagittal, coronal) or
anterior (axial) is up; patient right is on the right of coronal and axial views (neurological convention).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from common.data.io import atomic_path

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: importing common.evaluation stays light
    from matplotlib.figure import Figure

__all__ = ["METRIC_LABELS", "bar_chart", "three_view", "preview", "zoomed_crops", "error_heatmap", "per_subject_psnr",
           "per_slice_psnr"]


METRIC_LABELS = {
    "psnr": "PSNR (dB)",
    "psnr_mask": "PSNR in mask (dB)",
    "ssim2d": "SSIM (2D, per slice)",
    "ssim2d_mask": "SSIM 2D in mask",
    "ssim3d": "SSIM (3D)",
    "ssim3d_mask": "SSIM 3D in mask",
    "lpips": "LPIPS",
    "data_consistency": "data consistency",
}


_VIEWS = ("sagittal", "coronal", "axial")


def _figure(figsize: tuple[float, float]) -> Figure:
    """A new constrained-layout matplotlib Figure (no pyplot state); matplotlib is imported here, on first use."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"common.evaluation.figures needs matplotlib to draw figures ({err})") from err
    return Figure(figsize=figsize, layout="constrained")


def _save(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Render ``fig`` with Agg and write it atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _number(v: Any) -> float | None:
    """A finite float, or None for missing / "unavailable" / NaN / inf values (not drawn)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _volume(v: Any, name: str) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu().float().numpy()
    v = np.asarray(v, dtype=np.float32)
    while v.ndim > 3 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 3:
        raise ValueError(f"{name}: need a 3D volume (X, Y, Z), got shape {v.shape}")
    return v


def _plane(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice at ``index`` on ``axis``, transposed for display with origin='lower' (up = higher index)."""
    if not 0 <= index < vol.shape[axis]:
        raise ValueError(f"slice index {index} out of range for axis {axis} of a {vol.shape} volume")
    return np.take(vol, index, axis=axis).T


def bar_chart(
    results: Mapping[str, Mapping[str, Any]], path: str | Path, metrics: Sequence[str] = ("psnr", "ssim2d"),
    title: str | None = None,
) -> Path:
    """Bars of mean metrics per method, one panel per metric (e.g. PSNR and SSIM).

    Args:
        results: method name -> {metric: value} (e.g. :func:`common.evaluation.summarise` output). Missing,
            "unavailable" or non-finite values are marked "n/a" instead of drawn.
        path: output PNG.
        metrics: the metric keys, one panel each.
        title: optional figure title.
    """
    if not results or not metrics:
        raise ValueError("bar_chart needs at least one method and one metric")
    methods = list(results)
    colors = _colors(methods)
    fig = _figure(figsize=(max(3.2, 0.9 * len(methods) + 1.6) * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        values = [_number(results[m].get(metric)) for m in methods]
        shown = [v for v in values if v is not None]
        x = np.arange(len(methods))
        ax.bar(x, [v if v is not None else 0.0 for v in values], color=[colors[m] for m in methods], width=0.7)
        if shown:
            # PSNR ~ 30 dB and SSIM ~ 0.95 differ in the last digits: start the axis below the smallest bar
            lo, hi = min(shown), max(shown)
            # at least 5 % of the value: equal bars must not be blown up to show rounding noise
            spread = max(hi - lo, abs(hi) * 0.05, 1e-3)
            bottom = max(lo - 1.5 * spread, 0.0) if lo >= 0 else lo - 1.5 * spread
            ax.set_ylim(bottom, hi + 0.6 * spread)
        else:  # nothing to draw (e.g. LPIPS unavailable): an empty panel saying n/a, not a zero bar
            ax.set_ylim(0.0, 1.0)
            ax.set_yticks([])
        digits = 2 if "psnr" in metric else 4
        for xi, v in zip(x, values):
            y0 = ax.get_ylim()[0]
            label, y = ("n/a", y0) if v is None else (f"{v:.{digits}f}", v)
            ax.annotate(label, (xi, y), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(x, methods, rotation=20 if len(methods) > 3 else 0, ha="right" if len(methods) > 3 else "center")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _three_view_figure(
    volumes: Mapping[str, Any], index: Sequence[int] | None, window: tuple[float, float] | None, panel: float,
    title: str | None, spacing: Sequence[float] | None = None,
) -> Figure:
    if not volumes:
        raise ValueError("three_view needs at least one volume")
    vols = {name: _volume(v, name) for name, v in volumes.items()}
    if index is not None and len(index) != 3:
        raise ValueError(f"index must be (sagittal, coronal, axial) slice numbers, got {index}")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be three positive voxel sizes (RAS axes), got {spacing}")
    if window is None:  # one robust window for every panel, so intensities compare across rows
        window = (min(float(np.percentile(v, 0.5)) for v in vols.values()),
                  max(float(np.percentile(v, 99.5)) for v in vols.values()))
    fig = _figure(figsize=(3 * panel + 0.4, len(vols) * panel + (0.5 if title else 0.3)))
    axes = fig.subplots(len(vols), 3, squeeze=False)
    for r, (name, vol) in enumerate(vols.items()):
        centre = [s // 2 for s in vol.shape] if index is None else [int(i) for i in index]
        for c, view in enumerate(_VIEWS):
            ax = axes[r, c]
            # the plane's columns run along the first remaining axis, its rows along the second (see _plane)
            across, up = (a for a in range(3) if a != c)
            aspect = 1.0 if spacing is None else spacing[up] / spacing[across]
            ax.imshow(_plane(vol, c, centre[c]), cmap="gray", origin="lower", vmin=window[0], vmax=window[1],
                      interpolation="nearest", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view, fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def three_view(
    volumes: Mapping[str, Any], path: str | Path, index: Sequence[int] | None = None,
    window: tuple[float, float] | None = (0.0, 1.0), title: str | None = None, spacing: Sequence[float] | None = None,
) -> Path:
    """Sagittal, coronal and axial slices (columns) of each volume (rows), grey, one window for all.

    Args:
        volumes: row label -> RAS volume (X, Y, Z), e.g. {"LR (upsampled)": ..., "SR": ..., "HR": ...}.
        path: output PNG.
        index: (sagittal, coronal, axial) slice numbers used for every volume; None: each volume's centre.
        window: display range (vmin, vmax); None: 0.5th-99.5th percentile over all volumes.
        title: optional figure title.
        spacing: voxel size per RAS axis (mm), so anisotropic volumes show their true proportions; None: square
            voxels.
    """
    return _save(_three_view_figure(volumes, index, window, 2.4, title, spacing), path)


def preview(volumes: Mapping[str, Any], path: str | Path, window: tuple[float, float] | None = (0.0, 1.0)) -> Path:
    """A small :func:`three_view` (central slices) for the inference demo.

    Args:
        volumes: row label -> RAS volume (X, Y, Z).
        path: output PNG.
        window: display range; None for a robust window over all volumes.
    """
    return _save(_three_view_figure(volumes, None, window, 1.4, None), path, dpi=80)


def zoomed_crops(
    volumes: Mapping[str, Any], path: str | Path, axis: int = 0, index: int | None = None,
    box: Sequence[int] | None = None, window: tuple[float, float] | None = (0.0, 1.0), panel: float = 2.6,
    title: str | None = None,
) -> Path:
    """One slice of each volume (columns), whole with the crop's frame (top row) and the crop enlarged (bottom
    row): the place where sharpness differs between methods shows at a glance.

    Args:
        volumes: column label -> RAS volume (X, Y, Z) on one grid, e.g. {"HR": ..., "cubic B-spline": ...}.
        path: output PNG.
        axis: slicing axis (0 sagittal, 1 coronal, 2 axial).
        index: slice number; None: the centre.
        box: ``(row, column, size)`` of the square crop in the displayed plane's array (``vol`` slice, not
            transposed: first index along the first remaining axis); None: a centred square of half the
            smaller side.
        window: display range (vmin, vmax); None: 0.5th-99.5th percentile over all volumes.
        panel: inches per panel.
        title: optional figure title.
    """
    if not volumes:
        raise ValueError("zoomed_crops needs at least one volume")
    vols = {name: _volume(v, name) for name, v in volumes.items()}
    shapes = {v.shape for v in vols.values()}
    if len(shapes) != 1:
        raise ValueError(f"zoomed_crops needs volumes on one grid, got shapes {sorted(shapes)}")
    shape = next(iter(shapes))
    index = shape[axis] // 2 if index is None else int(index)
    plane_shape = [s for a, s in enumerate(shape) if a != axis]
    if box is None:
        size = min(plane_shape) // 2
        box = ((plane_shape[0] - size) // 2, (plane_shape[1] - size) // 2, size)
    r0, c0, size = (int(b) for b in box)
    if size < 2 or r0 < 0 or c0 < 0 or r0 + size > plane_shape[0] or c0 + size > plane_shape[1]:
        raise ValueError(f"crop box {tuple(box)} does not fit a {tuple(plane_shape)} plane")
    if window is None:
        window = (min(float(np.percentile(v, 0.5)) for v in vols.values()),
                  max(float(np.percentile(v, 99.5)) for v in vols.values()))
    from matplotlib.patches import Rectangle

    fig = _figure(figsize=(len(vols) * panel, 2 * panel + (0.4 if title else 0.2)))
    axes = fig.subplots(2, len(vols), squeeze=False)
    for c, (name, vol) in enumerate(vols.items()):
        plane = _plane(vol, axis, index)  # transposed: rows are the second remaining axis
        whole, crop = axes[0, c], axes[1, c]
        whole.imshow(plane, cmap="gray", origin="lower", vmin=window[0], vmax=window[1], interpolation="nearest")
        whole.add_patch(Rectangle((r0 - 0.5, c0 - 0.5), size, size, fill=False, edgecolor="yellow", linewidth=1))
        crop.imshow(plane[c0 : c0 + size, r0 : r0 + size], cmap="gray", origin="lower", vmin=window[0],
                    vmax=window[1], interpolation="nearest")
        whole.set_title(name, fontsize=9)
        for ax in (whole, crop):
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def error_heatmap(
    sr: Any, hr: Any, path: str | Path, axis: int = 0, index: int | None = None, vmax: float | None = None,
) -> Path:
    """Per-pixel absolute error |SR − HR| of one slice, with a colour bar and the slice's PSNR.

    Args:
        sr: super-resolved RAS volume (X, Y, Z) in [0, 1].
        hr: reference volume, same shape.
        path: output PNG.
        axis: slicing axis (0 sagittal, 1 coronal, 2 axial).
        index: slice number; None: the central slice.
        vmax: top of the colour scale; None: the slice's largest error.
    """
    sr_v, hr_v = _volume(sr, "sr"), _volume(hr, "hr")
    if sr_v.shape != hr_v.shape:
        raise ValueError(f"shapes differ: {sr_v.shape} vs {hr_v.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    index = hr_v.shape[axis] // 2 if index is None else int(index)
    err = np.abs(_plane(sr_v, axis, index).astype(np.float64) - _plane(hr_v, axis, index))
    mse = float(np.mean(err**2))
    psnr_text = "inf" if mse == 0 else f"{10 * math.log10(1.0 / mse):.2f}"
    fig = _figure(figsize=(4.4, 4.0))
    ax = fig.subplots()
    image = ax.imshow(err, cmap="inferno", origin="lower", vmin=0.0, vmax=vmax or max(float(err.max()), 1e-6),
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="|SR − HR|", shrink=0.85)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{_VIEWS[axis]} slice {index}: PSNR {psnr_text} dB", fontsize=9)
    return _save(fig, path)


def per_subject_psnr(
    summaries: Mapping[str, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]], path: str | Path,
    metric: str = "psnr",
) -> Path:
    """Grouped bars of a metric (PSNR by default) per subject, one colour per method.

    Args:
        summaries: method -> per-subject summary dicts (from :func:`common.evaluation.evaluate_volume`), or one
            list of summaries (a single method, labelled "SR").
        path: output PNG.
        metric: the summary key to plot.
    """
    by_method = {"SR": list(summaries)} if not isinstance(summaries, Mapping) else dict(summaries)
    subjects: list[str] = []
    for rows in by_method.values():
        subjects += [str(s.get("subject", "")) for s in rows if str(s.get("subject", "")) not in subjects]
    if not subjects:
        raise ValueError("per_subject_psnr needs at least one subject summary")
    colors = _colors(list(by_method))
    width = 0.8 / max(len(by_method), 1)
    fig = _figure(figsize=(max(4.0, 0.5 * len(subjects) * len(by_method) + 1.8), 3.6))
    ax = fig.subplots()
    x = np.arange(len(subjects))
    shown: list[float] = []
    for k, (method, rows) in enumerate(by_method.items()):
        value = {str(s.get("subject", "")): _number(s.get(metric)) for s in rows}
        ys = [value.get(subj) for subj in subjects]
        xs = [xi for xi, y in zip(x, ys) if y is not None]
        ys = [y for y in ys if y is not None]
        shown += ys
        ax.bar(np.asarray(xs) + (k - (len(by_method) - 1) / 2) * width, ys, width=width, color=colors[method],
               label=method)
    if shown:
        lo, hi = min(shown), max(shown)
        spread = (hi - lo) or abs(hi) * 0.05 or 1.0
        ax.set_ylim(max(lo - 1.0 * spread, 0.0) if lo >= 0 else lo - spread, hi + 0.3 * spread)
    ax.set_xticks(x, subjects, rotation=45 if len(subjects) > 4 else 0, ha="right" if len(subjects) > 4 else "center")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def per_slice_psnr(
    per_slice_rows_by_method: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, metric: str = "psnr",
) -> Path:
    """PSNR (or another per-slice metric) against slice number, one curve per method (and subject).

    Args:
        per_slice_rows_by_method: method -> per-slice rows (from :func:`common.evaluation.evaluate_volume`).
            Rows of several subjects give one curve each; infinite values (identical slices) are gaps.
        path: output PNG.
        metric: the row key to plot.
    """
    if not per_slice_rows_by_method or not any(per_slice_rows_by_method.values()):
        raise ValueError("per_slice_psnr needs at least one per-slice row")
    colors = _colors(list(per_slice_rows_by_method))
    fig = _figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    styles = ("-", "--", ":", "-.")
    for method, rows in per_slice_rows_by_method.items():
        subjects = list(dict.fromkeys(str(r.get("subject", "")) for r in rows))
        for j, subject in enumerate(subjects):
            pts = sorted(((int(r["slice"]), _number(r.get(metric))) for r in rows
                          if str(r.get("subject", "")) == subject), key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ys = [np.nan if p[1] is None else p[1] for p in pts]
            label = method if len(subjects) == 1 else f"{method} ({subject})"
            ax.plot(xs, ys, styles[j % len(styles)], color=colors[method], marker=".", markersize=3, linewidth=1,
                    label=label)
    ax.set_xlabel("slice")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
