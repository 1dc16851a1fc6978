"""The PyTorch install (SAMMed2DSegmentLib.torch_install): the commands are the PyTorch extension's, and
they run as real child processes that the caller polls. No network: light-the-torch is a stand-in module
that records its arguments and writes a torch distribution's files (installed by real pip from a wheel built
here, or put on the path directly), launched through a PythonSlicer-like launcher for the cancel."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import pytest

from SAMMed2DSegmentLib import requirements
from SAMMed2DSegmentLib.torch_install import (
    LIGHT_THE_TORCH,
    TorchInstall,
    light_the_torch_args,
    light_the_torch_installed,
    torch_install_commands,
)

from .child_processes import alive, build_wheel, python_launcher, run_to_end, wait_gone

LTT_VERSION = "0.7.5"

#: A stand-in for `python -m light_the_torch`: prints pip-like lines, records its arguments, then, by
#: STANDIN_MODE, writes torch 2.5.0's files where it was found, fails as pip does, writes nothing, or waits.
STANDIN_MAIN = '''
import json, os, sys, time
from pathlib import Path

print("Looking in indexes: https://download.pytorch.org/whl/cpu", flush=True)
Path(os.environ["STANDIN_RECORD"]).write_text(json.dumps(sys.argv[1:]))
mode = os.environ.get("STANDIN_MODE", "install")
if mode == "fail":
    print("ERROR: Could not find a version that satisfies the requirement torch>=2.1", flush=True)
    sys.exit(1)
print("Collecting torch>=2.1", flush=True)
if mode == "hang":
    time.sleep(600)
if mode == "install":
    site = Path(__file__).resolve().parents[1]
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text("")
    (site / "torch-2.5.0.dist-info").mkdir()
    metadata = "Metadata-Version: 2.1\\nName: torch\\nVersion: 2.5.0\\n"
    (site / "torch-2.5.0.dist-info" / "METADATA").write_text(metadata)
print("Successfully installed torch-2.5.0", flush=True)
'''

STANDIN_FILES = {"light_the_torch/__init__.py": "", "light_the_torch/__main__.py": STANDIN_MAIN}


def _getPipInstallArguments(forceComputationBackend=None, torchVersionRequirement=None,  # noqa: N802, N803
                            torchvisionVersionRequirement=None):  # noqa: N803  # fmt: skip
    """The reference: fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py:234-243 at e1c85cc, verbatim but for
    the indentation (it needs Slicer to import)."""
    if torchVersionRequirement is None:
        torchVersionRequirement = ""
    if torchvisionVersionRequirement is None:
        torchvisionVersionRequirement = ""
    args = ["install", "torch" + torchVersionRequirement, "torchvision" + torchvisionVersionRequirement]
    if forceComputationBackend is not None:
        args.append(f"--pytorch-computation-backend={forceComputationBackend}")
    return args


def standin_site(folder: Path, version: str = LTT_VERSION) -> Path:
    """A site folder holding the stand-in light-the-torch with its metadata, as pip would leave it."""
    for name, text in STANDIN_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    info = folder / f"light_the_torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: light-the-torch\nVersion: {version}\n")
    return folder


def standin_env(site: Path, record: Path, mode: str = "install", **more: str) -> dict[str, str]:
    standin = {"PYTHONPATH": str(site), "STANDIN_RECORD": str(record), "STANDIN_MODE": mode}
    return {**os.environ, **standin, **more}


@pytest.fixture()
def own_tempdir(tmp_path, monkeypatch):
    """The installers' temporary files (their logs) go here, to be checked for leftovers."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# -- the commands -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["win32", "linux", "darwin"])
