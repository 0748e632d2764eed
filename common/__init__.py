"""Shared code of the brain MRI super-resolution bundles: data, networks, diffusion, metrics, reports.

Submodules load on first attribute access, so a bundle config needs only ``"$import common"`` and can then
name ``common.pipelines.…`` or ``"_target_": "common.…"`` without importing what it does not use.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "bench", "data", "degrade", "diffusion", "edm_training", "engines", "evaluation", "export", "inferers",
    "io", "metrics", "networks", "operators", "overrides", "pipelines", "report", "score_inferer", "score_training",
    "tables", "transforms", "upsample", "volume_inferer", "volume_training", "windowed_denoiser",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
