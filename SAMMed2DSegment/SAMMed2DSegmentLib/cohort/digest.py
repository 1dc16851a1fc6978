"""The resume digest of a case: what its outputs depend on (the manifest row as written, the content of every
input file, the model file, and the run's options that change the result). Kept in the case's report;
`--resume` skips a case whose outputs exist and whose digest is unchanged. Computed on the client from the
files alone, so skips are decided before any cluster starts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from ..files import sha256_file
from .manifest import Case

DIGEST_VERSION = 1


def _file_digests(path: Path) -> list[tuple[str, str]]:
    """A file's SHA-256, or for a folder (a DICOM series) every file's, by name."""
    if path.is_dir():
        return [(p.name, sha256_file(p)) for p in sorted(path.iterdir()) if p.is_file()]
    return [(path.name, sha256_file(path))]


def case_digest(case: Case, model_sha256: str, options: Mapping[str, object]) -> str:
    """One hex digest of the row, its inputs' content, the model and `options` (precision, outputs asked)."""
    record = {
        "version": DIGEST_VERSION,
        "row": dict(sorted(case.row.items())),
        "inputs": {column: [_file_digests(p) for p in paths] for column, paths in sorted(case.files.items())},
        "model": model_sha256,
        "options": dict(sorted(options.items())),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()
