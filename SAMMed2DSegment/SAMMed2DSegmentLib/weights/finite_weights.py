"""The NaN/infinity check over every weight, and its record beside a cached conversion.

Why: NaN or infinite weights give NaN logits, i.e. empty masks that would erase voxels, so every checkpoint
is checked before use; but the check reads every tensor, which on a memory-mapped cached conversion is most
of a cold start's load time. A conversion is checked once, when it is written into the cache, and the result
is recorded beside it (`<conversion>.finite.json`), bound to the SHA-256 of the source it was converted from
and to the conversion file's identity (size, mtime, ctime, inode, device: any rewrite or replacement changes
it, and ctime cannot be set back). A record that is missing, unreadable, of another source or of another
version of the file counts as no record: the weights are checked again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..files import atomic_path, stat_identity

RECORD_FORMAT = "sammed2d-finite-weights/1"
RECORD_SUFFIX = ".finite.json"


def nonfinite_tensors(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding NaN or infinity."""
    with torch.no_grad():
        return [k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def record_path(weights: Path) -> Path:
    """The record of the conversion `weights` (beside it, so it is deleted and evicted with it)."""
    return weights.with_name(weights.name.removesuffix(".safetensors") + RECORD_SUFFIX)


def _expected(weights: Path, source_sha256: str) -> dict:
    return {
        "format": RECORD_FORMAT,
        "source_sha256": source_sha256,
        "weights": stat_identity(weights.stat()),
        "finite": True,
    }


def is_recorded_finite(weights: Path, source_sha256: str) -> bool:
    """True only when a record says that this very file (the conversion of `source_sha256`) was checked."""
    try:
        record = json.loads(record_path(weights).read_text(encoding="utf-8"))
        return record == _expected(weights, source_sha256)
    except (OSError, ValueError):
        return False


def record_finite(weights: Path, source_sha256: str) -> None:
    """Record that the conversion `weights` passed the check (written atomically; OSError when it cannot)."""
    with atomic_path(record_path(weights), suffix=".tmp.json") as temporary:
        temporary.write_text(json.dumps(_expected(weights, source_sha256)), encoding="utf-8")


__all__ = ["RECORD_SUFFIX", "is_recorded_finite", "nonfinite_tensors", "record_finite", "record_path"]
