"""The evaluation path (common.evaluation.metrics) against scikit-image, and the protocol rules of methods.md §5."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common.evaluation import metrics as M
from common.evaluation import tables as T

SHAPE = (12, 40, 40)
SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


def _pair(seed: int, noise: float, shape=SHAPE, smooth: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A reference in [0, 1] and a noisy prediction of it."""
    rng = np.random.default_rng(seed)
    if smooth:  # bright, nearly flat: the worst case for float32 variance cancellation
        hr = 0.8 + 0.02 * rng.random(shape)
    else:
        hr = rng.random(shape)
    sr = np.clip(hr + noise * rng.standard_normal(shape), 0.0, 1.0)
    return sr, hr


def _block2(v: np.ndarray) -> np.ndarray:
    """2x2 block average over axes 1 and 2 (the seed task's degradation)."""
    x, y, z = v.shape
    return v.reshape(x, y // 2, 2, z // 2, 2).mean(axis=(2, 4))


@pytest.fixture(scope="module")
def random_lpips() -> M.LPIPS:
    return M.LPIPS(net="alex", backbone="random")


@pytest.mark.parametrize("seed,noise", [(0, 0.05), (1, 0.2), (2, 0.01)])
def test_psnr_matches_skimage(seed, noise):
    sr, hr = _pair(seed, noise)
    assert M.psnr(sr, hr) == pytest.approx(peak_signal_noise_ratio(hr, sr, data_range=1.0), abs=1e-4)
    per_slice = M.psnr_slices(sr, hr, axis=2)
    expected = [peak_signal_noise_ratio(hr[:, :, k], sr[:, :, k], data_range=1.0) for k in range(SHAPE[2])]
    np.testing.assert_allclose(per_slice, expected, atol=1e-4)


def test_psnr_accepts_tensors_and_float32():
    sr, hr = _pair(3, 0.1)
    ref = M.psnr(sr, hr)
    assert M.psnr(torch.from_numpy(sr)[None, None], torch.from_numpy(hr).float()) == pytest.approx(ref, abs=1e-4)
    assert M.psnr(sr.astype(np.float32), hr.astype(np.float32)) == pytest.approx(ref, abs=1e-4)


def test_masked_psnr_is_psnr_of_mask_voxels():
    sr, hr = _pair(4, 0.1)
    mask = np.random.default_rng(5).random(SHAPE) > 0.7
    mse = np.mean((sr[mask] - hr[mask]) ** 2)
    assert M.psnr(sr, hr, mask=mask) == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-9)
    per_slice = M.psnr_slices(sr, hr, axis=0, mask=mask)
    for i in range(SHAPE[0]):
        m = mask[i]
        assert per_slice[i] == pytest.approx(10 * math.log10(1.0 / np.mean((sr[i][m] - hr[i][m]) ** 2)))
    with pytest.raises(ValueError, match="no voxel"):
        M.psnr(sr, hr, mask=np.zeros(SHAPE, bool))


@pytest.mark.parametrize(
    "seed,noise,axis,smooth",
    [(0, 0.05, 0, False), (1, 0.2, 1, False), (2, 0.1, 2, False), (3, 0.002, 0, True)],
)
def test_ssim2d_matches_skimage(seed, noise, axis, smooth):
    sr, hr = _pair(seed, noise, smooth=smooth)
    got = M.ssim2d_slices(sr, hr, axis=axis)
    expected = [
        structural_similarity(np.take(hr, i, axis), np.take(sr, i, axis), **SK_SSIM) for i in range(SHAPE[axis])
    ]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_masked_ssim2d_is_mean_of_skimage_map_over_mask():
    sr, hr = _pair(6, 0.1)
    mask = np.zeros(SHAPE, bool)
    mask[:, 3:30, 10:38] = True  # reaches the border, where the full-size map matters
    mask[5] = False
    got = M.ssim2d_slices(sr, hr, axis=0, mask=mask)
    for i in range(SHAPE[0]):
        if i == 5:
            assert math.isnan(got[i])
            continue
        _, smap = structural_similarity(hr[i], sr[i], full=True, **SK_SSIM)
        assert got[i] == pytest.approx(smap[mask[i]].mean(), abs=1e-4)


