"""What the installer tests share: a wheel built here (pip installs it offline), a launcher that starts the
real interpreter as its child the way PythonSlicer does, and whether a process is still running."""

from __future__ import annotations

import base64
import hashlib
import os
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path


def build_wheel(folder: Path, name: str, version: str, files: Mapping[str, str]) -> Path:
    """A pure-Python wheel of `files` (path in the wheel -> text) with METADATA, WHEEL and a RECORD with
    hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def run_to_end(install, limit: float = 300.0) -> tuple[list[str], object]:
    """Poll an installer the way the module's timer does, collecting the distinct lines it shows; the limit
    only keeps a broken run from hanging the suite."""
    lines, deadline = [], time.monotonic() + limit
    while True:
        progress = install.poll()
        if progress.line and (not lines or lines[-1] != progress.line):
            lines.append(progress.line)
        if progress.finished:
            return lines, progress
        assert time.monotonic() < deadline, "the install did not end"
        time.sleep(0.05)


def python_launcher(folder: Path) -> tuple[Path, dict[str, str], Path]:
    """(a POSIX launcher that runs this interpreter as its child and waits for it, like PythonSlicer; the
    environment it needs; the file where it writes its child's pid)."""
    launcher = folder / "PythonLauncher"
    launcher.write_text('#!/bin/sh\n"$REAL_PYTHON" "$@" &\necho $! > "$CHILD_PID"\nwait\n')
    launcher.chmod(0o755)
    child_pid = folder / "child.pid"
    return launcher, {**os.environ, "REAL_PYTHON": sys.executable, "CHILD_PID": str(child_pid)}, child_pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a killed child whose parent is gone may wait as a zombie
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def wait_gone(pid: int, limit: float = 30.0) -> bool:
    """Whether `pid` is gone within `limit` seconds (the kill is sent already: this bounds the reaping)."""
    deadline = time.monotonic() + limit
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)
