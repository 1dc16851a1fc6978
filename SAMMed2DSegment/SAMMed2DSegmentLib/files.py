"""File helpers every layer uses (standard library only): atomic writes, so a crash or error never leaves a
half-written file or damages an existing one, and a streamed SHA-256, so a 2.4 GB checkpoint is never held in
memory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


class OutputSet:
    """Several outputs of one run committed as a unit: each gets a temporary file beside its target, and only
    once every one is complete are they renamed over their targets, with SIGINT/SIGTERM held back during the
    renames, so a failure or an interruption while writing never leaves one output new and another old.
    Use it through :func:`commit_outputs` (or :func:`atomic_path` for a single file)."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self.committed = False

    def path(self, target: str | os.PathLike[str], suffix: str = ".tmp") -> Path:
        """A fresh, empty temporary file beside `target` (hidden, same folder so the rename is atomic); its
        name ends in `suffix` for writers that choose the format by extension."""
        target = Path(target)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}{suffix}")
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        self._pending.append((temporary, target))
        return temporary

    def commit(self) -> None:
        """fsync every temporary file, then rename each over its target (keeping an existing target's
        permissions). Signals are blocked during the renames: an interruption lands before or after them."""
        for temporary, target in self._pending:
            if target.exists():
                shutil.copymode(target, temporary)
            with temporary.open("rb") as f:
                os.fsync(f.fileno())
        with _signals_held():
            for temporary, target in self._pending:
                os.replace(temporary, target)
            self._pending.clear()
            self.committed = True

    def discard(self) -> None:
        """Remove every temporary file not yet renamed; targets stay as they were."""
        for temporary, _ in self._pending:
            temporary.unlink(missing_ok=True)
        self._pending.clear()


_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM (main thread, POSIX) until the block ends; elsewhere a plain block."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a deferred signal's handler runs here


@contextlib.contextmanager
def commit_outputs() -> Iterator[OutputSet]:
    """Gather outputs with `outputs.path(target)`; all are renamed into place when the block ends normally,
    none when it raises (KeyboardInterrupt included), and the temporary files are removed."""
    outputs = OutputSet()
    try:
        yield outputs
        outputs.commit()
    finally:
        outputs.discard()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path next to `target` to write to; on success it is fsynced and renamed over
    `target` (same folder, so the rename is atomic), keeping an existing file's permissions, else the
    usual ones (umask applied). On any failure the temporary file is removed and `target` is untouched."""
    with commit_outputs() as outputs:
        yield outputs.path(target, suffix)


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


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when `a` and `b` name one file: the same inode when both exist (so symlinks and hard links
    count), else the same fully resolved path (a file about to be created through a link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


class OutputPlanError(ValueError):
    """An output would overwrite an input or another output, or cannot be written where it is named."""


def input_files(role: str, path: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """The files an input option reads, with their role for messages: a folder (a DICOM series) stands for
    every file in it."""
    path = Path(path)
    if path.is_dir():
        return [(f"file {p.name} of the {role} folder", p) for p in sorted(path.iterdir()) if p.is_file()]
    return [(role, path)] if path.exists() else []


def check_output_plan(
    outputs: Sequence[tuple[str, str | os.PathLike[str] | None]],
    inputs: Sequence[tuple[str, Path]],
    missing_folders_ok: bool = False,
) -> None:
    """Refuse, before any work, an output that is a folder, sits in a missing (unless `missing_folders_ok`:
    the caller creates it) or read-only folder, or is the same file (by inode, so symlinks and hard links
    count, or by resolved path) as an input or as another output. Raises OutputPlanError naming both roles."""
    seen: list[tuple[str, Path]] = []
    for role, name in outputs:
        if not name:
            continue
        path = Path(name)
        if path.is_dir():
            raise OutputPlanError(f"{role} {name} is a folder; give a file name")
        parent = path.resolve().parent
        if parent.is_dir():
            if not os.access(parent, os.W_OK):
                raise OutputPlanError(f"{role}: output folder is not writable: {parent}")
        elif not missing_folders_ok:
            raise OutputPlanError(f"{role}: output folder does not exist: {parent}")
        for other_role, other in [*inputs, *seen]:
            if same_file(path, other):
                raise OutputPlanError(
                    f"{role} {name} is the same file as {other_role} {other}; choose another output path"
                )
        seen.append((role, path))
