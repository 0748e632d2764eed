"""MetaTensor <-> ITK image with the geometry kept, on MONAI's ``itk_torch_bridge``, and ITK's thread count.

The collection's volumes are channel-first (1, X, Y, Z) MetaTensors with a RAS affine; ITK images carry an LPS
origin, spacing and direction. MONAI's bridge converts the affine one way; :func:`from_itk` turns its LPS answer
back into RAS and keeps the meta (path, source orientation) of the volume the image came from, so a result
written by :class:`common.transforms.SaveSRd` lands in the input's orientation. ``itk`` is imported inside the
functions: ``import common.transforms`` stays free of ITK's start-up (seconds).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import orientation_ras_lps
from monai.utils import SpaceKeys

__all__ = ["import_itk", "in_fresh_process", "to_itk", "from_itk", "set_itk_threads"]

_THREADER_SET = False


def import_itk():
    """``itk``, with ITK's global threader switched once from TBB to the platform threader.

    Measured here (2 cores, itk 5.4.7, itk-elastix 0.25.4): a rigid elastix registration that takes 1.8 s
    takes 100 s once N4 has run in the same process under ITK's default TBB threader, and 1.7 s under the
    platform threader (N4 itself unchanged). ``ITK_GLOBAL_DEFAULT_THREADER`` in the environment, ITK's own
    switch, is left to rule when set.
    """
    global _THREADER_SET
    import itk

    if not _THREADER_SET:
        if "ITK_GLOBAL_DEFAULT_THREADER" not in os.environ:
            threader = itk.MultiThreaderBase
            threader.SetGlobalDefaultThreader(threader.ThreaderTypeFromString("PLATFORM"))
        _THREADER_SET = True
    return itk


def _as_metatensor(volume, affine=None) -> MetaTensor:
    if isinstance(volume, MetaTensor):
        out = volume if volume.ndim == 4 else volume[None]
        return out if affine is None else MetaTensor(out.as_tensor(), affine=torch.as_tensor(affine))
    if affine is None:
        raise ValueError("an array needs its affine (a MetaTensor carries its own)")
    arr = torch.as_tensor(np.asarray(volume, dtype=np.float32))
    return MetaTensor(arr if arr.ndim == 4 else arr[None], affine=torch.as_tensor(affine, dtype=torch.float64))


def to_itk(volume, affine=None, pixel: str = "float32"):
    """An ``itk.Image`` of a (1, X, Y, Z) or (X, Y, Z) volume in world coordinates.

    Args:
        volume: a MetaTensor (its RAS affine is used) or an array with ``affine``.
        affine: 4x4 RAS voxel-to-world matrix, for arrays (or to override a MetaTensor's).
        pixel: the ITK pixel type's NumPy name ("float32" for images, "uint8" for masks).
    """
    import_itk()
    from monai.data.itk_torch_bridge import metatensor_to_itk_image

    mt = _as_metatensor(volume, affine)
    mt = MetaTensor(mt.as_tensor().float(), affine=mt.affine, meta={"space": SpaceKeys.RAS})
    return metatensor_to_itk_image(mt, channel_dim=0, dtype=np.dtype(pixel))


def from_itk(image, like: MetaTensor | None = None, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """A (1, X, Y, Z) MetaTensor with a RAS affine from an ``itk.Image``.

    Args:
        image: the ITK image.
        like: a volume whose meta (path, source orientation, ...) the result keeps; the affine is the image's.
        dtype: the result's torch dtype.
    """
    from monai.data.itk_torch_bridge import itk_image_to_metatensor

    mt = itk_image_to_metatensor(image, channel_dim=None, dtype=dtype)
    affine = orientation_ras_lps(mt.affine.to(torch.float64))
    meta = dict(like.meta) if isinstance(like, MetaTensor) else {}
    meta.update(affine=affine, original_affine=affine, space=SpaceKeys.RAS)
    return MetaTensor(mt.as_tensor().contiguous(), meta=meta)  # the bridge already adds the channel axis


_IN_FRESH_PROCESS = False  # set by common.transforms.itk_worker in the process it runs


def in_fresh_process(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a new Python process (directly when already in one), its result returned.

    elastix slows down, by 10x and more, once N4 (or another elastix run) has used ITK's thread pool in the same
    process: measured here, a 256³ rigid registration took 18.6 s in a fresh process and over 5 minutes after
    N4 and an atlas registration, with elastix's image pyramid rebuilt inside the optimiser's iterations. A
    fresh process per registration costs about 5-8 s of start-up (torch, MONAI, ITK imports) and is immune.
    The process is ``python -m common.transforms.itk_worker``, not a multiprocessing child: a user's script
    without an ``if __name__ == "__main__"`` guard is not run again.

    Args:
        fn: a module-level function (found again by its module and name in the new process).
        args, kwargs: its arguments (anything ``torch.save`` pickles: MetaTensors, arrays, dicts).

    Raises:
        RuntimeError: the new process failed; its error output is in the message.
    """
    if _IN_FRESH_PROCESS:
        return fn(*args, **kwargs)
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="itk_job_") as tmp:
        job, result = Path(tmp) / "job.pt", Path(tmp) / "result.pt"
        torch.save({"module": fn.__module__, "name": fn.__qualname__, "args": args, "kwargs": kwargs}, job)
        command = [sys.executable, "-m", "common.transforms.itk_worker", str(job), str(result)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{fn.__module__}.{fn.__qualname__} failed in its own process:\n{tail}")
        # our own file, written a moment ago by the worker: full unpickling is safe here
        return torch.load(result, weights_only=False)


def set_itk_threads(threads: int | None) -> int:
    """Set ITK's global default thread count (None: leave it); returns the count in force.

    ITK sizes its pool from the CPU count, which inside a container may exceed the cores actually given.
    """
    itk = import_itk()
    if threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    return int(itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads())
