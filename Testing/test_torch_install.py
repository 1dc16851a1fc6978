"""The PyTorch install (SAMMed2DSegmentLib.torch_install): light-the-torch gets the PyTorch extension's
arguments, but runs from a private folder with the pip it is made for, so the interpreter's own pip is never
changed; the steps run as real child processes that the caller polls. No network: real pip installs the
private folder offline from wheels built here, where light-the-torch and pip are stand-ins that record how
they were run and write a torch distribution's files into the test's site folder (`STANDIN_SITE`, as pip
would into the interpreter's); the cancel goes through a PythonSlicer-like launcher."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from SAMMed2DSegmentLib import requirements
from SAMMed2DSegmentLib.torch_install import (
    TOOLS,
    TorchInstall,
    light_the_torch_args,
    light_the_torch_command,
    tools_folder,
    tools_install,
)

from .child_processes import alive, build_wheel, python_launcher, run_to_end, wait_gone

#: A stand-in for light-the-torch's `main` (light_the_torch/_cli.py, pip's main patched: it returns pip's
#: status): prints pip-like lines, records its arguments and the pip it would run (it runs pip in its own
#: process), then, by STANDIN_MODE, writes torch 2.5.0's files into STANDIN_SITE, fails as pip does (status 1,
#: returned), writes nothing, or waits.
STANDIN_CLI = """
import json, os, sys, time
from pathlib import Path


def main():
    import pip

    print("Looking in indexes: https://download.pytorch.org/whl/cpu", flush=True)
    record = {"argv": sys.argv[1:], "pip": pip.__file__, "pip_version": pip.__version__}
    Path(os.environ["STANDIN_RECORD"]).write_text(json.dumps(record))
    mode = os.environ.get("STANDIN_MODE", "install")
    if mode == "fail":
        print("ERROR: Could not find a version that satisfies the requirement torch>=2.1", flush=True)
        return 1
    print("Collecting torch>=2.1", flush=True)
    if mode == "hang":
        time.sleep(600)
    if mode == "install":
        site = Path(os.environ["STANDIN_SITE"])
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text("")
        (site / "torch-2.5.0.dist-info").mkdir()
        metadata = "Metadata-Version: 2.1\\nName: torch\\nVersion: 2.5.0\\n"
        (site / "torch-2.5.0.dist-info" / "METADATA").write_text(metadata)
    print("Successfully installed torch-2.5.0", flush=True)
    return 0
"""

LTT_VERSION, PIP_VERSION = (t.split("==")[1] for t in TOOLS)
ENTRY_POINTS = "[console_scripts]\nltt = light_the_torch._cli:main\n"
#: As light-the-torch 0.8.1 lays itself out: `__main__` drops main's status; the `ltt` script keeps it.
STANDIN_FILES = {
    "light_the_torch/__init__.py": "",
    "light_the_torch/_cli.py": STANDIN_CLI,
    "light_the_torch/__main__.py": "from ._cli import main\n\nif __name__ == '__main__':\n    main()\n",
    f"light_the_torch-{LTT_VERSION}.dist-info/entry_points.txt": ENTRY_POINTS,
}
STANDIN_PIP = {"pip/__init__.py": f"__version__ = {PIP_VERSION!r}\n"}


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


def wheels(folder: Path) -> Path:
    """The stand-in light-the-torch and pip as wheels, at `TOOLS`' versions."""
    build_wheel(folder, "light_the_torch", LTT_VERSION, STANDIN_FILES)
    build_wheel(folder, "pip", PIP_VERSION, STANDIN_PIP)
    return folder


def installed_tools(cache: Path) -> Path:
    """A complete private folder, as an earlier install left it."""
    folder = tools_folder(cache)
    metadata = {
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        for name, version in (("light_the_torch", LTT_VERSION), ("pip", PIP_VERSION))
    }
    for name, text in {**STANDIN_FILES, **STANDIN_PIP, **metadata}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    requirements.write_marker(folder, TOOLS)
    return folder


