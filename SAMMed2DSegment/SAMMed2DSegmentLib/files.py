"""File helpers every layer uses (standard library only): atomic writes, so a crash or error never leaves a
half-written file or damages an existing one, and a streamed SHA-256, so a 2.4 GB checkpoint is never held in
memory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt


#: Our temporary files: `.<target name, maybe shortened>.<12 hex digits>.tmp[.<extension>]`, hidden, beside
#: their target. A run killed outright (SIGKILL, power loss) leaves one behind; the next run's output plan
#: removes those in its folders (only names of this pattern, only when no live run holds them).
TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.[A-Za-z0-9]+)*$")
_TOKEN_BYTES = 6


def name_max(folder: str | os.PathLike[str]) -> int:
    """The longest file name (in bytes) the file system holding `folder` accepts (255 where it cannot say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _fit(prefix: str, tail: str, limit: int) -> str:
    """`prefix + tail`, with `prefix` shortened (whole characters) so the UTF-8 name fits `limit` bytes."""
    room = limit - len(tail.encode())
    encoded = prefix.encode()
    if len(encoded) > room:
        prefix = encoded[: max(room, 1)].decode(errors="ignore") or "."
    return prefix + tail


def temporary_name(target: Path, suffix: str, limit: int | None = None) -> str:
    """A fresh temporary name for `target` that fits the folder's name limit: a 250-byte output name must
    not fail only at the end, after all the work, because the name beside it is too long."""
    limit = limit if limit is not None else name_max(target.parent)
    return _fit(f".{target.name}", f".{secrets.token_hex(_TOKEN_BYTES)}{suffix}", limit)


def lock_name(target: Path, limit: int | None = None) -> str:
    """The hidden lock file beside `target` that serialises runs updating it (always the same name)."""
    limit = limit if limit is not None else name_max(target.parent)
    return _fit(f".{target.name}", ".lock", limit)


def write_target(target: str | os.PathLike[str]) -> Path:
    """Where bytes for `target` go: a symlink is written through to the file it names (the link stays a
    link and its target gets the new content, atomically), anything else is itself."""
    target = Path(target)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def lock_file(fd: int, wait: bool = True) -> bool:
    """An exclusive advisory lock on an open file (fcntl on POSIX, msvcrt on Windows): True when taken.
    Closing the file releases it (or `unlock_file`)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True
    while True:  # pragma: no cover - Windows
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            if not wait:
                return False
            time.sleep(0.1)


def unlock_file(fd: int) -> None:
    """Release `lock_file`'s lock before the file is closed (Windows wants it released explicitly)."""
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:  # pragma: no cover - Windows
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


@contextlib.contextmanager
def locked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the advisory lock file `path` for the block (created if missing; `on_wait` is called once if
    another run holds it). It is removed while still held, so it never stays behind; a run that was waiting
    on the removed file sees that its path is gone or another file, and locks again."""
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not lock_file(fd, wait=False):
            if on_wait is not None and not waited:
                on_wait()
            waited = True
            lock_file(fd, wait=True)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # Windows keeps a file that is open: it stays, empty
            os.unlink(path)
        os.close(fd)  # closing releases the lock


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove our temporary files (`TEMPORARY_NAME`, regular files only) that no live run holds: what a
    killed run left. A live run keeps its temporary files locked (POSIX) or open (Windows), so they stay."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not TEMPORARY_NAME.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        if fcntl is None:  # pragma: no cover - Windows refuses to delete a file a live run holds open
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if lock_file(fd, wait=False):  # else a live run's file
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


class OutputSet:
    """Several outputs of one run committed as a unit: each gets a temporary file beside its target, and only
    once every one is complete are they renamed over their targets, with SIGINT/SIGTERM/SIGHUP held back
    during the renames, so a failure or an interruption while writing never leaves one output new and another
    old. A symlinked target is written through to the file it names. Each temporary file is held locked
    until the end so another run's cleanup of stale temporaries leaves it alone.
    Use it through :func:`commit_outputs` (or :func:`atomic_path` for a single file)."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._held: list[int] = []
        self.committed = False

    def path(self, target: str | os.PathLike[str], suffix: str = ".tmp") -> Path:
        """A fresh, empty temporary file beside `target` (hidden, same folder so the rename is atomic); its
        name ends in `suffix` for writers that choose the format by extension."""
        target = write_target(target)
        while True:
            temporary = target.with_name(temporary_name(target, suffix))
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            if fcntl is not None:
                lock_file(fd, wait=True)
            try:
                if os.path.samestat(os.fstat(fd), os.stat(temporary)):
                    break
            except FileNotFoundError:
                pass  # removed by a cleanup between its creation and the lock: take another name
            os.close(fd)
        self._held.append(fd)
        self._pending.append((temporary, target))
        return temporary

    def _release(self) -> None:
        for fd in self._held:
            os.close(fd)
        self._held.clear()

    def commit(self) -> None:
        """fsync every temporary file, then rename each over its target (keeping an existing target's
        permissions). Signals are blocked during the renames: an interruption lands before or after them."""
        for temporary, target in self._pending:
            if target.exists():
                shutil.copymode(target, temporary)
            with temporary.open("rb") as f:
                os.fsync(f.fileno())
        self._release()  # Windows cannot rename a file that is open
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
        self._release()


_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP (main thread, POSIX) until the block ends; elsewhere a plain block."""
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


def remove_tree(path: str | os.PathLike[str], attempts: int, pause: float) -> None:
    """Remove a folder this program made, retrying for a moment: on Windows a just-killed process may still
    hold its files, and a worker that was still writing may add one meanwhile. A missing folder is fine; the
    last failure is raised."""
    for attempt in range(attempts):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(pause)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path next to `target` to write to; on success it is fsynced and renamed over
    `target` (same folder, so the rename is atomic), keeping an existing file's permissions, else the
    usual ones (umask applied). On any failure the temporary file is removed and `target` is untouched.
    A `target` that is itself one of our temporary files (a writer called by an `OutputSet`) is written
    directly: its owner renames it, and a temporary of a temporary would only be left behind by a kill."""
    if TEMPORARY_NAME.match(Path(target).name):
        yield Path(target)
        return
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


def stat_identity(st: os.stat_result) -> list[int]:
    """Everything that changes when a file is written or replaced (ctime cannot be set by a user): what a
    record about a file's content is bound to when re-reading the content would cost what the record saves."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when `a` and `b` name one file: the same inode when both exist (so symlinks and hard links
    count), else the same fully resolved path (a file about to be created through a link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()
