"""The resume digest of a case: what its outputs depend on (the manifest row as written, the content of every
input file, the model file, the run's options that change the result, and the versions of this package and
of torch, so that a cohort resumed after an upgrade is not a mix of two versions' results). Kept in the
case's report; `--resume` skips a case whose outputs exist and whose digest is unchanged. Computed on the
client from the files and package metadata alone, so skips are decided before any cluster starts."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path

from ..files import sha256_file
from .manifest import Case

DIGEST_VERSION = 2


def _file_digests(path: Path) -> list[tuple[str, str]]:
    """A file's SHA-256, or for a folder (a DICOM series) every file's, by name."""
    if path.is_dir():
        return [(p.name, sha256_file(p)) for p in sorted(path.iterdir()) if p.is_file()]
    return [(path.name, sha256_file(path))]


def software_versions() -> dict[str, str | None]:
    """This package's version and torch's (with its build label, "2.13.0+cpu"), read from metadata without
    importing torch."""
    from .. import __version__

    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = None
    return {"sammed2d": __version__, "torch": torch}


def same_release(a: Mapping[str, str | None], b: Mapping[str, str | None]) -> bool:
    """Whether two `software_versions` name the same releases, whatever torch's build label: a CPU-only login
    node may send cases to workers with a CUDA build of the same torch."""

    def release(versions: Mapping[str, str | None]) -> dict:
        torch = versions.get("torch")
        return {**versions, "torch": torch.split("+", 1)[0] if torch else torch}

    return release(a) == release(b)


def case_digest(case: Case, model_sha256: str, options: Mapping[str, object]) -> str:
    """One hex digest of the row, its inputs' content, the model, `options` (precision, outputs asked) and
    the software's versions."""
    record = {
        "version": DIGEST_VERSION,
        "row": dict(sorted(case.row.items())),
        "inputs": {column: [_file_digests(p) for p in paths] for column, paths in sorted(case.files.items())},
        "model": model_sha256,
        "options": dict(sorted(options.items())),
        "software": software_versions(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()
