"""Importing what an inference command imports does not import the heavy optional packages from ``common``.

``python -m monai.bundle run --config_file configs/inference.json`` imports ``common`` and its subpackages;
ITK, matplotlib, lpips and torchvision are needed only for registration / N4, figures and the LPIPS metric, so
``common`` imports them where they are used. ``import monai`` itself tries all four (its ``load_submodules`` runs
``optional_import`` across the whole package), so "not in ``sys.modules``" cannot be checked in a plain process.
Instead a fresh interpreter blocks the four packages with a meta-path finder that records which module asked for
each: ``common`` must import cleanly without them and no ``common`` module may be the one asking. No timings are
asserted here (measured numbers: docs of issue 18).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

HEAVY = ("itk", "matplotlib", "lpips", "torchvision")
INFERENCE_IMPORTS = (
    "common", "common.data", "common.transforms", "common.networks", "common.diffusion", "common.inferers",
    "common.engines", "common.evaluation",
)

# argv: JSON list of heavy packages, JSON list of modules to import, optional source run as module "common.probe"
_CHILD = r"""
import importlib, importlib.abc, json, sys

heavy, modules = set(json.loads(sys.argv[1])), json.loads(sys.argv[2])
attempts = []


class Block(importlib.abc.MetaPathFinder):
    # records (package, importing module) and refuses, as if the package were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in heavy:
            return None
        frame = sys._getframe(1)  # walk out of importlib and monai's optional_import to the module that asked
        while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                     or frame.f_globals.get("__name__", "").startswith("importlib")
                                     or frame.f_globals.get("__name__") == "monai.utils.module"):
            frame = frame.f_back
        attempts.append((name, frame.f_globals.get("__name__") if frame is not None else None))
        raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)


sys.meta_path.insert(0, Block())
if len(sys.argv) > 3:
    try:
        exec(compile(sys.argv[3], "common/probe.py", "exec"), {"__name__": "common.probe"})
    except ImportError:
        pass  # the attempt is recorded; an unguarded import of a blocked package fails like a missing package
failed = {}
for module in modules:
    try:
        importlib.import_module(module)
    except ImportError as err:  # kept, so the test names the module that asked rather than only failing
        failed[module] = f"{type(err).__name__}: {err}"

at_import = list(attempts)  # the calls below import where the packages are used; they are not import time
errors = {}
if "common.evaluation" in modules:
    calls = {"matplotlib": lambda: sys.modules["common.evaluation.figures"]._figure((1.0, 1.0)),
             "itk": lambda: sys.modules["common.transforms.itk_bridge"].import_itk()}
    for package, call in calls.items():
        try:
            call()
        except Exception as err:
            errors[package] = [type(err).__name__, str(err)]
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in heavy and sys.modules[m] is not None)
print(json.dumps({"attempts": at_import, "loaded": loaded, "errors": errors, "failed": failed}))
"""


def _run_child(modules, probe: str | None = None) -> dict:
    cmd = [sys.executable, "-c", _CHILD, json.dumps(HEAVY), json.dumps(list(modules))]
    if probe is not None:
        cmd.append(probe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _offenders(result: dict, package: str) -> list[str]:
    return sorted({who for name, who in result["attempts"]
                   if name.partition(".")[0] == package and who is not None and who.split(".")[0] == "common"})


@pytest.fixture(scope="module")
def inference_import() -> dict:
    """One fresh interpreter importing the inference subpackages with the heavy packages blocked."""
    return _run_child(INFERENCE_IMPORTS)


@pytest.mark.parametrize("package", HEAVY)
def test_inference_imports_do_not_import(inference_import, package):
    assert _offenders(inference_import, package) == [], f"common imports {package} at module import time"
    assert not [m for m in inference_import["loaded"] if m.partition(".")[0] == package]


def test_common_imports_without_the_optional_packages(inference_import):
    assert inference_import["failed"] == {}


@pytest.mark.parametrize("package", ["matplotlib", "itk"])
def test_missing_package_fails_clearly_where_used(inference_import, package):
    kind, message = inference_import["errors"][package]
    assert kind in ("ImportError", "ModuleNotFoundError")
    assert package in message


@pytest.mark.parametrize(
    "probe, package, caught",
    [
        ("from matplotlib.figure import Figure\n", "matplotlib", True),
        ("try:\n    import itk\nexcept ImportError:\n    itk = None\n", "itk", True),  # a guarded eager import
        ("def f():\n    import torchvision\n", "torchvision", False),  # lazy: never runs at import
    ],
)
def test_the_check_catches_an_eager_import(probe, package, caught):
    result = _run_child([], probe)  # nothing else imported: this costs well under a second
    assert (_offenders(result, package) == ["common.probe"]) is caught
