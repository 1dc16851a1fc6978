"""The cohort's summary files: `summary.csv` and `summary.json`, one row per case (case, status, reason,
slices, seconds, worker), written together and atomically; and, for `evaluate --manifest`, the mean and
spread of each score per structure."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..files import commit_outputs
from ..outputs import Kind, json_with

COLUMNS = ("case", "status", "reason", "slices", "seconds", "worker")
STATUSES = ("done", "failed", "skipped")


def _is_summary_csv(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.readline().decode("utf-8", "replace").strip() == ",".join(COLUMNS)


SUMMARY_CSV = Kind("a batch summary (summary.csv)", _is_summary_csv)
SUMMARY_JSON = Kind("a batch summary (summary.json)", json_with("cases", "counts"))


def csv_text(rows: Iterable[Mapping], columns: tuple[str, ...] = COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def skipped_row(case: str) -> dict[str, str]:
    """The summary row of a case --resume keeps from an earlier run."""
    return {"case": case, "status": "skipped", "reason": "unchanged since its last run"}


def counts(rows: Iterable[Mapping]) -> dict[str, int]:
    rows = list(rows)
    return {s: sum(r["status"] == s for r in rows) for s in STATUSES}


def write_summary(csv_path: Path, json_path: Path, rows: list[dict], extra: Mapping | None = None) -> None:
    """Both files renamed into place together (OSError when they cannot be written)."""
    document = {"counts": counts(rows), **(extra or {}), "cases": rows}
    with commit_outputs() as outputs:
        outputs.path(csv_path, ".tmp.csv").write_text(csv_text(rows), encoding="utf-8")
        outputs.path(json_path, ".tmp.json").write_text(
            json.dumps(document, indent=1) + "\n", encoding="utf-8"
        )


#: Per-case fields that describe the run, not its score.
_NOT_SCORES = {"label_value", "max_clicks", "min_pixels", "seconds"}


def scores(result: Mapping) -> dict[str, float]:
    """The finite numeric top-level values of a per-case result (its scores, whatever the protocol)."""
    return {
        key: float(value)
        for key, value in result.items()
        if key not in _NOT_SCORES and isinstance(value, int | float) and not isinstance(value, bool)
        and math.isfinite(value)
    }  # fmt: skip


def per_structure(results: Iterable[tuple[str, Mapping]]) -> dict[str, dict[str, dict[str, float]]]:
    """{structure: {score: {mean, sd, min, max, n}}} over the cases (sd: sample standard deviation; 0 for
    one case)."""
    gathered: dict[str, dict[str, list[float]]] = {}
    for structure, result in results:
        for key, value in scores(result).items():
            gathered.setdefault(structure, {}).setdefault(key, []).append(value)
    return {
        structure: {
            key: {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
            for key, values in sorted(by_key.items())
        }
        for structure, by_key in sorted(gathered.items())
    }
