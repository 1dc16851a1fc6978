"""The engine-package installer (SAMMed2DSegmentLib.installer): real pip runs, offline, against a wheel built
here; a failing install; a cancel while pip waits on a server that never answers, with pip started through a
launcher the way PythonSlicer starts the real interpreter."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from SAMMed2DSegmentLib import requirements
from SAMMed2DSegmentLib.installer import STALE_STAGING_SECONDS, PipInstall

from .child_processes import alive, python_launcher, run_to_end, wait_gone
from .child_processes import build_wheel as build_any_wheel

PACKAGE, VERSION = "sammed2d_tiny", "1.0"


def build_wheel(folder: Path) -> Path:
    """A pure-Python wheel with one module."""
    return build_any_wheel(folder, PACKAGE, VERSION, {f"{PACKAGE}/__init__.py": "VALUE = 42\n"})


def offline(find_links: Path) -> list[str]:
    return ["--no-index", "--find-links", str(find_links)]


def test_install_puts_a_complete_importable_folder_in_place(tmp_path):
    wheels = tmp_path / "wheels"
    build_wheel(wheels)
    target = tmp_path / "cache" / "packages" / "py3-test"
    install = PipInstall(sys.executable, [f"{PACKAGE}=={VERSION}"], target, pip_args=offline(wheels))
    install.start()
    lines, progress = run_to_end(install)
    assert progress.succeeded and not progress.error and not progress.cancelled
    assert lines and "\n" not in lines[-1]
    assert (target / PACKAGE / "__init__.py").is_file()
    assert requirements.folder_complete(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "the staging folder is left"
    code = "import sys; "
    code += f"sys.path.insert(0, {str(target)!r}); import {PACKAGE} as m; print(m.VALUE, m.__file__)"
    shown = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    value, location = shown.stdout.split()
    assert value == "42" and Path(location).parent.parent == target
    # The checker now finds the package in the folder and hands the folder to the engine.
    listed = tmp_path / "requirements.txt"
    listed.write_text(f"{PACKAGE}=={VERSION}\n")
    state = requirements.check_requirements(listed, target, search_path=[])
    assert state.missing == () and state.package_dirs == (str(target),)


def test_staging_folders_of_killed_installs_are_removed_once_a_day_old(tmp_path):
    """A Slicer killed while pip ran leaves its staging folder; the next install of that target removes
    those a day old, and leaves a recent one (another install may be writing it) and any other name."""
    wheels = tmp_path / "wheels"
    build_wheel(wheels)
    target = tmp_path / "cache" / "packages" / "py3-test"
    target.parent.mkdir(parents=True)
    stale, recent = (target.parent / f".{target.name}.staging-{n}" for n in ("old", "new"))
    other = target.parent / ".py3-other.staging-old"
    for folder in (stale, recent, other):
        (folder / "pkg").mkdir(parents=True)
    day_old = time.time() - STALE_STAGING_SECONDS - 60
    for folder in (stale, other):
        os.utime(folder, (day_old, day_old))
    install = PipInstall(sys.executable, [f"{PACKAGE}=={VERSION}"], target, pip_args=offline(wheels))
    install.start()
    assert run_to_end(install)[1].succeeded
    assert not stale.exists() and recent.is_dir() and other.is_dir() and requirements.folder_complete(target)


def test_failing_install_reports_one_line_and_leaves_no_folder(tmp_path):
    (tmp_path / "wheels").mkdir()
    target = tmp_path / "cache" / "packages" / "py3-test"
    install = PipInstall(sys.executable, ["sammed2d-nonexistent==1.0"], target,
                         pip_args=offline(tmp_path / "wheels"))  # fmt: skip
    install.start()
    _, progress = run_to_end(install)
    assert progress.finished and not progress.succeeded
    assert "sammed2d-nonexistent" in progress.error and "\n" not in progress.error
    assert "ERROR" in install.output
    assert not (tmp_path / "cache").exists(), "the folders made for the target must go too"


def test_a_folder_in_the_way_is_never_removed(tmp_path):
    wheels = tmp_path / "wheels"
    build_wheel(wheels)
    target = tmp_path / "packages" / "py3-test"
    target.mkdir(parents=True)
    (target / "someone-elses.txt").write_text("keep me")
    install = PipInstall(sys.executable, [f"{PACKAGE}=={VERSION}"], target, pip_args=offline(wheels))
    install.start()
    _, progress = run_to_end(install)
    assert not progress.succeeded and "not a complete install" in progress.error
    assert sorted(p.name for p in target.iterdir()) == ["someone-elses.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_an_install_finished_meanwhile_elsewhere_is_kept(tmp_path):
    """Two Slicer sessions installing at once: the second finds the first one's complete folder."""
    wheels = tmp_path / "wheels"
    build_wheel(wheels)
    target = tmp_path / "packages" / "py3-test"
    install = PipInstall(sys.executable, [f"{PACKAGE}=={VERSION}"], target, pip_args=offline(wheels))
    install.start()
    target.mkdir(parents=True)
    requirements.write_marker(target, ["from the other session"])
    _, progress = run_to_end(install)
    assert progress.succeeded
    assert "from the other session" in (target / requirements.COMPLETE_MARKER).read_text()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


@pytest.mark.skipif(sys.platform == "win32", reason="the launcher below is a POSIX shell script")
def test_cancel_kills_pip_and_its_children_and_leaves_nothing(tmp_path):
    # An index that accepts connections and never answers: pip is certainly mid-way when cancel comes.
    listener = socket.create_server(("127.0.0.1", 0))
    connected = threading.Event()
    held = []

    def accept() -> None:
        try:
            held.append(listener.accept()[0])
            connected.set()
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    # Like PythonSlicer: a launcher that starts the real interpreter as its child and waits for it.
    launcher, env, child_pid = python_launcher(tmp_path)
    target = tmp_path / "cache" / "packages" / "py3-test"
    index = f"http://127.0.0.1:{listener.getsockname()[1]}/simple"
    install = PipInstall(str(launcher), [f"{PACKAGE}=={VERSION}"], target, env=env,
                         pip_args=["--index-url", index, "--timeout", "600", "--retries", "0"])  # fmt: skip
    try:
        install.start()
        while not connected.wait(0.05):
            assert not install.poll().finished, install.output
        child = int(child_pid.read_text())
        assert alive(child)
        progress = install.cancel()
        assert progress.cancelled and progress.finished and not progress.succeeded
        assert wait_gone(child), "the launcher's child (the real pip) survived the cancel"
        assert not alive(install.pid)
        assert not (tmp_path / "cache").exists()
        assert install.poll().cancelled
    finally:
        listener.close()
        for connection in held:
            connection.close()


def test_an_empty_install_is_refused(tmp_path):
    with pytest.raises(ValueError):
        PipInstall(sys.executable, [], tmp_path / "x")
