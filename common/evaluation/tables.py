"""Metric tables: per-subject and per-slice rows as CSV and JSON, their means, strict-JSON conversion.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from common.data.io import atomic_path
from common.evaluation.metrics import SLICE_KEYS, SUMMARY_KEYS

__all__ = ["summarise", "json_safe", "write_tables"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def summarise(summaries: Sequence[dict]) -> dict:
    """Mean over subjects of every numeric field (None/NaN entries skipped).

    A field that is "unavailable" for every subject stays "unavailable"; one with no number at all is None.
    The result has ``subject`` = "mean" and ``n_subjects``.
    """
    keys: list[str] = []
    for s in summaries:
        keys += [k for k in s if k not in keys]
    out: dict[str, Any] = {"subject": "mean"}
    for key in keys:
        if key == "subject":
            continue
        values = [s.get(key) for s in summaries]
        nums = [float(v) for v in values if _is_number(v) and not math.isnan(float(v))]
        if nums:
            out[key] = float(np.mean(nums))
        elif values and all(v == "unavailable" for v in values):
            out[key] = "unavailable"
        else:
            out[key] = None
    out["n_subjects"] = len(summaries)
    return out


def json_safe(v: Any) -> Any:
    """A copy of ``v`` fit for strict JSON: numpy scalars -> Python, NaN -> null, ±inf -> "inf"/"-inf"."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if _is_number(v) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return float(v) if isinstance(v, np.floating) else v


def _columns(rows: Iterable[dict], preferred: Sequence[str]) -> list[str]:
    cols = [k for k in preferred if any(k in r for r in rows)]
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _csv_cell(v: Any) -> Any:
    """None is an empty cell; floats are written with repr so they read back exactly."""
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def _write_csv(path: Path, rows: list[dict], preferred: Sequence[str]) -> None:
    cols = _columns(rows, preferred) or list(preferred)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: _csv_cell(r.get(k)) for k in cols})


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def write_tables(
    summaries: list[dict], per_slice: list[dict], out_dir: str | Path, prefix: str = "metrics"
) -> dict[str, Path]:
    """Write the per-subject and per-slice tables as CSV and JSON, each file atomically.

    The per-subject JSON is ``{"subjects": [...], "mean": summarise(summaries)}``; the per-slice JSON is the
    list of rows. In JSON, NaN is null and infinities are the strings "inf"/"-inf"; in CSV, None is empty.

    Args:
        summaries: one dict per subject (from :func:`evaluate_volume`).
        per_slice: per-slice rows of all subjects.
        out_dir: destination folder (created when missing).
        prefix: file name prefix.

    Returns:
        paths keyed "per_subject_csv", "per_subject_json", "per_slice_csv", "per_slice_json".
    """
    out_dir = Path(out_dir)
    paths = {f"{t}_{e}": out_dir / f"{prefix}_{t}.{e}" for t in ("per_subject", "per_slice") for e in ("csv", "json")}
    _write_csv(paths["per_subject_csv"], list(summaries), SUMMARY_KEYS)
    _write_json(paths["per_subject_json"], {"subjects": list(summaries), "mean": summarise(summaries)})
    _write_csv(paths["per_slice_csv"], list(per_slice), SLICE_KEYS)
    _write_json(paths["per_slice_json"], list(per_slice))
    return paths
