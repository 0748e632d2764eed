"""NIfTI input/output with geometry, atomic writes, and the LR <-> HR affine rule (methods.md §0).

Volumes are handled internally in RAS orientation as float32 arrays. Each loaded volume keeps what is needed to
write a result back in the input's own orientation: the original orientation code and the original shape.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
import torch

from common.utils import available_memory

from .parallel_gzip import write_gzip

__all__ = [
    "NIFTI_SUFFIXES",
    "InputFileError",
    "VolumeError",
    "find_input_error",
    "BYTES_PER_OUTPUT_VOXEL",
    "nifti_stem",
    "is_nifti",
    "list_nifti",
    "Volume",
    "check_nifti_header",
    "check_size",
    "check_values",
    "volume_from_array",
    "load_volume",
    "atomic_path",
    "save_volume",
    "scale_affine",
    "lr_affine",
    "hr_affine",
]


NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Peak working memory per output voxel, a conservative bound over the bundles: the float32 prediction plus the
# windowed inferers' sum and weight buffers, the K-sample mean and spread, the denormalised and reoriented copies
# written out, and the HR reference of the embedded demo (about 16 float32 volumes on the HR grid).
BYTES_PER_OUTPUT_VOXEL = 64

logger = logging.getLogger("common")


class InputFileError(ValueError):
    """A bad input file (a volume, a weights file, a checkpoint); the message starts with the file's path, so a
    command can end with one ``error: <file>: <problem>`` line (:func:`common.engines.install_error_hook`)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the library's message looked like
        super().__init__(f"{path}: {self.problem}")


class VolumeError(InputFileError):
    """A bad input volume (or folder of volumes)."""


def find_input_error(err: BaseException | None) -> InputFileError | None:
    """The :class:`InputFileError` behind an exception, through MONAI's and ignite's wrapping, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InputFileError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without its NIfTI suffix (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether the name ends with .nii or .nii.gz."""
    return str(path).endswith(NIFTI_SUFFIXES)