@pytest.mark.parametrize("backend", [None, "cpu", "cu121"])
def test_light_the_torch_gets_the_pytorch_extensions_arguments(platform, backend):
    """What the module used to call: installTorch(askConfirmation=False, torchVersionRequirement=...), the
    backend left to light-the-torch's detection, or forced."""
    requirement = requirements.torch_requirement(platform)
    expected = _getPipInstallArguments(backend, requirement)
    assert light_the_torch_args(requirement, backend) == expected
    assert ("--pytorch-computation-backend=" in " ".join(expected)) == (backend is not None)


def test_light_the_torch_is_installed_first_where_missing_or_too_old(tmp_path):
    """The extension's pip step is `slicer.util.pip_install('light-the-torch>=0.5')` (PyTorchUtils.py:247),
    which runs `python -m pip install light-the-torch>=0.5` (Slicer v5.10.0 util.py:3991-4034; v5.12.3
    packaging.py:940-965)."""
    python, requirement = "/slicer/bin/PythonSlicer", requirements.torch_requirement("linux")
    ltt = [python, "-m", "light_the_torch", *_getPipInstallArguments(None, requirement)]
    pip = [python, "-m", "pip", "install", *shlex.split("light-the-torch>=0.5")]
    assert LIGHT_THE_TORCH == "light-the-torch>=0.5"
    assert torch_install_commands(python, requirement, search_path=[str(tmp_path)]) == [pip, ltt]
    old = standin_site(tmp_path / "old", "0.4.2")
    assert not light_the_torch_installed([str(old)])
    assert torch_install_commands(python, requirement, search_path=[str(old)]) == [pip, ltt]
    site = standin_site(tmp_path / "site")
    assert light_the_torch_installed([str(site)])
    assert torch_install_commands(python, requirement, search_path=[str(site)]) == [ltt]


# -- real child processes ---------------------------------------------------------------------------------


