"""Installs the engine's packages with pip in a child process, without blocking the caller (standard library,
no Qt): the Slicer module calls `poll()` from a qt.QTimer and shows the latest line in a progress dialog whose
Cancel calls `cancel()`.

pip installs into a staging folder beside the final one; only a complete install (pip succeeded and the
completion marker is written) is renamed into place, in one step, so the engine never finds half an install.
Folders this object did not create are never deleted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .files import remove_tree
from .requirements import folder_complete, write_marker

#: pip options for every install: wheels only (nothing is compiled on the user's machine), nothing but the
#: pinned packages (Slicer's own packages satisfy their dependencies), no prompts, plain line output.
PIP_OPTIONS = ("--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
               "--progress-bar", "off", "--no-warn-script-location")  # fmt: skip

_OUTPUT_TAIL = 200  # lines of pip output kept for an error dialog's details


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
        self._process: subprocess.Popen | None = None
        self._log: Path | None = None
        self._offset = 0
        self._partial = b""
        self._lines: list[str] = []
        self._result: InstallProgress | None = None

    # -- state ------------------------------------------------------------------------------------------
    @property
    def command(self) -> list[str]:
        staging = str(self.staging) if self.staging is not None else "<staging>"
        return [self.python, "-m", "pip", "install", *PIP_OPTIONS, "--target", staging, *self.pip_args,
                *self.packages]  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def output(self) -> str:
        """The last lines pip printed (for an error dialog's details)."""
        return "\n".join(self._lines)

    # -- start, poll, cancel ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start pip (returns at once). Raises OSError when the staging folder or pip cannot be made."""
        if self._process is not None or self._result is not None:
            raise RuntimeError("this install has already been started")
        self._make_parents()
        env = dict(os.environ if self.env is None else self.env)
        # --target cannot be combined with a user-level install; pip's own progress goes line by line.
        env.update({"PIP_USER": "0", "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
        try:
            prefix = f".{self.target.name}.staging-"  # beside the target: the final rename stays atomic
            self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.target.parent))
            fd, log = tempfile.mkstemp(prefix="sammed2d-pip-", suffix=".log")
            self._log = Path(log)
            with os.fdopen(fd, "wb") as output:
                self._process = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    env=env, **_own_process_group(),
                )  # fmt: skip
        except OSError:
            self._discard()
            raise

    def poll(self) -> InstallProgress:
        """Read what pip printed since the last call and, once pip has ended, finish the install. Never
        waits for pip."""
        if self._result is not None:
            return self._result
        if self._process is None:
            return InstallProgress("")
        self._read_output()
        code = self._process.poll()
        if code is None:
            return InstallProgress(self._latest_line())
        self._read_output(final=True)
        self._result = self._finish(code)
        return self._result

    def cancel(self) -> InstallProgress:
        """Kill pip and every process it started, and remove the staging folder (and the folders made for the
        target, when empty). Blocks only until the killed processes are gone."""
        if self._result is not None:
            return self._result
        if self._process is not None:
            _kill_tree(self._process)
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

    def _read_output(self, final: bool = False) -> None:
        if self._log is None:
            return
        with open(self._log, "rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        if final and self._partial:
            complete.append(self._partial)
            self._partial = b""
        for raw in complete:
            line = raw.decode("utf-8", errors="replace").replace("\r", "").rstrip()
            if line.strip():
                self._lines.append(line)
        del self._lines[:-_OUTPUT_TAIL]

    def _latest_line(self) -> str:
        meaningful = [line for line in self._lines if not line.lstrip().startswith("[notice]")]
        return " ".join(meaningful[-1].split()) if meaningful else "Starting pip…"

    def _finish(self, code: int) -> InstallProgress:
        try:
            if code != 0:
                return self._failed(_pip_error(self._lines, code))
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
        if self._log is not None:
            self._log.unlink(missing_ok=True)
            self._log = None
        if not self.target.exists():
            for folder in reversed(self._created):
                try:
                    folder.rmdir()
                except OSError:
                    break


def _pip_error(lines: Sequence[str], code: int) -> str:
    """pip's last error line, else its last line, else the exit status."""
    errors = [line.strip() for line in lines if line.lstrip().startswith("ERROR:")]
    if errors:
        return errors[-1].removeprefix("ERROR:").strip()
    return lines[-1].strip() if lines else f"pip exited with status {code}"


def _own_process_group() -> dict:
    """Popen arguments that put pip (and anything it starts, e.g. the launcher's real Python) in a group of
    its own, to be killed as a whole, with no console window on Windows."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill `process` and its descendants: PythonSlicer is a launcher whose child, the real interpreter,
    would otherwise keep running."""
    if process.poll() is None:
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdin=subprocess.DEVNULL,
                           capture_output=True, creationflags=subprocess.CREATE_NO_WINDOW)  # fmt: skip
        else:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if process.poll() is None:
        process.kill()
    process.wait()


__all__ = ["PIP_OPTIONS", "InstallProgress", "PipInstall"]
