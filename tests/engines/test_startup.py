"""common.engines.startup: the start-up freeze happens in the ``python -m monai.bundle`` process only."""

import gc
import importlib.machinery
import sys
import types

from common.engines import freeze_startup_objects


def test_no_freeze_outside_the_bundle_command():
    """In this (pytest) process, as in a notebook or the Deploy application, nothing is frozen."""
    before = gc.get_freeze_count()
    assert freeze_startup_objects() is False
    assert gc.get_freeze_count() == before


def test_freeze_in_the_bundle_command(monkeypatch):
    """With ``python -m monai.bundle``'s ``__main__``, the objects alive now leave the collector's generations."""
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.machinery.ModuleSpec("monai.bundle.__main__", None)
    monkeypatch.setitem(sys.modules, "__main__", main)
    try:
        assert freeze_startup_objects() is True
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