def test_pip_then_light_the_torch_install_torch_found_by_its_metadata(tmp_path, own_tempdir):
    """The real commands: pip installs light-the-torch (the stand-in, from a wheel built here, offline and
    into a folder of the test's), then light-the-torch runs with the extension's arguments."""
    wheels, site, record = tmp_path / "wheels", tmp_path / "site", tmp_path / "argv.json"
    build_wheel(wheels, "light_the_torch", LTT_VERSION, STANDIN_FILES)
    site.mkdir()
    requirement = requirements.torch_requirement()
    commands = torch_install_commands(sys.executable, requirement, search_path=[str(site)])
    assert len(commands) == 2
    pip_offline = {"PIP_TARGET": str(site), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    install = TorchInstall(commands, search_path=[str(site)], env=standin_env(site, record, **pip_offline))
    install.start()
    lines, progress = run_to_end(install)
    assert progress.succeeded and not progress.error, install.output
    assert progress.line == "PyTorch 2.5.0 is installed."
    assert lines and all("\n" not in line for line in lines)
    output = install.output.splitlines()  # every line, whatever the polls happened to see
    pip_done = next(i for i, line in enumerate(output) if line.startswith("Successfully installed light"))
    assert output.index("Collecting torch>=2.1") > pip_done, output
    assert record.read_text() == f'["install", "torch{requirement}", "torchvision"]'
    assert requirements.check_torch([str(site)]) == ("2.5.0", "")
    assert list(own_tempdir.iterdir()) == [], "a log is left"


def test_installed_light_the_torch_is_not_installed_again(tmp_path, own_tempdir):
    site, record = standin_site(tmp_path / "site"), tmp_path / "argv.json"
    commands = torch_install_commands(sys.executable, ">=2.1", backend="cpu", search_path=[str(site)])
    assert [command[2] for command in commands] == ["light_the_torch"]
    install = TorchInstall(commands, search_path=[str(site)], env=standin_env(site, record))
    install.start()
    _, progress = run_to_end(install)
    assert progress.succeeded, install.output
    forced = '["install", "torch>=2.1", "torchvision", "--pytorch-computation-backend=cpu"]'
    assert record.read_text() == forced
    assert list(own_tempdir.iterdir()) == []


def test_a_failing_light_the_torch_gives_one_line(tmp_path, own_tempdir):
    site = standin_site(tmp_path / "site")
    commands = torch_install_commands(sys.executable, ">=2.1", search_path=[str(site)])
    install = TorchInstall(commands, search_path=[str(site)], env=standin_env(site, tmp_path / "r", "fail"))
    install.start()
    _, progress = run_to_end(install)
    assert progress.finished and not progress.succeeded and not progress.cancelled
    assert progress.error == "Could not find a version that satisfies the requirement torch>=2.1"
    assert "ERROR" in install.output
    assert requirements.check_torch([str(site)])[1], "no torch was to be installed"
    assert list(own_tempdir.iterdir()) == []


def test_no_usable_torch_after_light_the_torch_is_a_failure(tmp_path):
    site = standin_site(tmp_path / "site")
    commands = torch_install_commands(sys.executable, ">=2.1", search_path=[str(site)])
    env = standin_env(site, tmp_path / "r", "nothing")
    install = TorchInstall(commands, search_path=[str(site)], env=env)
    install.start()
    _, progress = run_to_end(install)
    assert not progress.succeeded and "\n" not in progress.error
    assert progress.error.startswith("light-the-torch ended, but PyTorch is not usable: PyTorch is not ")


def test_a_failing_first_step_stops_the_install(tmp_path):
    error = "ERROR: No matching distribution found for light-the-torch>=0.5"
    fail = [sys.executable, "-c", f"print({error!r}); exit(1)"]
    never = [sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"]
    install = TorchInstall([fail, never], search_path=[str(tmp_path)])
    install.start()
    _, progress = run_to_end(install)
    assert progress.error == "No matching distribution found for light-the-torch>=0.5"
    assert not (tmp_path / "ran").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="the launcher is a POSIX shell script")
def test_cancel_kills_light_the_torch_and_its_children_and_leaves_nothing(tmp_path, own_tempdir):
    site = standin_site(tmp_path / "site")
    launcher, env, child_pid = python_launcher(tmp_path)
    commands = torch_install_commands(str(launcher), ">=2.1", search_path=[str(site)])
    env = {**env, **standin_env(site, tmp_path / "r", "hang")}
    install = TorchInstall(commands, search_path=[str(site)], env=env)
    install.start()
    while "Collecting torch>=2.1" not in install.output:  # light-the-torch is certainly mid-way
        assert not install.poll().finished, install.output
        time.sleep(0.05)
    child = int(child_pid.read_text())
    assert alive(child) and install.poll().line == "Collecting torch>=2.1"
    progress = install.cancel()
    assert progress.cancelled and progress.finished and not progress.succeeded
    assert wait_gone(child), "the launcher's child (light-the-torch) survived the cancel"
    assert not alive(install.pid)
    assert install.poll().cancelled
    assert list(own_tempdir.iterdir()) == [], "a log is left"
    before = ["light_the_torch", f"light_the_torch-{LTT_VERSION}.dist-info"]
    assert sorted(p.name for p in site.iterdir()) == before


def test_an_empty_install_is_refused():
    with pytest.raises(ValueError):
        TorchInstall([])


@pytest.mark.skipif(sys.platform == "win32", reason="process groups: POSIX")
def test_kill_reaches_the_group_after_its_leader_has_exited(tmp_path):
    """A launcher that has already exited leaves its child running in the group: the kill still reaches it
    (it used to skip the group once the leader was gone)."""
    from SAMMed2DSegmentLib.polled_process import PolledProcess

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))")  # fmt: skip
    process = PolledProcess([sys.executable, "-c", script])
    process.start()
    try:
        deadline = time.monotonic() + 30
        while process.poll() is None or not pid_file.exists():
            assert time.monotonic() < deadline, process.lines
            time.sleep(0.02)
        child = int(pid_file.read_text())
        assert alive(child)
        process.kill()
        assert wait_gone(child), "the leader's child survived the kill"
    finally:
        process.close()
