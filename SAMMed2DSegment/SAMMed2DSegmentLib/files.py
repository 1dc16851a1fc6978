"""File helpers every layer uses (standard library only): atomic writes, so a crash or error never leaves a
half-written file or damages an existing one, and a streamed SHA-256, so a 2.4 GB checkpoint is never held in
memory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path next to `target` to write to; on success it is fsynced and renamed over
    `target` (same folder, so the rename is atomic), keeping an existing file's permissions, else the
    usual ones (umask applied). On any failure the temporary file is removed and `target` is untouched."""
    target = Path(target)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}{suffix}")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        if target.exists():
            shutil.copymode(target, temporary)
        with temporary.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class HashCancelled(Exception):
    """`sha256_file` stopped because its `should_stop` said so."""


def sha256_file(
    path: str | os.PathLike[str],
    chunk_size: int = 1 << 20,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """SHA-256 of a file, read in chunks; `should_stop` is asked between chunks (a cancelled download's
    verification must not run on for a minute)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            if should_stop is not None and should_stop():
                raise HashCancelled(str(path))
            digest.update(chunk)
    return digest.hexdigest()
