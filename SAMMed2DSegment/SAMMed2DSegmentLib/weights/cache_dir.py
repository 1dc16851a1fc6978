"""The per-user cache folder, and what makes a folder a cache's own, in a module without torch: the Slicer
module asks where weights are (and whether they are downloaded) before torch is installed
(and Slicer's process never imports it).

A cache that evicts deletes files, so it must never work in a folder it did not make: a user who names a
folder holding their own files (their checkpoints, say) would lose them under the size bound. A cache claims
a folder by writing a marker into it (a `CACHEDIR.TAG`, which backup tools also understand, carrying our own
line); a folder that already holds other files and no such marker is never claimed: a marked subfolder inside
it is used instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..files import lock_file, unlock_file

CACHE_ENV = "SAMMED2D_CACHE_DIR"

MARKER = "CACHEDIR.TAG"
_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"  # https://bford.info/cachedir/
LOCK = ".sammed2d.lock"


def default_cache_dir() -> Path:
    """`$SAMMED2D_CACHE_DIR`, else `~/.cache/sammed2d`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sammed2d"


def _marker_text(purpose: str) -> str:
    return f"{_SIGNATURE}\n# This folder is a {purpose} made by SAMMed2D; it deletes only its own entries.\n"


def is_owned(folder: Path, purpose: str) -> bool:
    """True when `folder` carries the marker a `purpose` cache wrote (a plain file, not a link)."""
    marker = folder / MARKER
    try:
        if marker.is_symlink() or not marker.is_file():
            return False
        with marker.open("r", encoding="utf-8", errors="replace") as fh:
            return fh.read(4096) == _marker_text(purpose)
    except OSError:
        return False


def _claim(folder: Path, purpose: str) -> bool:
    """Mark `folder` as ours when it is new or empty; False when it holds anything else."""
    folder.mkdir(parents=True, exist_ok=True)
    if is_owned(folder, purpose):
        return True
    if folder.is_symlink() or any(folder.iterdir()):
        return False
    try:
        fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another process claimed it at the same moment
        return is_owned(folder, purpose)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(_marker_text(purpose))
    return True


def owned_folder(folder: str | os.PathLike[str], purpose: str, subfolder: str) -> Path:
    """The folder a `purpose` cache may delete in: `folder` itself when it is new, empty or already marked;
    else the marked `subfolder` inside it. Raises NotADirectoryError when `folder` is not a folder, OSError
    when it cannot be created or marked, and FileExistsError when not even `subfolder` is ours."""
    folder = Path(folder).expanduser()
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise NotADirectoryError(f"{existing} is not a folder")
    if _claim(folder, purpose):
        return folder
    inner = folder / subfolder
    if inner.exists() and not inner.is_dir():
        raise FileExistsError(f"{folder} holds other files, and {inner} is not a folder")
    if _claim(inner, purpose):
        return inner
    raise FileExistsError(f"{folder} holds other files, and so does {inner} (no cache marker there)")


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An advisory lock on `folder` (a lock file inside it) for the time of a block, so processes sharing a
    cache take turns measuring and evicting. Where the file system refuses locks the block runs unlocked:
    the worst case is a bound overshot by one entry per process."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            taken = lock_file(fd)
        except OSError:  # a file system that refuses locks
            taken = False
        yield
    finally:
        if taken:
            unlock_file(fd)
        os.close(fd)


__all__ = ["CACHE_ENV", "LOCK", "MARKER", "default_cache_dir", "folder_lock", "is_owned", "owned_folder"]
