"""A run that ends bad input cleanly: one ``error: <file>: <problem>`` line instead of a traceback.
"""

from __future__ import annotations

import sys

from common.data.io import find_input_error

__all__ = ["find_input_error", "install_error_hook"]


def install_error_hook() -> None:
    """Make a bad input file (volume, weights, checkpoint) end the program with one line naming the file (exit
    code 1), no traceback.

    Bundle configs call this in ``initialize``: input checks run both while the config resolves (the datalist)
    and inside the engine (loading), so a hook on uncaught exceptions covers both. Other errors keep their
    traceback.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        bad = find_input_error(exc)
        if bad is None:
            previous(exc_type, exc, tb)
        else:
            print(f"error: {bad}", file=sys.stderr, flush=True)

    sys.excepthook = hook
