"""`evaluate --manifest`: what each case passes on to `evaluate` and how the results are summarised.

Each case runs `evaluate` with the run's own options, whatever the protocol (so a new protocol's options
reach every case unchanged), and its row's volume, labels, label value and axis. A structure is the row's
segment_name, else "label N". The summary holds, per structure, the mean, sample standard deviation, min,
max and count of every score over its cases (`summary.per_structure`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..files import commit_outputs
from ..outputs import Kind, json_with
from .summary import csv_text

#: Options of the cohort run itself, or taken from each row, or passed by `model_file.model_argv`.
NOT_FORWARDED = {"command", "manifest", "json", "scheduler", "workers", "threads_per_worker", "volume",
                 "labels", "label_value", "axis", "quiet", "checkpoint", "model", "device", "precision",
                 "download", "preloaded_model", "shared_encoders", "resume"}  # fmt: skip
TABLE_COLUMNS = ("structure", "score", "mean", "sd", "min", "max", "n")
EVALUATION_SUMMARY = Kind("an evaluation summary", json_with("structures", "cases"))


def _is_table(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.readline().decode("utf-8", "replace").strip() == ",".join(TABLE_COLUMNS)


EVALUATION_TABLE = Kind("an evaluation table (CSV)", _is_table)


def case_folder(folder: str | Path, case: str) -> Path:
    """A folder option's subfolder for one case (--save-masks DIR: DIR/<case>), absolute: workers run
    elsewhere."""
    return Path(str(folder)).resolve() / case


def forwarded_argv(options: Mapping[str, object], case: str) -> list[str]:
    """The run's evaluate options (an argparse namespace's `vars`) as command-line options again, for one
    case. A folder option (--save-masks DIR) gets a subfolder per case."""
    argv: list[str] = []
    for dest, value in sorted(options.items()):
        if dest in NOT_FORWARDED or callable(value) or value is None or value is False:
            continue
        option = f"--{dest.replace('_', '-')}"
        if value is True:
            argv.append(option)
        elif dest == "save_masks":
            argv += [option, str(case_folder(str(value), case))]
        elif isinstance(value, list):
            for item in value:
                argv += [option, str(item)]
        else:
            argv += [option, str(value)]
    return argv


def kept_result(path: Path, digest: str, mask: Path | None = None) -> dict | None:
    """--resume: a case's result from an earlier run when it is there, whole, and was made from what this
    run would use (its recorded resume digest is `digest`), with its saved `mask` when --save-masks asks for
    one; else None, and the case runs again."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        recorded = document["batch"]["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded != digest or (mask is not None and not mask.is_file()):
        return None
    return document


def structure_name(row: Mapping[str, str]) -> str:
    return row.get("segment_name") or f"label {row['label_value']}"


def write_evaluation(out: Path, table: Path, document: dict) -> None:
    """OUT.json (the document) and OUT.csv (its per-structure table), renamed into place together."""
    lines = [
        {"structure": structure, "score": score, **values}
        for structure, scores in document["structures"].items()
        for score, values in scores.items()
    ]
    with commit_outputs() as outputs:
        outputs.path(out, ".tmp.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        outputs.path(table, ".tmp.csv").write_text(csv_text(lines, TABLE_COLUMNS), encoding="utf-8")
