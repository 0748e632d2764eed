"""The inference command's process: what it keeps after start-up is set aside from the cyclic garbage collector.

``python -m monai.bundle run`` imports about 5,000 modules before a bundle's config runs (``import monai`` loads
every submodule, and with them torchvision, scipy, ignite, sympy, pandas, matplotlib). Python's cyclic collector
then traverses all their objects in every full collection, and again and again while the interpreter tears the
modules down at exit: about 1.4 s of a 20 s command on the 2-core machines (docs/performance.md). :func:`gc.freeze`
moves the objects alive at that moment into a permanent generation that collections skip; they are still freed by
reference counting at exit, as before.
"""

from __future__ import annotations

import gc
import sys

__all__ = ["freeze_startup_objects"]

_BUNDLE_COMMAND = "monai.bundle.__main__"


def freeze_startup_objects() -> bool:
    """:func:`gc.freeze` the objects alive now, in the ``python -m monai.bundle`` process only; True if it did.

    Bundle configs call this in ``initialize``, after the imports and before the run. Elsewhere (a test process, a
    notebook, the Deploy application running the same config in a long-lived process) nothing changes: there a
    freeze could keep an earlier run's unreachable cycles (an engine with its network) alive for good.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) != _BUNDLE_COMMAND:
        return False
    gc.freeze()
    return True