@pytest.mark.parametrize("seed,noise,smooth", [(0, 0.05, False), (1, 0.3, False), (2, 0.002, True)])
def test_ssim3d_matches_skimage(seed, noise, smooth):
    sr, hr = _pair(seed, noise, shape=(14, 20, 16), smooth=smooth)
    assert M.ssim3d(sr, hr) == pytest.approx(structural_similarity(hr, sr, **SK_SSIM), abs=1e-4)
    mask = np.random.default_rng(seed).random(hr.shape) > 0.5
    _, smap = structural_similarity(hr, sr, full=True, **SK_SSIM)
    assert M.ssim3d(sr, hr, mask=mask) == pytest.approx(smap[mask].mean(), abs=1e-4)


@pytest.mark.parametrize("shape", [(40, 40), (1, 40, 40), (40, 1, 40), (10, 40, 40), (40, 40, 5)])
def test_ssim3d_refuses_single_slices_and_thin_volumes(shape):
    a = np.random.default_rng(0).random(shape)
    with pytest.raises(ValueError):
        M.ssim3d(a, a)


def test_ssim3d_is_not_2d_ssim():
    sr, hr = _pair(7, 0.1, shape=(16, 40, 40))
    assert M.ssim3d(sr, hr) != pytest.approx(M.ssim2d_slices(sr, hr).mean(), abs=1e-3)


def test_nonempty_slices_rule():
    hr = np.zeros(SHAPE)
    hr[2:9] = 0.5
    hr[10, 0, 0] = 1.0  # one stray voxel is not a slice with signal
    keep = M.nonempty_slices(hr)
    assert keep.tolist() == [False, False] + [True] * 7 + [False] * 3
    assert M.nonempty_slices(hr, axis=1).all()


def test_empty_slices_are_not_scored():
    sr, hr = _pair(8, 0.05)
    hr[:3] = 0.0
    hr[-2:] = 0.0
    sr[:3] = 0.0  # identical empty slices: the source study scored these as 100 dB
    summary, rows = M.evaluate_volume(sr, hr, subject="s")
    assert [r["slice"] for r in rows] == list(range(3, SHAPE[0] - 2))
    assert summary["n_slices"] == SHAPE[0] and summary["n_slices_scored"] == len(rows)
    assert all(math.isfinite(r["psnr"]) and r["psnr"] < 60 for r in rows)
    kept = slice(3, SHAPE[0] - 2)
    assert summary["psnr"] == pytest.approx(peak_signal_noise_ratio(hr[kept], sr[kept], data_range=1.0))
    assert summary["ssim2d"] == pytest.approx(np.mean([r["ssim2d"] for r in rows]))


def test_all_empty_volume_gives_no_scores():
    zeros = np.zeros(SHAPE)
    summary, rows = M.evaluate_volume(zeros, zeros, subject="empty")
    assert rows == []
    assert summary["n_slices_scored"] == 0
    assert summary["psnr"] is None and summary["ssim2d"] is None and summary["ssim3d"] is None


def test_evaluate_volume_keys_and_mask_variants():
    sr, hr = _pair(9, 0.05, shape=(16, 40, 40))
    mask = np.zeros(hr.shape, bool)
    mask[2:14, 5:35, 5:35] = True
    summary, rows = M.evaluate_volume(torch.from_numpy(sr), hr, mask=mask, subject="s1")
    assert tuple(summary) == M.SUMMARY_KEYS
    assert all(tuple(r) == M.SLICE_KEYS for r in rows)
    assert summary["psnr_mask"] == pytest.approx(M.psnr(sr, hr, mask=mask))
    assert summary["ssim3d"] == pytest.approx(M.ssim3d(sr, hr))
    assert summary["ssim3d_mask"] == pytest.approx(M.ssim3d(sr, hr, mask=mask))
    assert summary["lpips"] is None and summary["data_consistency"] is None
    assert rows[0]["psnr_mask"] is None and rows[5]["psnr_mask"] is not None  # slice 0 is outside the mask


@pytest.mark.parametrize("noise", [0.01, 0.05, 0.2])
def test_data_consistency(noise):
    _, hr = _pair(10, 0.0)
    lr = _block2(hr)
    assert M.data_consistency(hr, lr, _block2) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(11)
    dc = [M.data_consistency(hr + s * rng.standard_normal(hr.shape), lr, _block2) for s in (noise, 2 * noise)]
    assert 0 < dc[0] < dc[1]
    summary, _ = M.evaluate_volume(hr, hr, lr=lr, degrade=_block2)
    assert summary["data_consistency"] == pytest.approx(0.0, abs=1e-12)


