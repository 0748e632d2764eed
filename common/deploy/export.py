"""Model-zoo archives: the bundle folder with the ``common`` package placed inside it, checked as the zoo's CI checks.

``python -m monai.bundle run`` puts the bundle root on ``sys.path``, so an archive made here runs where only MONAI
and the packages in its metadata are installed; the repository keeps one source of truth for ``common``.

Before anything is written, :func:`zoo_problems` runs the checks of the zoo's ``ci/verify_bundle.py``
(Project-MONAI/model-zoo): ``configs/metadata.json`` and ``LICENSE`` present, the metadata ``version`` listed in its
``changelog``, ``configs/inference.json`` present and its inference workflow's required properties defined
(``monai.bundle.ConfigWorkflow.check_properties``), the metadata valid against the schema (when a local copy is
given: the schema URL is not reachable offline); plus the zoo's contribution rules: ``docs/README.md``, and every
``large_files.yml`` entry with ``path``, ``url`` and a sha256 ``hash_val`` that the file has.

    python -m common.deploy.export bundles/brain_mri_interpolation_super_resolution --output dist/
    # weights hosted apart from the archive, as in the zoo: fetched by `monai.bundle download_large_files`
    python -m common.deploy.export bundles/brain_mri_edm25d_super_resolution --output dist/ \\
        --weights_url https://example.org/weights --program
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import yaml

from common.data.io import atomic_path
from common.data.weights import file_hash

__all__ = ["EXCLUDED_DIRS", "bundle_files", "large_file_entries", "zoo_problems", "export_bundle", "main"]


COMMON = Path(__file__).resolve().parents[1]  # the package root, common/


# run products that never belong in an archive
EXCLUDED_DIRS = {"output", "eval", "runs", "ckpt", "__pycache__", ".pytest_cache"}


def bundle_files(root: Path) -> list[Path]:
    """Files of a bundle folder (or of the common package) without run products and caches."""
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts) and p.suffix != ".pyc"
    )


def large_file_entries(bundle: Path) -> list[dict]:
    """The ``large_files`` list of the bundle's ``large_files.yml`` (empty when the file lists none)."""
    path = bundle / "large_files.yml"
    return (yaml.safe_load(path.read_text()) or {}).get("large_files") or [] if path.is_file() else []


def _workflow_missing(bundle: Path) -> list[str]:
    """Required properties of the inference workflow that ``configs/inference.json`` does not define."""
    from monai.bundle import ConfigWorkflow

    if str(bundle) not in sys.path:  # the bundle's own modules, as `monai.bundle run` makes them importable
        sys.path.insert(0, str(bundle))
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="inference", bundle_root=str(bundle),
    )
    workflow.initialize()
    return list(workflow.check_properties() or [])


def zoo_problems(bundle: str | Path, schema: str | Path | None = None) -> list[str]:
    """Every reason the model zoo's CI would refuse the bundle (empty when it would accept it).

    Args:
        bundle: the bundle folder.
        schema: a local copy of the metadata schema to validate against (MONAI's ``verify_metadata``); None skips
            that check (the schema's URL needs the internet).
    """
    bundle = Path(bundle).resolve()
    problems = [f"missing {rel}" for rel in ("configs/metadata.json", "configs/inference.json", "LICENSE",
                                             "docs/README.md", "large_files.yml") if not (bundle / rel).is_file()]
    if (bundle / "configs" / "metadata.json").is_file():
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        if "version" not in meta or meta.get("version") not in (meta.get("changelog") or {}):
            problems.append(f"metadata version {meta.get('version')!r} is not listed in its changelog")
        if schema is not None:
            from monai.bundle import verify_metadata

            try:
                verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
            except Exception as err:  # jsonschema's ValidationError, or a missing schema field
                problems.append(f"metadata does not validate against {schema}: {str(err).splitlines()[0]}")
    for entry in large_file_entries(bundle):
        missing = [k for k in ("path", "url", "hash_val", "hash_type") if not entry.get(k)]
        if missing:
            problems.append(f"large_files.yml entry {entry.get('path')!r} lacks {', '.join(missing)}")
        elif entry["hash_type"] != "sha256":
            problems.append(f"large_files.yml entry {entry['path']!r}: hash_type {entry['hash_type']!r}, not sha256")
        elif not (bundle / entry["path"]).is_file():
            problems.append(f"large_files.yml lists {entry['path']}, which does not exist")
        elif file_hash(bundle / entry["path"]) != entry["hash_val"]:
            problems.append(f"{entry['path']}: sha256 {file_hash(bundle / entry['path'])} differs from the listed "
                            f"{entry['hash_val']}")
    if not problems:
        missing = _workflow_missing(bundle)
        if missing:
            problems.append(f"configs/inference.json does not define the inference properties {missing}")
    return problems


