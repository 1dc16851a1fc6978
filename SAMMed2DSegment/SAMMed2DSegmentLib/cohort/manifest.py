"""The cohort manifest: a CSV with a header, one case per row, paths relative to the manifest's folder.

It is read and checked as a whole before anything starts, so a typo in row 480 is a one-line refusal (exit 2)
and not a failed case after hours of work. Checks that need the volume itself (points off the volume, an
unreadable file) belong to the case: they fail that case alone.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from ..engine.geometry import AXES
from ..engine.propagation import DIRECTIONS
from ..outputs import input_files
from . import CohortError

#: `batch` columns (empty cells take the `segment` defaults).
SEGMENT_COLUMNS = ("case", "volume", "include", "exclude", "roi", "segment_name", "axis", "propagate")
#: `evaluate --manifest` adds these; one manifest may carry both sets.
EVALUATE_COLUMNS = ("labels", "label_value")
PATH_COLUMNS = ("volume", "include", "exclude", "roi", "labels")
LIST_COLUMNS = ("include", "exclude", "roi")  # several files in one cell, separated by ';'
CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a folder name on every file system
MAX_BYTES = 64 << 20  # a manifest of a million rows is far smaller


class ManifestError(CohortError):
    """A manifest that cannot be run as written: one line naming the file, the row and the cell."""


@dataclass(frozen=True)
class Case:
    """One row: its name, the cells as written (for the resume digest) and the files it reads, resolved."""

    name: str
    row: dict[str, str]
    line: int
    files: dict[str, tuple[Path, ...]]

    def cell(self, column: str) -> str:
        return self.row.get(column, "")

    def file(self, column: str) -> Path | None:
        paths = self.files.get(column, ())
        return paths[0] if paths else None


def read_manifest(path: str | Path, required: tuple[str, ...] = ("case", "volume")) -> list[Case]:
    """Every row of the manifest, checked: known columns, `required` cells filled, unique case names that
    are safe folder names, existing input files, valid axis, propagate and label values."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"--manifest: no such file: {path}")
    if path.stat().st_size > MAX_BYTES:
        raise ManifestError(f"--manifest {path.name} is larger than {MAX_BYTES >> 20} MB; not a manifest")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"--manifest {path.name} is not UTF-8 text (a CSV with a header)") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip() for h in next(reader, [])]
    known = (*SEGMENT_COLUMNS, *EVALUATE_COLUMNS)
    unknown = [h for h in header if h not in known]
    if unknown:
        raise ManifestError(
            f"--manifest {path.name}: unknown column {unknown[0]!r} (columns: {', '.join(known)})"
        )
    missing = [c for c in required if c not in header]
    if missing:
        raise ManifestError(f"--manifest {path.name}: the header has no {missing[0]!r} column")
    if len(set(header)) != len(header):
        raise ManifestError(f"--manifest {path.name}: a column appears twice in the header")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue  # blank lines are allowed
        where = f"--manifest {path.name} line {line}"
        if len(cells) != len(header):
            raise ManifestError(f"{where}: {len(cells)} cells for {len(header)} columns")
        row = {h: c.strip() for h, c in zip(header, cells, strict=True)}
        case = _check_row(row, line, where, path.absolute().parent, required)
        if case.name.lower() in seen:  # case-insensitive file systems would merge the two folders
            raise ManifestError(f"{where}: case {case.name!r} already on line {seen[case.name.lower()]}")
        seen[case.name.lower()] = line
        cases.append(case)
    if not cases:
        raise ManifestError(f"--manifest {path.name} has no cases")
    return cases


def _check_row(row: dict[str, str], line: int, where: str, folder: Path, required: tuple[str, ...]) -> Case:
    for column in required:
        if not row.get(column):
            raise ManifestError(f"{where}: the {column!r} cell is empty")
    name = row["case"]
    if not CASE_NAME.match(name):
        raise ManifestError(
            f"{where}: case {name!r} is not a usable folder name (letters, digits, '.', '_', '-'; "
            "at most 100; no leading dot)"
        )
    files: dict[str, tuple[Path, ...]] = {}
    for column in PATH_COLUMNS:
        cell = row.get(column, "")
        names = [n.strip() for n in cell.split(";")] if column in LIST_COLUMNS else [cell]
        paths = tuple(folder / n for n in names if n)
        for p in paths:
            if not p.exists():
                raise ManifestError(f"{where}: {column} {p} does not exist")
        files[column] = paths
    if row.get("axis") and row["axis"] not in AXES:
        raise ManifestError(f"{where}: axis {row['axis']!r} is not one of {', '.join(AXES)}")
    if row.get("propagate") and row["propagate"] not in DIRECTIONS:
        raise ManifestError(f"{where}: propagate {row['propagate']!r} is not one of {', '.join(DIRECTIONS)}")
    if row.get("label_value"):
        try:
            int(row["label_value"])
        except ValueError:
            raise ManifestError(f"{where}: label_value {row['label_value']!r} is not an integer") from None
    return Case(name=name, row=row, line=line, files=files)


def require_prompt(cases: list[Case], manifest: str | Path) -> None:
    """`batch` needs a prompt for every case (include points or an ROI), as `segment` does."""
    for case in cases:
        if not case.files.get("include") and not case.files.get("roi"):
            raise ManifestError(
                f"--manifest {Path(manifest).name} line {case.line}: case {case.name!r} has no prompt "
                "(an include or roi file)"
            )


def manifest_inputs(manifest: str | Path, cases: list[Case]) -> list[tuple[str, Path]]:
    """Every file a cohort run reads, with its role, for the output plan."""
    inputs = input_files("--manifest", manifest)
    for case in cases:
        for column, paths in case.files.items():
            for path in paths:
                inputs += input_files(f"{column} of case {case.name}", path)
    return inputs