def test_lpips_random_backbone(random_lpips):
    assert random_lpips.available and random_lpips.reason == ""
    sr, hr = _pair(12, 0.2)
    value = random_lpips(sr, hr)
    assert math.isfinite(value) and value > 0
    assert random_lpips(hr, hr) == pytest.approx(0.0, abs=1e-6)
    again = M.LPIPS(net="alex", backbone="random")  # seeded: the same random trunk every time
    assert again(sr, hr) == pytest.approx(value, rel=1e-5)
    summary, _ = M.evaluate_volume(sr, hr, lpips=random_lpips)
    assert summary["lpips"] == pytest.approx(value, rel=1e-5)
    with pytest.raises(ValueError, match="too small"):
        random_lpips(sr, hr, axis=1)  # 12 x 40 slices are below AlexNet's minimum


@pytest.mark.parametrize("how", ["get_dir", "TORCH_HOME"])
def test_lpips_pretrained_without_cached_weights_is_unavailable(how, tmp_path, monkeypatch):
    if how == "get_dir":
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    else:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = M.LPIPS(net="alex", backbone="pretrained")
    assert not metric.available
    assert "alexnet-owt-7be5be79.pth" in metric.reason and str(tmp_path) in metric.reason
    sr, hr = _pair(13, 0.1)
    assert metric(sr, hr) is None
    summary, _ = M.evaluate_volume(sr, hr, lpips=metric)
    assert summary["lpips"] == "unavailable"
    assert not any(tmp_path.rglob("*.pth"))  # nothing was downloaded


def test_lpips_corrupt_cached_weights_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"not a checkpoint")
    metric = M.LPIPS(net="alex", backbone="pretrained")
    assert not metric.available and "could not be built" in metric.reason


def test_summarise_skips_missing_values():
    rows = [
        {"subject": "a", "psnr": 30.0, "lpips": "unavailable", "ssim3d": None},
        {"subject": "b", "psnr": 32.0, "lpips": "unavailable", "ssim3d": 0.9},
    ]
    mean = T.summarise(rows)
    assert mean == {"subject": "mean", "psnr": 31.0, "lpips": "unavailable", "ssim3d": 0.9, "n_subjects": 2}


def test_write_tables_round_trip(tmp_path):
    sr, hr = _pair(14, 0.05)
    hr[:2] = 0.0
    mask = hr > 0.3
    summaries, rows = [], []
    for k, name in enumerate(["sub-01", "sub-02"]):
        s, r = M.evaluate_volume(sr * (1 - 0.1 * k), hr, mask=mask, subject=name, lr=_block2(hr), degrade=_block2)
        s["lpips"] = "unavailable"
        summaries.append(s)
        rows += r
    rows[0]["psnr"] = math.inf  # a perfect slice: infinite PSNR must survive strict JSON
    paths = T.write_tables(summaries, rows, tmp_path / "out", prefix="bench")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())

    subj = json.loads(paths["per_subject_json"].read_text())
    assert subj["subjects"] == summaries
    assert subj["mean"] == T.summarise(summaries)
    assert subj["mean"]["psnr"] == pytest.approx(np.mean([s["psnr"] for s in summaries]))
    assert subj["mean"]["lpips"] == "unavailable"

    with open(paths["per_subject_csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["subject"] for t in table] == ["sub-01", "sub-02"]
    for t, s in zip(table, summaries):
        for key in ("psnr", "psnr_mask", "ssim2d", "ssim2d_mask", "ssim3d_mask", "data_consistency"):
            assert float(t[key]) == s[key]
        assert t["ssim3d"] == "" and s["ssim3d"] is None  # 10 scored slices: too thin for the 3D window
        assert t["lpips"] == "unavailable" and int(t["n_slices_scored"]) == s["n_slices_scored"]

    per_slice = json.loads(paths["per_slice_json"].read_text())
    assert per_slice[0]["psnr"] == "inf" and per_slice[1:] == rows[1:]
    with open(paths["per_slice_csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and math.isinf(float(table[0]["psnr"]))
    assert [float(t["ssim2d"]) for t in table] == [r["ssim2d"] for r in rows]