def export_bundle(
    bundle: str | Path,
    output: str | Path,
    weights_url: str | None = None,
    schema: str | Path | None = None,
    program: bool = False,
) -> Path:
    """Write ``<output>/<bundle name>.zip`` holding ``<name>/...`` (the bundle) and ``<name>/common/...``.

    Args:
        bundle: the bundle folder (with configs/metadata.json).
        output: destination folder, or a file name ending in .zip.
        weights_url: None: the weights travel inside the archive. Else the base URL where the weights will be
            hosted: the archive leaves them out, its ``large_files.yml`` lists ``<weights_url>/<name>/<path>``
            with the same sha256, and the files are copied to ``<output folder>/<name>/<path>``: that folder is
            what to upload under ``weights_url``.
        schema: local copy of the metadata schema (see :func:`zoo_problems`).
        program: also add ``models/model.pt2``, the ``torch.export`` program of the config's network at its probe
            noise level (:func:`common.deploy.program.export_program`, checked against the eager network), listed
            in the archive's ``large_files.yml`` with its sha256 like the weights.

    Raises:
        SystemExit: not a bundle, or the zoo checks fail (every problem listed); nothing is written then.
    """
    bundle = Path(bundle).resolve()
    if not (bundle / "configs" / "metadata.json").is_file():
        raise SystemExit(f"error: {bundle}: not a bundle (no configs/metadata.json)")
    problems = zoo_problems(bundle, schema)
    if problems:
        raise SystemExit("\n".join(f"error: {bundle}: {p}" for p in problems))
    output = Path(output)
    target = output if output.suffix == ".zip" else output / f"{bundle.name}.zip"
    entries = large_file_entries(bundle)
    hosted = {(bundle / e["path"]).resolve() for e in entries} if weights_url else set()
    with tempfile.TemporaryDirectory() as scratch, atomic_path(target) as tmp:
        sources = {e["path"]: bundle / e["path"] for e in entries}
        if program:
            from common.deploy.program import export_program

            pt2, _ = export_program(bundle, Path(scratch) / "model.pt2")
            sources["models/model.pt2"] = pt2
            entries = [*entries, {"path": "models/model.pt2", "url": "models/model.pt2",
                                  "hash_val": file_hash(pt2), "hash_type": "sha256"}]
        if weights_url:
            entries = [{**e, "url": f"{weights_url.rstrip('/')}/{bundle.name}/{e['path']}"} for e in entries]
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in bundle_files(bundle):
                if path.resolve() in hosted:
                    continue
                arcname = Path(bundle.name) / path.relative_to(bundle)
                if (weights_url or program) and path == bundle / "large_files.yml":
                    zf.writestr(str(arcname), yaml.safe_dump({"large_files": entries}, sort_keys=False))
                else:
                    zf.write(path, arcname)
            if program and not weights_url:
                zf.write(sources["models/model.pt2"], Path(bundle.name) / "models" / "model.pt2")
            for path in bundle_files(COMMON):
                zf.write(path, Path(bundle.name) / "common" / path.relative_to(COMMON))
        for entry in entries if weights_url else []:
            with atomic_path(target.parent / bundle.name / entry["path"]) as copy:
                shutil.copyfile(sources[entry["path"]], copy)
    return target


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.deploy.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", help="bundle folders")
    ap.add_argument("--output", default="dist", help="destination folder (default: dist/)")
    ap.add_argument("--weights_url", default=None,
                    help="base URL that will host the weights: they are left out of the archive and copied to "
                         "<output>/<bundle>/models/ for upload")
    ap.add_argument("--schema", default=None, help="local copy of the bundle metadata schema to validate against")
    ap.add_argument("--program", action="store_true",
                    help="add models/model.pt2, the torch.export program of the network (learned bundles)")
    args = ap.parse_args(argv)
    for bundle in args.bundles:
        archive = export_bundle(bundle, args.output, args.weights_url, args.schema, args.program)
        print(f"{archive}  sha256 {file_hash(archive)}")  # list it beside the archive: common.deploy.fetch checks it


if __name__ == "__main__":
    main()