def standin_env(site: Path, record: Path, mode: str = "install", **more: str) -> dict[str, str]:
    standin = {"STANDIN_SITE": str(site), "STANDIN_RECORD": str(record), "STANDIN_MODE": mode}
    return {**os.environ, **standin, **more}


def offline(wheel_folder: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheel_folder)]


@pytest.fixture()
def own_tempdir(tmp_path, monkeypatch):
    """The installers' temporary files (their logs) go here, to be checked for leftovers."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture()
def site(tmp_path) -> Path:
    """The interpreter's site-packages as far as the install is concerned (where torch is looked for)."""
    folder = tmp_path / "site"
    folder.mkdir()
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
    command = light_the_torch_command("/slicer/bin/PythonSlicer", "/cache/tools", requirement, backend)
    assert command[:2] == ["/slicer/bin/PythonSlicer", "-c"]
    assert command[3:] == ["/cache/tools", *expected]


def test_light_the_torch_and_the_pip_it_is_made_for_are_pinned_and_installed_once(tmp_path):
    """light-the-torch 0.8.1 asks for pip>=22.3,<26.1 (Slicer/light-the-torch v0.8.1 pyproject.toml:41): the
    pinned pip must be in that range, and neither may float."""
    from packaging.specifiers import SpecifierSet

    assert [t.split("==")[0] for t in TOOLS] == ["light-the-torch", "pip"] and all("==" in t for t in TOOLS)
    assert PIP_VERSION in SpecifierSet(">=22.3,<26.1")
    folder = tools_folder(tmp_path)
    assert folder.parent == tmp_path and f"py{sys.version_info[0]}{sys.version_info[1]}" in folder.name
    first = tools_install(sys.executable, folder)
    assert first is not None and first.packages == list(TOOLS) and first.target == folder
    installed_tools(tmp_path)
    assert tools_install(sys.executable, folder) is None


# -- real child processes ---------------------------------------------------------------------------------


