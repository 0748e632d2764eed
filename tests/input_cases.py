"""The input matrix of docs/bundle_contract.md: files that every command must either process with the right
geometry (GOOD) or refuse with one ``error: <file>: <problem>`` line (BAD). Shared by the library tests
(tests/data/test_input_matrix.py) and the per-bundle command tests (tests/test_bundles.py).

Each writer takes a folder and a base volume (a small real crop, float32 in RAS order) and returns the file it
wrote; BAD entries also give a fragment of the expected problem.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np


def oblique_affine(zooms=(1.0, 1.2, 0.9), degrees=(12.0, -7.0, 20.0), origin=(-30.0, 12.0, 40.0)) -> np.ndarray:
    """A voxel-to-world matrix rotated about all three axes (no axis-aligned orientation)."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


def _save(path: Path, data, affine=None) -> Path:
    data = np.asarray(data)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine, dtype=data.dtype), str(path))
    return path


def _as_lpi(folder, base):
    """Stored with L, P, I voxel axes (every axis flipped against RAS)."""
    return _save(folder / "lpi.nii.gz", base[::-1, ::-1, ::-1].astype(np.int16),
                 np.array([[-0.9, 0, 0, 20.0], [0, -1.0, 0, 30.0], [0, 0, -1.1, 25.0], [0, 0, 0, 1]]))


def _int(dtype):
    def write(folder, base):
        info = np.iinfo(dtype)
        scale = min(float(info.max) / max(float(base.max()), 1.0), 2.0**40)  # int64 values beyond float32's 2^24
        data = np.clip(np.round(base * scale), info.min, info.max).astype(dtype)
        return _save(folder / f"int_{np.dtype(dtype).name}.nii.gz", data)
    return write


GOOD = {
    "lpi": _as_lpi,
    "oblique": lambda folder, base: _save(folder / "oblique.nii.gz", base, oblique_affine()),
    "anisotropic": lambda folder, base: _save(folder / "aniso.nii.gz", base, np.diag([0.5, 0.5, 6.0, 1.0])),
    "trailing_singleton": lambda folder, base: _save(folder / "singleton4d.nii.gz", base[..., None]),
    "uint8": _int(np.uint8),
    "int64": _int(np.int64),
    "float64": lambda folder, base: _save(folder / "float64.nii", base.astype(np.float64)),
}


def _truncated_gzip(folder, base):
    good = _save(folder / "whole.nii.gz", base)
    raw = good.read_bytes()
    good.unlink()
    path = folder / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _not_gzipped(folder, base):
    plain = _save(folder / "plain.nii", base)
    path = folder / "not_gzipped.nii.gz"
    shutil.move(plain, path)
    return path


def _header_lies(folder, base):
    """A header that promises more voxels than the file holds."""
    path = _save(folder / "short_data.nii", base)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])  # data cut short; the 352-byte header intact
    return path


def _huge(folder, base):
    """A valid header for a volume far beyond this machine's memory, followed by (almost) no data."""
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    path = folder / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


def _with_values(name, value):
    def write(folder, base):
        data = base.copy()
        data[data.shape[0] // 2, 3, 3] = value
        return _save(folder / f"{name}.nii.gz", data)
    return write


BAD = {
    "truncated_gzip": (_truncated_gzip, "unreadable"),
    "not_gzipped": (_not_gzipped, "unreadable NIfTI"),
    "header_lies": (_header_lies, "unreadable image data"),
    "2d": (lambda folder, base: _save(folder / "flat.nii.gz", base[:, :, 0]), "not a 3D image"),
    "4d": (lambda folder, base: _save(folder / "series.nii.gz", np.stack([base, base], -1)), "not a 3D image"),
    "complex": (lambda folder, base: _save(folder / "complex.nii.gz", (base + 1j * base).astype(np.complex64)),
                "complex-valued"),
    "rgb": (lambda folder, base: _save(folder / "rgb.nii.gz", np.zeros(base.shape, [("R", "u1"), ("G", "u1"),
                                                                                      ("B", "u1")])), "RGB"),
    "nan": (_with_values("nan", np.nan), "NaN"),
    "inf": (_with_values("inf", np.inf), "NaN/Inf"),
    "all_zero": (lambda folder, base: _save(folder / "zeros.nii.gz", np.zeros_like(base)), "constant volume"),
    "constant": (lambda folder, base: _save(folder / "constant.nii.gz", np.full_like(base, 7.0)), "constant volume"),
    "too_small": (lambda folder, base: _save(folder / "tiny.nii.gz", base[:1, :1, :1]), "smaller than"),
    "too_large": (_huge, "GiB of memory"),
}


def write_duplicate_stems(folder: Path, base) -> list[Path]:
    """``twin.nii`` and ``twin.nii.gz``: both would write ``twin_sr.nii.gz``."""
    return [_save(folder / "twin.nii", base), _save(folder / "twin.nii.gz", base)]
