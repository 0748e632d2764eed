"""Covariates of the attention U-Net's cross-attention (3T->7T thesis, methods.md §4): age, sex and diagnosis
group per person, read from a covariates file beside the datalist and encoded as numbers, NaN for unknown.

The encoding is the one :class:`common.networks.CovariateEncoder` reads: ``age`` in years / 100, ``sex`` 0 = female
1 = male, ``group`` 0 = healthy/SCD 1 = MCI/dementia; the slice position is added per slice by the data path and
the inferer. ``python -m common.data.covariates --manifest <manifest.json> --out <file>`` writes the file for the
people of a manifest (unknown wherever the manifest does not say).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.data.io import VolumeError, nifti_stem

__all__ = ["COVARIATE_NAMES", "AGE_SCALE", "encode_covariates", "read_covariates", "with_covariates",
           "covariates_from_manifest"]

COVARIATE_NAMES = ("age", "sex", "group")
AGE_SCALE = 100.0  # years -> the network's scale (ages 0-100 map to 0-1)
_SEX = {"f": 0.0, "female": 0.0, "woman": 0.0, "girl": 0.0, "m": 1.0, "male": 1.0, "man": 1.0, "boy": 1.0}
_GROUP = {"healthy": 0.0, "hc": 0.0, "cn": 0.0, "normal": 0.0, "scd": 0.0,
          "mci": 1.0, "dementia": 1.0, "ad": 1.0}


def _number(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _category(value: Any, table: Mapping[str, float]) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if value in (0, 1) else math.nan
    return table.get(str(value).strip().lower(), math.nan) if value is not None else math.nan


def encode_covariates(item: Mapping[str, Any]) -> list[float]:
    """``[age / 100, sex, group]`` of a datalist item; NaN for each one missing or not understood.

    Args:
        item: a mapping with optional ``age`` (years), ``sex`` ("F"/"M", "female"/"male" or 0/1) and ``group``
            ("healthy", "SCD", "MCI", "dementia" or 0/1).
    """
    age = _number(item.get("age"))
    return [age / AGE_SCALE, _category(item.get("sex"), _SEX), _category(item.get("group"), _GROUP)]


def read_covariates(path: str | Path) -> dict[str, dict]:
    """Rows of a covariates file by subject: a CSV with a ``subject`` column, or a JSON list (or
    ``{"covariates": [...]}``) of ``{"subject": stem, ...}``; ``subject`` matches the NIfTI file stems."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(path, "covariates file not found")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise VolumeError(path, f"not valid JSON ({err})") from err
        rows = rows.get("covariates", []) if isinstance(rows, dict) else rows
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    if not isinstance(rows, list) or any(not isinstance(r, dict) or "subject" not in r for r in rows):
        raise VolumeError(path, "covariates need a 'subject' (the NIfTI file stem) in every row")
    return {str(r["subject"]): {k: v for k, v in r.items() if k != "subject"} for r in rows}


def with_covariates(split: dict[str, list[dict]], path: str | Path | None) -> dict[str, list[dict]]:
    """``split`` with each item's covariates from the file at ``path`` (by ``subject``; items keep their own
    values where they give them). None returns ``split`` unchanged: every covariate unknown."""
    if path is None:
        return split
    table = {subject: {k: v for k, v in row.items() if k in COVARIATE_NAMES}
             for subject, row in read_covariates(path).items()}
    return {name: [{**table.get(str(it.get("subject")), {}), **it} for it in items] for name, items in split.items()}


def _parse_subject(text: str) -> dict:
    """Age, sex and group from a manifest's free-text ``subject`` ("M, 39y", "3-year-old boy, normal")."""
    text = text.lower()
    out: dict[str, Any] = {}
    age = re.search(r"(\d+(?:\.\d+)?)\s*(?:y\b|-year|years?\b)", text)
    if age:
        out["age"] = float(age.group(1))
    words = set(re.findall(r"[a-z]+", text))
    sex = {_SEX[w] for w in words & set(_SEX)}
    if len(sex) == 1:
        out["sex"] = "M" if sex == {1.0} else "F"
    group = {_GROUP[w] for w in words & set(_GROUP)}
    if len(group) == 1:
        out["group"] = "healthy" if group == {0.0} else "MCI/dementia"
    return out


def covariates_from_manifest(manifest: str | Path, files: Sequence[str] | None = None) -> list[dict]:
    """One covariates row per volume of a ``manifest.json`` (``{"volumes": [{"file", "subject", ...}]}``): what
    its ``subject`` text states of age, sex and group, nothing else (unknown stays absent).

    Args:
        manifest: the manifest file.
        files: the volumes to include (file names); all when None.
    """
    content = json.loads(Path(manifest).read_text())
    rows = []
    for vol in content.get("volumes", []):
        if files is not None and vol["file"] not in files:
            continue
        rows.append({"subject": nifti_stem(vol["file"]), **_parse_subject(str(vol.get("subject", "")))})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a covariates file for the people of a manifest.json.")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", help="splits.json: only its 'training' people")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    files = None
    if args.split:
        files = [it["label"] for it in json.loads(Path(args.split).read_text())["training"]]
    rows = covariates_from_manifest(args.manifest, files)
    Path(args.out).write_text(json.dumps(rows, indent=4) + "\n")
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
