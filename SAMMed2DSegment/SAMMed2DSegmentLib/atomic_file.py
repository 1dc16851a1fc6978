"""Atomic file writes: a crash or error never leaves a half-written file or damages an existing one."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
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
