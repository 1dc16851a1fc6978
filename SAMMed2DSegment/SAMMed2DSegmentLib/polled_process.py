"""One command in a child process that the caller polls instead of waiting for (standard library, no Qt): the
installers run pip this way so that Slicer's GUI keeps running, and a Cancel kills the whole process group.

The child's output goes to a temporary log file, read back by `poll()` line by line; a pipe would need a
reader thread, and a full pipe would stall the child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

_OUTPUT_TAIL = 200  # lines of output kept for an error dialog's details


def python_code(python: str, code: str, *args: str) -> list[str]:
    """`python -c code args…` with the working folder that `-c` puts first on the path ("") taken off before
    `code` imports anything: a `pip` or `json` in the folder Slicer was started from would be imported
    instead of the real one. (`-P` does the same, but only from Python 3.11 on.)"""
    return [python, "-c", f"import sys\nif sys.path[:1] == ['']:\n    del sys.path[0]\n{code}", *args]


def python_module(python: str, module: str, *args: str) -> list[str]:
    """`python -m module args…` as `python_code` runs it (the module's status is the exit status)."""
    run = f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return python_code(python, run, *args)


class PolledProcess:
    """`command` in a process group of its own, its stdout and stderr gathered in `lines`."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.command = list(command)
        self.env = env
        self.lines: list[str] = []
        self._process: subprocess.Popen | None = None
        self._log: Path | None = None
        self._offset = 0
        self._partial = b""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the command (returns at once). Raises OSError when it cannot be started."""
        if self._process is not None:
            raise RuntimeError("this process has already been started")
        env = dict(os.environ if self.env is None else self.env)
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})  # line by line, any locale
        fd, log = tempfile.mkstemp(prefix="sammed2d-install-", suffix=".log")
        self._log = Path(log)
        try:
            with os.fdopen(fd, "wb") as output:
                self._process = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    env=env, **_own_process_group(),
                )  # fmt: skip
        except OSError:
            self.close()
            raise

    def poll(self) -> int | None:
        """Read what the child printed since the last call; its exit status once it has ended (all of its
        output read by then), else None. Never waits for the child."""
        if self._process is None:
            return None
        self._read_output()
        code = self._process.poll()
        if code is not None:
            self._read_output(final=True)
        return code

    def kill(self) -> None:
        """Kill the child and every process it started. Blocks only until they are gone."""
        if self._process is not None:
            _kill_tree(self._process)

    def close(self) -> None:
        """Remove the log (the lines read so far stay in `lines`)."""
        if self._log is not None:
            self._log.unlink(missing_ok=True)
            self._log = None

    def latest_line(self, default: str) -> str:
        """The last line worth showing (pip's "[notice]" lines are not), on one line."""
        meaningful = [line for line in self.lines if not line.lstrip().startswith("[notice]")]
        return " ".join(meaningful[-1].split()) if meaningful else default

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
                self.lines.append(line)
        del self.lines[:-_OUTPUT_TAIL]


def pip_error(lines: Sequence[str], code: int) -> str:
    """pip's last error line, else its last line, else the exit status."""
    errors = [line.strip() for line in lines if line.lstrip().startswith("ERROR:")]
    if errors:
        return errors[-1].removeprefix("ERROR:").strip()
    return lines[-1].strip() if lines else f"pip exited with status {code}"


def _own_process_group() -> dict:
    """Popen arguments that put the child (and anything it starts, e.g. the launcher's real Python) in a group
    of its own, to be killed as a whole, with no console window on Windows."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill `process` and its descendants: PythonSlicer is a launcher whose child, the real interpreter,
    would otherwise keep running."""
    if sys.platform == "win32":
        if process.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdin=subprocess.DEVNULL,
                           capture_output=True, creationflags=subprocess.CREATE_NO_WINDOW)  # fmt: skip
    else:  # the whole group, even where the launcher itself has already exited: its child may not have
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        process.kill()
    process.wait()


__all__ = ["PolledProcess", "pip_error"]
