"""Unpack a bundle archive only after its sha256 matches the one its publisher lists: a bundle's configs are
executable (``_target_`` callables, ``$`` expressions passed to ``eval``), so an archive is trusted before it runs.

    python -m common.deploy.fetch <url or path of the .zip> --sha256 <hex> --output bundles_downloaded/
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Sequence

from common.data.io import InputFileError
from common.data.weights import file_hash

__all__ = ["fetch_bundle", "main"]


def fetch_bundle(source: str, sha256: str, output: str | Path) -> Path:
    """Copy or download ``source`` (a path, or a file/http(s) URL), check its sha256, and unpack it into ``output``.

    Returns the unpacked bundle folder. Nothing is unpacked when the hash differs, the archive holds paths that
    leave ``output``, or the bundle folder already exists there (never over another bundle).

    Raises:
        InputFileError: hash mismatch (both hashes named), not a zip, unsafe member paths, or an existing target.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output, prefix=".fetch.") as tmp:
        archive = Path(tmp) / "bundle.zip"
        if "://" in source:
            with urllib.request.urlopen(source) as response, open(archive, "wb") as f:  # noqa: S310 (file/http URLs by design)
                shutil.copyfileobj(response, f)
        else:
            shutil.copyfile(source, archive)
        actual = file_hash(archive)
        if actual != sha256.strip().lower():
            raise InputFileError(source, f"sha256 {actual} differs from the listed {sha256}: not unpacked")
        if not zipfile.is_zipfile(archive):
            raise InputFileError(source, "not a zip archive")
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            roots = {Path(n).parts[0] for n in names if n.strip("/")}
            if len(roots) != 1 or any(Path(n).is_absolute() or ".." in Path(n).parts for n in names):
                raise InputFileError(source, "the archive must hold one bundle folder and no paths outside it")
            target = output / roots.pop()
            if target.exists():
                raise InputFileError(target, "already exists: not unpacked over another bundle")
            zf.extractall(tmp)
        Path(tmp, target.name).rename(target)
    return target


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.deploy.fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="path or URL of the bundle archive (.zip)")
    ap.add_argument("--sha256", required=True, help="the archive's sha256 as its publisher lists it")
    ap.add_argument("--output", default="bundles_downloaded", help="folder to unpack into")
    args = ap.parse_args(argv)
    try:
        print(fetch_bundle(args.source, args.sha256, args.output))
    except InputFileError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
