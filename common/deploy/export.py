"""Self-contained bundle archives: the bundle folder with the ``common`` package placed inside it.

``python -m monai.bundle run`` puts the bundle root on ``sys.path``, so an archive made here runs where only MONAI
and the packages in its metadata are installed; the repository keeps one source of truth for ``common``.

    python -m common.deploy.export bundles/brain_mri_interpolation_super_resolution --output dist/
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path
from typing import Sequence

from common.data.io import atomic_path
from common.data.weights import file_hash

__all__ = ["EXCLUDED_DIRS", "bundle_files", "export_bundle", "main"]


COMMON = Path(__file__).resolve().parents[1]  # the package root, common/


# run products that never belong in an archive
EXCLUDED_DIRS = {"output", "eval", "runs", "ckpt", "__pycache__", ".pytest_cache"}


def bundle_files(root: Path) -> list[Path]:
    """Files of a bundle folder (or of the common package) without run products and caches."""
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts) and p.suffix != ".pyc"
    )


def export_bundle(bundle: str | Path, output: str | Path) -> Path:
    """Write ``<output>/<bundle name>.zip`` holding ``<name>/...`` (the bundle) and ``<name>/common/...``.

    Args:
        bundle: the bundle folder (with configs/metadata.json).
        output: destination folder, or a file name ending in .zip.
    """
    bundle = Path(bundle).resolve()
    if not (bundle / "configs" / "metadata.json").is_file():
        raise SystemExit(f"error: {bundle}: not a bundle (no configs/metadata.json)")
    output = Path(output)
    target = output if output.suffix == ".zip" else output / f"{bundle.name}.zip"
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in bundle_files(bundle):
                zf.write(path, Path(bundle.name) / path.relative_to(bundle))
            for path in bundle_files(COMMON):
                zf.write(path, Path(bundle.name) / "common" / path.relative_to(COMMON))
    return target


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.deploy.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", help="bundle folders")
    ap.add_argument("--output", default="dist", help="destination folder (default: dist/)")
    args = ap.parse_args(argv)
    for bundle in args.bundles:
        archive = export_bundle(bundle, args.output)
        print(f"{archive}  sha256 {file_hash(archive)}")  # list it beside the archive: common.deploy.fetch checks it


if __name__ == "__main__":
    main()
