"""A run that ends bad input cleanly: one ``error: <file>: <problem>`` line instead of a traceback.
"""

from __future__ import annotations

import sys

from common.data.io import VolumeError

__all__ = ["find_volume_error", "install_error_hook"]


def find_volume_error(err: BaseException) -> VolumeError | None:
    """The :class:`VolumeError` behind an exception, through MONAI's and ignite's wrapping, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, VolumeError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def install_error_hook() -> None:
    """Make a bad input volume end the program with one line naming the file (exit code 1), no traceback.

    Bundle configs call this in ``initialize``: input checks run both while the config resolves (the datalist)
    and inside the engine (loading), so a hook on uncaught exceptions covers both. Other errors keep their
    traceback.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        bad = find_volume_error(exc)
        if bad is None:
            previous(exc_type, exc, tb)
        else:
            print(f"error: {bad}", file=sys.stderr, flush=True)

    sys.excepthook = hook
