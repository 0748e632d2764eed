"""Shared code of the brain MRI super-resolution bundles, laid out like MONAI (see docs/architecture.md).

Subpackages load on first attribute access, so a bundle config needs only ``"$import common"`` and can then
name ``common.transforms.…`` or ``"_target_": "common.…"`` without importing what it does not use.
Floors, lowest first (an import never runs back up): utils -> data -> transforms -> networks, diffusion,
losses -> inferers, engines -> evaluation, deploy.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "utils", "data", "transforms", "networks", "diffusion", "losses", "inferers", "engines", "evaluation", "deploy",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