def list_nifti(folder: str | os.PathLike) -> list[Path]:
    """Sorted NIfTI files directly in ``folder``; raises VolumeError when the folder is missing or has none.

    Other files are skipped with a log line; hidden files too (a ``.name`` is the temporary file of an atomic
    write that a killed run left behind, never an input).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(folder, "no such folder" if not folder.exists() else "not a folder")
    files, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        (files if p.is_file() and is_nifti(p) else skipped).append(p)
    if skipped:
        logger.info("skipping %d non-NIfTI entries in %s: %s", len(skipped), folder, ", ".join(p.name for p in skipped))
    if not files:
        raise VolumeError(folder, "no NIfTI files (*.nii, *.nii.gz) in this folder")
    return files


@dataclass
class Volume:
    """A volume in RAS orientation with what is needed to write results in the input's orientation.

    Attributes:
        data: float32 array (X, Y, Z) in RAS voxel order.
        affine: 4x4 voxel-to-world matrix of ``data`` (RAS-ordered axes).
        source_ornt: the input's orientation (nibabel ornt array) to restore when writing.
        path: where it was read from ('' when built in memory).
        header_dtype: the on-disk data type, for information.
    """

    data: np.ndarray
    affine: np.ndarray
    source_ornt: np.ndarray = field(default_factory=lambda: nib.orientations.axcodes2ornt(("R", "A", "S")))
    path: str = ""
    header_dtype: str = "float32"


def _open(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise VolumeError(path, "no such file")
    if not is_nifti(path):
        raise VolumeError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for broken files
        raise VolumeError(path, f"unreadable NIfTI ({type(err).__name__}: {err})") from err
    return img


def check_nifti_header(
    path: str | os.PathLike,
    min_shape: Sequence[int] = (1, 1, 1),
    scale_factor: Sequence[float] = (1, 1, 1),
    bytes_per_output_voxel: int = BYTES_PER_OUTPUT_VOXEL,
) -> tuple[int, ...]:
    """Header-level checks, before any voxel is read: readable, real-valued, one 3D volume (trailing singleton
    axes accepted), large enough, and small enough for the memory this process has; returns the 3D shape.

    Args:
        path: the NIfTI file.
        min_shape: smallest accepted size per axis (after RAS reorientation the axes may be permuted, so the
            check uses the sorted sizes against the sorted minimum).
        scale_factor: the method's upsampling factors, for the size of the output.
        bytes_per_output_voxel: working memory per output voxel (see :data:`BYTES_PER_OUTPUT_VOXEL`).
    """
    return _checked_shape(Path(path), _open(Path(path)), min_shape, scale_factor, bytes_per_output_voxel)


def _checked_shape(path: Path, img: nib.Nifti1Image, min_shape, scale_factor, bytes_per_output_voxel) -> tuple:
    dtype = img.get_data_dtype()
    if dtype.names is not None:  # NIfTI RGB24 / RGBA32 are structured dtypes
        raise VolumeError(path, f"colour (RGB) data ({', '.join(dtype.names)}): expected one grayscale channel")
    if dtype.kind == "c":
        raise VolumeError(path, f"complex-valued data ({dtype}): give the magnitude image, e.g. abs() of it")
    if dtype.kind not in "biuf":
        raise VolumeError(path, f"unsupported data type {dtype}: expected integer or floating-point voxels")
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeError(path, f"not a 3D image (shape {shape}); expected one 3D volume with one channel")
    check_size(path, shape, min_shape, scale_factor, bytes_per_output_voxel)
    return shape


def check_size(
    path: str | os.PathLike,
    shape: Sequence[int],
    min_shape: Sequence[int] = (1, 1, 1),
    scale_factor: Sequence[float] = (1, 1, 1),
    bytes_per_output_voxel: int = BYTES_PER_OUTPUT_VOXEL,
) -> None:
    """Refuse a 3D ``shape`` smaller than ``min_shape`` (sorted sizes, as axes may be permuted to RAS) or whose
    output at ``scale_factor`` would not fit in the memory this process has; ``path`` names it in the error."""
    shape = tuple(int(s) for s in shape)
    if any(s < m for s, m in zip(sorted(shape), sorted(min_shape))):
        raise VolumeError(path, f"volume {shape} is smaller than the method needs ({tuple(min_shape)})")
    need = math.prod(shape) * (4 + math.prod(float(f) for f in scale_factor) * bytes_per_output_voxel)
    free = available_memory()
    if free is not None and need > free:
        raise VolumeError(
            path, f"volume {shape} needs about {need / 2**30:.1f} GiB of memory here, more than the "
            f"{free / 2**30:.1f} GiB available: crop it or run it on a machine with more memory",
        )


def check_values(path: str | os.PathLike, data: np.ndarray) -> None:
    """Refuse non-finite voxels and a constant volume (nothing to super-resolve); ``path`` names it."""
    if not np.isfinite(data).all():
        raise VolumeError(path, f"contains {int((~np.isfinite(data)).sum())} NaN/Inf voxels")
    if data.min() == data.max():
        raise VolumeError(path, f"constant volume (every voxel is {data.flat[0]:g}): nothing to super-resolve")


def volume_from_array(
    data: np.ndarray, affine: np.ndarray, path: str | os.PathLike = "", header_dtype: str | None = None
) -> Volume:
    """A RAS :class:`Volume` from a 3D array of any orientation and its voxel-to-world (RAS) ``affine``; the
    array's own orientation is kept as ``source_ornt`` to write results in it."""
    data = np.asarray(data, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    source_ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    to_ras = nib.orientations.ornt_transform(source_ornt, ras)
    data_ras = nib.orientations.apply_orientation(data, to_ras)
    affine_ras = affine @ nib.orientations.inv_ornt_aff(to_ras, data.shape)
    return Volume(
        data=np.ascontiguousarray(data_ras, dtype=np.float32),
        affine=affine_ras,
        source_ornt=source_ornt,
        path=str(path),
        header_dtype=header_dtype or str(data.dtype),
    )


def load_volume(
    path: str | os.PathLike, min_shape: Sequence[int] = (1, 1, 1), scale_factor: Sequence[float] = (1, 1, 1)
) -> Volume:
    """Read a 3D NIfTI of any orientation and real dtype as a float32 RAS volume, keeping its geometry.

    Args:
        path: the NIfTI file.
        min_shape: smallest accepted size per axis.
        scale_factor: the method's upsampling factors (for the memory check of :func:`check_nifti_header`).

    Raises:
        VolumeError: missing, unreadable or truncated file, complex or colour data, not 3D, too small, too large
            for the memory available, non-finite values, or a constant volume (nothing to super-resolve).
    """
    path = Path(path)
    img = _open(path)
    shape = _checked_shape(path, img, min_shape, scale_factor, BYTES_PER_OUTPUT_VOXEL)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # truncated gzip, a header that promises more data than the file holds, ...
        raise VolumeError(path, f"unreadable image data ({type(err).__name__}: {err})") from err
    data = data.reshape(shape)
    check_values(path, data)
    return volume_from_array(data, img.affine, path, header_dtype=str(img.get_data_dtype()))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary name keeps the file's suffixes so writers that infer the format from the name still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the result the permissions of a normal file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_volume(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    source_ornt: np.ndarray | None = None,
    protect: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write a RAS float32 volume as NIfTI in the original orientation, atomically.

    Args:
        path: output file (.nii or .nii.gz).
        data: (X, Y, Z) array in RAS voxel order.
        affine: voxel-to-world matrix of ``data``.
        source_ornt: orientation to write in (the input's, from :class:`Volume`); RAS when None.
        protect: input files that must never be overwritten.
    """
    path = Path(path)
    if any(Path(p).resolve() == path.resolve() for p in protect if p):
        raise VolumeError(path, "refusing to overwrite an input file; choose another output folder")
    data = np.asarray(data, dtype=np.float32)
    if source_ornt is not None:
        ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
        from_ras = nib.orientations.ornt_transform(ras, source_ornt)
        affine = affine @ nib.orientations.inv_ornt_aff(from_ras, data.shape)
        data = nib.orientations.apply_orientation(data, from_ras)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(np.float32)
    with atomic_path(path) as tmp:
        if path.name.lower().endswith(".gz"):
            # nibabel's own level (1), deflated on the cores torch was given: half the writing time on two cores
            write_gzip(tmp, img.to_bytes(), level=nib.openers.Opener.default_compresslevel,
                       workers=torch.get_num_threads())
        else:
            nib.save(img, str(tmp))
    return path


def scale_affine(affine: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Affine of a grid whose voxel i covers source voxels [f*i, f*i + f) on each axis (f may be fractional).

    The new voxel centre sits at source index f*i + (f - 1)/2: spacing times f, origin moved by (f - 1)/2
    source voxels. f = 2 gives the LR grid of a 2x block average; f = 1/2 maps it back (methods.md §0).
    Works for any (n+1)x(n+1) affine; missing trailing factors count as 1.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ndim = affine.shape[0] - 1
    factors = np.asarray(list(factors) + [1.0] * (ndim - len(factors)), dtype=np.float64)
    if factors.shape != (ndim,) or (factors <= 0).any():
        raise ValueError(f"need up to {ndim} positive scale factors, got {factors.tolist()}")
    index_map = np.eye(ndim + 1)
    index_map[:ndim, :ndim] = np.diag(factors)
    index_map[:ndim, ndim] = (factors - 1.0) / 2.0
    return affine @ index_map


def lr_affine(hr_affine: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """LR affine for an HR grid reduced by integer ``factors``: LR voxel i covers HR voxels f*i .. f*i+f-1."""
    return scale_affine(hr_affine, [float(f) for f in factors])


def hr_affine(lr_affine_: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """HR affine of an SR output upsampled by integer ``factors``: the exact inverse of :func:`lr_affine`."""
    return scale_affine(lr_affine_, [1.0 / float(f) for f in factors])