def test_light_the_torch_runs_from_its_own_folder_with_its_own_pip(tmp_path, site, own_tempdir, monkeypatch):
    """The whole install as the module starts it: real pip puts light-the-torch and its pip into the private
    folder (offline), then light-the-torch runs with the extension's arguments and that pip first on its path.
    The interpreter's own pip is not touched, and nothing is imported from the working folder (a decoy
    `json.py` there, which light-the-torch imports, would run before the standard library's were the working
    folder left first on the path, and a decoy `pip` instead of the real one)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "json.py").write_text(f"open({str(tmp_path / 'decoy-ran')!r}, 'w')\nraise SystemExit(3)\n")
    (cwd / "pip").mkdir()  # and a decoy pip, which `python -m pip` would run from there
    (cwd / "pip" / "__init__.py").write_text("")
    (cwd / "pip" / "__main__.py").write_text((cwd / "json.py").read_text())
    monkeypatch.chdir(cwd)
    cache, record = tmp_path / "packages", tmp_path / "record.json"
    own_pip = importlib.metadata.version("pip")
    requirement = requirements.torch_requirement()
    env, pip_args = standin_env(site, record), offline(wheels(tmp_path / "w"))
    install = TorchInstall.in_slicer(sys.executable, requirement, cache, [str(site)], env, pip_args)
    assert install.tools is not None
    install.start()
    lines, progress = run_to_end(install)
    assert progress.succeeded and not progress.error, install.output
    assert progress.line == "PyTorch 2.5.0 is installed."
    assert lines and all("\n" not in line for line in lines)
    assert not (tmp_path / "decoy-ran").exists()
    tools = tools_folder(cache)
    assert requirements.folder_complete(tools)
    assert requirements.installed_version("light-the-torch", [str(tools)]) == LTT_VERSION
    ran = json.loads(record.read_text())
    assert ran["argv"] == _getPipInstallArguments(None, requirement)
    assert Path(ran["pip"]).is_relative_to(tools) and ran["pip_version"] == PIP_VERSION
    assert requirements.check_torch([str(site)]) == ("2.5.0", "")
    assert importlib.metadata.version("pip") == own_pip
    assert list(own_tempdir.iterdir()) == [], "a log is left"
    again = TorchInstall.in_slicer(sys.executable, requirement, cache_dir=cache, search_path=[str(site)])
    assert again.tools is None  # installed once


def test_the_real_light_the_torch_runs_with_its_own_pip(tmp_path, own_tempdir):
    """The real light-the-torch and pip at `TOOLS`' versions (downloaded by `make test`): real pip installs
    them into the private folder offline, and our command runs light-the-torch from there. It installs a
    package built here (no torch: the PyTorch index is not reachable offline) with the private pip, and the
    interpreter's own pip is unchanged."""
    wheelhouse = Path(sys.prefix) / "tool-wheels"
    if not all(any(wheelhouse.glob(f"{t.split('==')[0].replace('-', '_')}-{t.split('==')[1]}-*.whl"))
               for t in TOOLS):  # fmt: skip
        pytest.fail(f"{wheelhouse} lacks {TOOLS}: `make test` downloads them")
    folder, own_pip = tools_folder(tmp_path / "packages"), importlib.metadata.version("pip")
    first = tools_install(sys.executable, folder, pip_args=offline(wheelhouse))
    first.start()
    _, progress = run_to_end(first)
    assert progress.succeeded, first.output
    probe = build_wheel(tmp_path / "w", "sammed2d_probe", "1.0", {"sammed2d_probe/__init__.py": "x = 1\n"})
    out = tmp_path / "out"
    ours = light_the_torch_command(sys.executable, folder, ">=2.1")
    ltt = ours[: -len(light_the_torch_args(">=2.1"))]  # light-the-torch from the folder, other arguments
    command = [*ltt, "install", "-v", *offline(probe.parent), "--target", str(out), "sammed2d_probe"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Using pip {PIP_VERSION.split('.post')[0]} from {folder / 'pip'}" in done.stdout + done.stderr
    assert (out / "sammed2d_probe" / "__init__.py").is_file()
    missing = [*ltt, "install", *offline(probe.parent), "--target", str(out), "no-such-package"]
    failed = subprocess.run(missing, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert failed.returncode != 0, "pip's failure must reach the caller (python -m light_the_torch exits 0)"
    assert "No matching distribution found for no-such-package" in failed.stdout + failed.stderr
    assert importlib.metadata.version("pip") == own_pip
    assert list(own_tempdir.iterdir()) == []


def test_a_failing_light_the_torch_gives_one_line(tmp_path, site, own_tempdir):
    installed_tools(tmp_path / "packages")
    env = standin_env(site, tmp_path / "r", "fail")
    install = TorchInstall.in_slicer(sys.executable, ">=2.1", tmp_path / "packages", [str(site)], env)
    install.start()
    _, progress = run_to_end(install)
    assert progress.finished and not progress.succeeded and not progress.cancelled
    assert progress.error == "Could not find a version that satisfies the requirement torch>=2.1"
    assert "ERROR" in install.output
    assert requirements.check_torch([str(site)])[1], "no torch was to be installed"
    assert list(own_tempdir.iterdir()) == []


def test_no_usable_torch_after_light_the_torch_is_a_failure(tmp_path, site):
    installed_tools(tmp_path / "packages")
    env = standin_env(site, tmp_path / "r", "nothing")
    install = TorchInstall.in_slicer(sys.executable, ">=2.1", tmp_path / "packages", [str(site)], env)
    install.start()
    _, progress = run_to_end(install)
    assert not progress.succeeded and "\n" not in progress.error
    assert progress.error.startswith("light-the-torch ended, but PyTorch is not usable: PyTorch is not ")


def test_a_failing_install_of_light_the_torch_stops_there_and_leaves_nothing(tmp_path, site, own_tempdir):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    cache, record = tmp_path / "packages", tmp_path / "record.json"
    install = TorchInstall.in_slicer(sys.executable, ">=2.1", cache_dir=cache, search_path=[str(site)],
                                     env=standin_env(site, record), pip_args=offline(empty))  # fmt: skip
    install.start()
    _, progress = run_to_end(install)
    assert not progress.succeeded and "\n" not in progress.error
    assert progress.error.startswith("light-the-torch could not be installed: ")
    assert "light-the-torch==0.8.1" in progress.error
    assert not record.exists() and not cache.exists()
    assert list(own_tempdir.iterdir()) == []


def test_a_damaged_private_folder_is_named_and_left_alone(tmp_path, site, own_tempdir):
    """A folder with the completion marker but without light-the-torch's files (removed by a cleaner, say)
    is named in one line before pip runs (it is not ours to remove). Damaged while another install ran (its
    pip then finds the folder complete and keeps it), it is named after that install instead of a traceback
    from the missing package."""
    from SAMMed2DSegmentLib.installer import PipInstall

    tools = installed_tools(tmp_path / "packages")
    for dist in tools.glob("light_the_torch*"):
        for path in sorted(dist.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        dist.rmdir()
    message = f"{tools} does not hold light-the-torch==0.8.1 and pip==26.0.1.post1; delete it and try again"
    with pytest.raises(RuntimeError) as refused:
        TorchInstall.in_slicer(sys.executable, ">=2.1", tmp_path / "packages", [str(site)])
    assert str(refused.value) == message
    record = tmp_path / "record.json"
    env, pip_args = standin_env(site, record), offline(wheels(tmp_path / "w"))
    command = light_the_torch_command(sys.executable, tools, ">=2.1")
    meanwhile = PipInstall(sys.executable, TOOLS, tools, pip_args=pip_args, env=env)
    install = TorchInstall([command], search_path=[str(site)], env=env, tools=meanwhile)
    install.start()
    _, progress = run_to_end(install)
    assert progress.error == message
    assert not record.exists() and requirements.folder_complete(tools)


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
def test_cancel_kills_light_the_torch_and_its_children_and_leaves_nothing(tmp_path, site, own_tempdir):
    tools = installed_tools(tmp_path / "packages")
    before = sorted(p.name for p in tools.iterdir())
    launcher, env, child_pid = python_launcher(tmp_path)
    env = {**env, **standin_env(site, tmp_path / "r", "hang")}
    install = TorchInstall.in_slicer(str(launcher), ">=2.1", cache_dir=tmp_path / "packages",
                                     search_path=[str(site)], env=env)  # fmt: skip
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
    assert sorted(p.name for p in tools.iterdir()) == before and list(site.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="the launcher is a POSIX shell script")
def test_cancel_while_light_the_torch_is_installed_leaves_no_folder(tmp_path, site, own_tempdir):
    """Cancel while the private folder is being installed (a launcher that prints pip's first line and
    waits): the staging folder and the folders made for it go."""
    launcher = tmp_path / "SlowPython"
    launcher.write_text('#!/bin/sh\necho "Collecting light-the-torch==0.8.1"\nsleep 600\n')
    launcher.chmod(0o755)
    cache = tmp_path / "packages"
    install = TorchInstall.in_slicer(str(launcher), ">=2.1", cache_dir=cache, search_path=[str(site)])
    install.start()
    while "Collecting light-the-torch" not in install.output:
        assert not install.poll().finished, install.output
        time.sleep(0.05)
    assert install.poll().line == "Collecting light-the-torch==0.8.1"
    pid = install.pid
    assert install.cancel().cancelled and wait_gone(pid)
    assert not cache.exists() and list(own_tempdir.iterdir()) == []


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
