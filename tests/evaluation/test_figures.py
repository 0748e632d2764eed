"""Result figures (common.evaluation.figures): each writes a valid PNG of the expected layout, atomically."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from common.evaluation import figures as report
from common.evaluation import metrics, tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _phantom(shape=(24, 32, 28), seed=0) -> np.ndarray:
    """An ellipsoid 'head' with an asymmetric bright blob, so orientation mistakes would show."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    head = (sum(g**2 for g in grid) < 0.8).astype(np.float32) * 0.6
    head[(grid[0] - 0.3) ** 2 + (grid[1] - 0.2) ** 2 + (grid[2] - 0.4) ** 2 < 0.05] = 1.0
    return np.clip(head + 0.02 * np.random.default_rng(seed).standard_normal(shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def scored():
    hr = _phantom()
    methods = {"bicubic": 0.08, "SR": 0.03}
    summaries, rows = {}, {}
    for name, noise in methods.items():
        summaries[name], rows[name] = [], []
        for k, subject in enumerate(["sub-01", "sub-02", "sub-03"]):
            sr = np.clip(hr + noise * np.random.default_rng(k).standard_normal(hr.shape), 0, 1)
            s, r = metrics.evaluate_volume(sr, hr, mask=hr > 0.3, subject=subject)
            s["lpips"] = "unavailable"
            summaries[name].append(s)
            rows[name] += r
    return hr, summaries, rows


def _check_png(path, min_size=(50, 50)) -> tuple[int, ...]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    shape = matplotlib.image.imread(path).shape
    assert shape[0] >= min_size[0] and shape[1] >= min_size[1] and shape[2] in (3, 4)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    return shape


def test_bar_chart(tmp_path, scored):
    _, summaries, _ = scored
    means = {name: tables.summarise(rows) for name, rows in summaries.items()}
    path = report.bar_chart(means, tmp_path / "bars.png")
    h, w, _ = _check_png(path)
    assert w > h  # two panels side by side
    report.bar_chart(means, tmp_path / "bars_lpips.png", metrics=("psnr_mask", "ssim2d_mask", "lpips"))
    _check_png(tmp_path / "bars_lpips.png")  # "unavailable" LPIPS is drawn as n/a, not as a bar


@pytest.mark.parametrize("index", [None, (3, 10, 20)])
def test_three_view(tmp_path, scored, index):
    hr = scored[0]
    volumes = {"LR (upsampled)": hr * 0.9, "SR": torch.from_numpy(hr), "HR": hr}
    h, w, _ = _check_png(report.three_view(volumes, tmp_path / "three.png", index=index, title="x2"))
    assert h > w * 0.8  # three rows of three roughly square panels


@pytest.mark.parametrize("spacing, ratio", [(None, 0.5), ((2.0, 1.0, 1.0), 1.0)])
def test_three_view_spacing(tmp_path, spacing, ratio):
    """8 voxels of 2 mm by 16 of 1 mm: the coronal panel is half as wide as tall on square voxels, square in mm."""
    path = report.three_view({"v": np.zeros((8, 16, 16), np.float32)}, tmp_path / "s.png", spacing=spacing)
    img = matplotlib.image.imread(path)[..., :3].mean(axis=2)
    middle = img[:, img.shape[1] // 3: 2 * img.shape[1] // 3] < 0.1  # the coronal column: black where the volume is
    r, c = (int(np.median(i)) for i in np.nonzero(middle))  # the panel's centre (titles are small beside it)
    width, height = middle[r].sum(), middle[:, c].sum()
    assert width / height == pytest.approx(ratio, rel=0.1)


def test_three_view_orientation(tmp_path):
    """A bright voxel block at high Z must appear in the top half of the sagittal panel (superior up)."""
    vol = np.zeros((16, 16, 16), np.float32)
    vol[:, :, 12:] = 1.0
    path = report.three_view({"v": vol}, tmp_path / "o.png")
    img = matplotlib.image.imread(path)[..., :3].mean(axis=2)
    left = img[:, : img.shape[1] // 3]  # sagittal column
    rows = np.flatnonzero(left.max(axis=1) > 0.9)
    assert rows.size and rows.mean() < img.shape[0] / 2


def test_preview_is_small(tmp_path, scored):
    hr = scored[0]
    volumes = {"LR": hr, "SR": hr, "HR": hr}
    small = _check_png(report.preview(volumes, tmp_path / "p.png"))
    big = _check_png(report.three_view(volumes, tmp_path / "t.png"))
    assert small[0] < big[0] and small[1] < big[1]


@pytest.mark.parametrize("axis,index", [(0, None), (1, 5), (2, None)])
def test_error_heatmap(tmp_path, scored, axis, index):
    hr = scored[0]
    sr = np.clip(hr + 0.05, 0, 1)
    _check_png(report.error_heatmap(sr, hr, tmp_path / "err.png", axis=axis, index=index))


def test_error_heatmap_identical(tmp_path, scored):
    hr = scored[0]
    _check_png(report.error_heatmap(hr, hr, tmp_path / "zero.png"))  # zero error: inf dB, no crash


@pytest.mark.parametrize("as_dict", [True, False])
def test_per_subject_psnr(tmp_path, scored, as_dict):
    summaries = scored[1] if as_dict else scored[1]["SR"]
    _check_png(report.per_subject_psnr(summaries, tmp_path / "subj.png"))


def test_per_slice_psnr(tmp_path, scored):
    rows = scored[2]
    first = {name: [r for r in rs if r["subject"] == "sub-01"] for name, rs in rows.items()}
    first["SR"][0] = dict(first["SR"][0], psnr=math.inf)  # a perfect slice is a gap, not a crash
    _check_png(report.per_slice_psnr(first, tmp_path / "slices.png"))
    _check_png(report.per_slice_psnr(rows, tmp_path / "slices_all.png"))  # several subjects: one curve each


def test_failed_write_leaves_no_file(tmp_path, scored, monkeypatch):
    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE)  # a partial file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    hr = scored[0]
    with pytest.raises(OSError, match="disk full"):
        report.three_view({"HR": hr}, tmp_path / "fail.png")
    with pytest.raises(OSError):
        report.bar_chart({"SR": {"psnr": 30.0, "ssim2d": 0.9}}, tmp_path / "fail2.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda p: report.bar_chart({}, p),
        lambda p: report.three_view({"flat": np.zeros((8, 8))}, p),
        lambda p: report.three_view({"v": np.zeros((8, 8, 8))}, p, index=(0, 9, 0)),
        lambda p: report.error_heatmap(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)), p),
        lambda p: report.per_slice_psnr({"SR": []}, p),
    ],
)
def test_bad_input_raises_and_writes_nothing(tmp_path, call):
    with pytest.raises(ValueError):
        call(tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def test_zoomed_crops_layout_and_checks(tmp_path):
    """Two rows (whole slice with the frame, enlarged crop) and a column per volume; the crop is the box's pixels."""
    hr = _phantom()
    vols = {"HR": hr, "blurred": hr * 0.5, "SR": hr}
    path = report.zoomed_crops(vols, tmp_path / "crops.png", axis=0, index=12, box=(4, 6, 12))
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(str(path))
    assert image.shape[1] > image.shape[0]  # three columns, two rows
    with pytest.raises(ValueError, match="does not fit"):
        report.zoomed_crops(vols, tmp_path / "bad.png", box=(30, 0, 8))
    with pytest.raises(ValueError, match="one grid"):
        report.zoomed_crops({"HR": hr, "other": hr[:-1]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
