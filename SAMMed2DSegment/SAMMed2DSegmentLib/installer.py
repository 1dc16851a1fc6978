"""Installs the engine's packages with pip in a child process, without blocking the caller (standard library,
no Qt): the Slicer module calls `poll()` from a qt.QTimer and shows the latest line in a progress dialog whose
Cancel calls `cancel()`.

pip installs into a staging folder beside the final one; only a complete install (pip succeeded and the
completion marker is written) is renamed into place, in one step, so the engine never finds half an install.
Folders this object did not create are never deleted.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .files import remove_tree
from .polled_process import PolledProcess, pip_error, python_module
from .requirements import folder_complete, write_marker

#: pip options for every install: wheels only (nothing is compiled on the user's machine), nothing but the
#: pinned packages (Slicer's own packages satisfy their dependencies), no prompts, plain line output.
PIP_OPTIONS = ("--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
               "--progress-bar", "off", "--no-warn-script-location")  # fmt: skip


@dataclass(frozen=True)
class InstallProgress:
    """What `poll()` reports: the latest meaningful line of pip output, whether the install has ended, and
    how (`error` is one line, "" on success or while running)."""

    line: str
    finished: bool = False
    succeeded: bool = False
    cancelled: bool = False
    error: str = ""


class PipInstall:
    """`python -m pip install --target <staging> <packages>`, moved to `target` once complete.

    `python` is the interpreter whose pip runs (Slicer's own Python for the engine's packages);
    `pip_args` are added to pip's command line (tests use `--no-index --find-links DIR`)."""

    def __init__(
        self,
        python: str,
        packages: Sequence[str],
        target: str | os.PathLike[str],
        pip_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not packages:
            raise ValueError("nothing to install")
        self.python = python
        self.packages = list(packages)
        self.target = Path(target)
        self.pip_args = list(pip_args)
        self.env = env
        self.staging: Path | None = None
        self._created: list[Path] = []  # folders made for the target, outermost first
        self._child: PolledProcess | None = None
        self._result: InstallProgress | None = None

    # -- state ------------------------------------------------------------------------------------------
    @property
    def command(self) -> list[str]:
        staging = str(self.staging) if self.staging is not None else "<staging>"
        return python_module(self.python, "pip", "install", *PIP_OPTIONS, "--target", staging, *self.pip_args,
                             *self.packages)  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def output(self) -> str:
        """The last lines pip printed (for an error dialog's details)."""
        return "\n".join(self._child.lines) if self._child is not None else ""

    # -- start, poll, cancel ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start pip (returns at once). Raises OSError when the staging folder or pip cannot be made."""
        if self._child is not None or self._result is not None:
            raise RuntimeError("this install has already been started")
        self._make_parents()
        env = dict(os.environ if self.env is None else self.env)
        env["PIP_USER"] = "0"  # --target cannot be combined with a user-level install
        try:
            prefix = f".{self.target.name}.staging-"  # beside the target: the final rename stays atomic
            _remove_stale(self.target.parent, prefix)
            self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.target.parent))
            self._child = PolledProcess(self.command, env)
            self._child.start()
        except OSError:
            self._discard()
            raise

    def poll(self) -> InstallProgress:
        """Read what pip printed since the last call and, once pip has ended, finish the install. Never
        waits for pip."""
        if self._result is not None:
            return self._result
        if self._child is None:
            return InstallProgress("")
        code = self._child.poll()
        if code is None:
            return InstallProgress(self._latest_line())
        self._result = self._finish(code)
        return self._result

    def cancel(self) -> InstallProgress:
        """Kill pip and every process it started, and remove the staging folder (and the folders made for the
        target, when empty). Blocks only until the killed processes are gone."""
        if self._result is not None:
            return self._result
        if self._child is not None:
            self._child.kill()
        self._discard()
        self._result = InstallProgress("Installation cancelled.", finished=True, cancelled=True)
        return self._result

    # -- internals --------------------------------------------------------------------------------------
    def _make_parents(self) -> None:
        missing = []
        folder = self.target.parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._created = list(reversed(missing))

    def _latest_line(self) -> str:
        return self._child.latest_line("Starting pip…") if self._child is not None else "Starting pip…"

    def _finish(self, code: int) -> InstallProgress:
        try:
            if code != 0:
                return self._failed(pip_error(self._child.lines, code))
            write_marker(self.staging, self.packages)
            if self.target.exists():  # another Slicer may have finished the same install first
                if not folder_complete(self.target):  # something else is in the way: not ours to remove
                    return self._failed(f"{self.target} exists and is not a complete install; remove it")
                self._discard()
            else:
                os.rename(self.staging, self.target)
                self.staging = None
                self._discard()
            return InstallProgress(self._latest_line(), finished=True, succeeded=True)
        except OSError as error:
            return self._failed(f"could not put the packages in place: {error}")

    def _failed(self, message: str) -> InstallProgress:
        self._discard()
        return InstallProgress(self._latest_line(), finished=True, error=message)

    def _discard(self) -> None:
        """Remove what this install made that is not a finished install: the staging folder, the log, and
        the folders made for the target when they are empty."""
        if self.staging is not None:
            remove_tree(self.staging, attempts=20, pause=0.05)  # Windows may hold files a moment
            self.staging = None
        if self._child is not None:
            self._child.close()
        if not self.target.exists():
            for folder in reversed(self._created):
                try:
                    folder.rmdir()
                except OSError:
                    break


#: A staging folder untouched this long belongs to an install that was killed (Slicer closed or crashed
#: while pip ran): no install of ours writes for a day.
STALE_STAGING_SECONDS = 24 * 3600


def _remove_stale(folder: Path, prefix: str) -> None:
    """Remove the staging folders named `prefix`… in `folder` (only installs of ours make such names) that
    nothing has written to for `STALE_STAGING_SECONDS`; one that cannot be removed is left."""
    cutoff = time.time() - STALE_STAGING_SECONDS
    for old in folder.glob(glob.escape(prefix) + "*"):
        try:
            if old.is_dir() and not old.is_symlink() and old.stat().st_mtime < cutoff:
                remove_tree(old, attempts=1, pause=0)
        except OSError:
            pass


__all__ = ["PIP_OPTIONS", "STALE_STAGING_SECONDS", "InstallProgress", "PipInstall"]
