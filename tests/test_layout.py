"""The package's floors (docs/architecture.md): every import of ``common`` runs down a floor, never up or across.

Imports are read from the source (module level and inside functions), so a lazy import cannot hide an upward one.
"""

import ast
import subprocess
import sys

import pytest

from conftest import REPO

COMMON = REPO / "common"

# lowest first; subpackages on one floor do not import each other
FLOORS = {
    "utils": 0,
    "data": 1,
    "transforms": 2,
    "networks": 3,
    "diffusion": 3,
    "losses": 3,
    "inferers": 4,
    "engines": 4,
    "evaluation": 5,
    "deploy": 5,
}
MAX_LINES = 550  # "about 500 lines at most" per module


def _room(module: str) -> str:
    """The subpackage (or top-level module) of a dotted ``common.…`` name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path) -> list[tuple[int, str]]:
    """(line, dotted module) of every ``common`` import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "common"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "common":
                continue
            if module == "common":  # from common import data, transforms
                out += [(node.lineno, f"common.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, module))
    return out


def floor_violations(path) -> list[str]:
    """Imports in ``path`` that run up a floor or across to a sibling subpackage of the same floor."""
    own = _room(".".join(path.relative_to(REPO).with_suffix("").parts))
    if own not in FLOORS:
        return [f"{path}: module outside the floors {sorted(FLOORS)}"]
    bad = []
    for line, module in _imports(path):
        target = _room(module)
        if target == own:
            continue
        if target not in FLOORS:
            bad.append(f"{path}:{line}: imports {module}, which is on no floor")
        elif FLOORS[target] >= FLOORS[own]:
            bad.append(f"{path}:{line}: {own} (floor {FLOORS[own]}) imports {module} (floor {FLOORS[target]})")
    return bad


MODULES = sorted(p for p in COMMON.rglob("*.py") if p.name != "__init__.py" or p.parent != COMMON)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(COMMON)))
def test_imports_run_down_the_floors(path):
    assert floor_violations(path) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(COMMON)))
def test_module_size(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, "one concept per module, about 500 lines at most"


@pytest.mark.parametrize(
    "room, source, expected",
    [
        ("transforms", "from common.inferers.utils import sample_mean_std\n", 1),  # up
        ("networks", "def f():\n    from common.engines import load_state\n", 1),  # up, hidden in a function
        ("inferers", "from common.engines.checkpoints import load_state\n", 1),  # across one floor
        ("transforms", "from common import inferers\n", 1),
        ("diffusion", "from ..inferers import utils\n", 1),  # relative, up
        ("inferers", "from common.transforms.upsample import GridUpsample\nfrom .utils import x\n", 0),  # down; own
    ],
)
def test_the_check_catches_upward_imports(tmp_path, monkeypatch, room, source, expected):
    pkg = tmp_path / "common" / room
    pkg.mkdir(parents=True)
    path = pkg / "probe.py"
    path.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert len(floor_violations(path)) == expected


def test_import_common_is_lazy():
    """``"$import common"`` in a config imports neither torch nor any subpackage."""
    code = "import sys, common; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('common.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
