"""Installs PyTorch as the PyTorch extension does, but in child processes that the caller polls (standard
library, no Qt, no torch): Slicer's GUI keeps running, Cancel works, and torch is never imported into
Slicer's process (the engine process is the one that imports it).

The PyTorch extension (fepegar/SlicerPyTorch, PyTorchUtils/PyTorchUtils.py at e1c85cc) installs torch with
`installTorch` (:194-227): `pip install light-the-torch>=0.5` into Slicer's Python (:247) where
`import light_the_torch._patch` fails (:218-222), then `python -m light_the_torch install torch<range>
torchvision` (:224, the arguments built at :234-243). light-the-torch patches pip's internals and so pins
pip (`pip>=22.3,<26.1` at v0.8.1, pyproject.toml:41): installed into Slicer 5.12's Python it takes Slicer's
pip 26.1.1 (Slicer v5.12.3 SuperBuild/External_python-pip.cmake:30) down to 26.0.1. Here light-the-torch and
the pip it is made for go into a private folder of ours instead (`TOOLS`, installed like the engine's
packages: `installer.PipInstall`), and light-the-torch runs from there, first on its `sys.path`: it runs pip
in its own process (light_the_torch/_cli.py), so the private pip does the install, into the interpreter's
own site-packages. torch goes there as with the extension, the documented place for torch in Slicer, shared
with other extensions; Slicer's pip and light-the-torch's own needs are left alone. Whether torch is there
afterwards is read from package metadata (requirements.check_torch) instead of an import.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .installer import InstallProgress, PipInstall
from .polled_process import PolledProcess, pip_error, python_code
from .requirements import check_torch, folder_complete, installed_version
from .weights.cache_dir import default_cache_dir

#: light-the-torch and the pip its metadata asks for, pinned as the engine's packages are (`--no-deps`: its
#: other requirement, packaging>=23, is met by what Slicer 5.10 and 5.12 bundle).
TOOLS = ("light-the-torch==0.8.1", "pip==26.0.1.post1")

#: Run light-the-torch's console script (`ltt`, its entry point) with the private folder (the first argument)
#: first on the path, and exit with its status: `python -m light_the_torch` exits 0 even when pip failed
#: (its `__main__` drops the status pip's main returns).
_RUN_FROM_FOLDER = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from importlib.metadata import entry_points; "
    "(ltt,) = entry_points(group='console_scripts', name='ltt'); sys.exit(ltt.load()())"
)


def tools_folder(cache_dir: str | Path | None = None) -> Path:
    """The private folder for `TOOLS`, beside the engine's package folders, named for them and this Python."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "packages"
    name = "-".join(t.replace("==", "-") for t in TOOLS)
    return root / f"torch-installer-py{sys.version_info[0]}{sys.version_info[1]}-{name}"


def light_the_torch_args(torch_requirement: str, backend: str | None = None) -> list[str]:
    """light-the-torch's arguments, as `_getPipInstallArguments` (PyTorchUtils.py:234-243) builds them for the
    call this module used to make (`torchVersionRequirement=` only). torchvision comes along, unpinned, as it
    does from the extension: light-the-torch picks a build that matches torch's. Without `backend`
    light-the-torch detects the computation backend itself (light_the_torch/_patch.py:175-188 at 33397cb:
    CUDA when the NVIDIA driver allows, else CPU)."""
    args = ["install", "torch" + torch_requirement, "torchvision"]
    if backend is not None:
        args.append(f"--pytorch-computation-backend={backend}")
    return args


def light_the_torch_command(
    python: str, tools: str | Path, torch_requirement: str, backend: str | None = None
) -> list[str]:
    """light-the-torch from the private folder `tools`, run by `python` (Slicer's PythonSlicer)."""
    args = light_the_torch_args(torch_requirement, backend)
    return python_code(python, _RUN_FROM_FOLDER, str(tools), *args)


def tools_ready(tools: str | Path) -> bool:
    """Whether `tools` is a complete install holding `TOOLS` at their versions (read from metadata)."""
    found = [installed_version(t.split("==")[0], [str(tools)]) for t in TOOLS]
    return folder_complete(tools) and found == [t.split("==")[1] for t in TOOLS]


def tools_install(
    python: str, tools: str | Path, pip_args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> PipInstall | None:
    """The install of `TOOLS` into `tools`, or None where they are there. A folder marked complete without
    them is named in a RuntimeError (one line; it is not ours to remove)."""
    if tools_ready(tools):
        return None
    if folder_complete(tools):  # marked complete, yet without them: pip would only find it in the way
        raise RuntimeError(f"{tools} does not hold {' and '.join(TOOLS)}; delete it and try again")
    return PipInstall(python, TOOLS, tools, pip_args=pip_args, env=env)


class TorchInstall:
    """`tools` (the install of light-the-torch into its private folder, where needed), then `commands` one
    after the other, each in a child process group of its own; the install succeeded when all of them did
    and torch is then found, usable, along `search_path` (default: `sys.path` at that moment)."""

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        search_path: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        platform: str = sys.platform,
        tools: PipInstall | None = None,
    ) -> None:
        if not commands:
            raise ValueError("nothing to run")
        self.commands = [list(command) for command in commands]
        self.search_path = None if search_path is None else list(search_path)
        self.env = env
        self.platform = platform
        self.tools = tools
        self._children: list[PolledProcess] = []
        self._result: InstallProgress | None = None

    @classmethod
    def in_slicer(
        cls,
        python: str,
        torch_requirement: str,
        cache_dir: str | Path | None = None,
        search_path: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        pip_args: Sequence[str] = (),
    ) -> TorchInstall:
        """The module's install (not started): light-the-torch into its private folder where it is not
        there yet (`pip_args` added to that pip's command line), then its command run by `python` (Slicer's
        PythonSlicer); torch is then looked for along `search_path`. Raises RuntimeError (one line) for a
        damaged private folder."""
        tools = tools_folder(cache_dir)
        first = tools_install(python, tools, pip_args=pip_args, env=env)
        command = light_the_torch_command(python, tools, torch_requirement)
        return cls([command], search_path=search_path, env=env, tools=first)

    @property
    def pid(self) -> int | None:
        if self._children:
            return self._children[-1].pid
        return self.tools.pid if self.tools is not None else None

    @property
    def output(self) -> str:
        """The last lines the steps printed (for an error dialog's details)."""
        lines = [self.tools.output] if self.tools is not None and self.tools.output else []
        return "\n".join(lines + [line for child in self._children for line in child.lines])

    def start(self) -> None:
        """Start the first step (returns at once). Raises OSError when it cannot be started."""
        if self._children or self._result is not None:
            raise RuntimeError("this install has already been started")
        try:
            if self.tools is not None:
                self.tools.start()
            else:
                self._start_next()
        except OSError as error:
            self._fail(str(error))
            raise

    def poll(self) -> InstallProgress:
        """Read what the running step printed, start the next one when it has succeeded, and check torch
        once the last one has. Never waits for a step."""
        if self._result is not None:
            return self._result
        if not self._children:
            return self._poll_tools()
        child = self._children[-1]
        code = child.poll()
        if code is None:
            return InstallProgress(self._latest_line())
        child.close()
        if code != 0:
            return self._fail(pip_error(child.lines, code))
        if len(self._children) < len(self.commands):
            return self._start_or_fail()
        search_path = sys.path if self.search_path is None else self.search_path
        version, problem = check_torch(search_path, self.platform)
        if problem:
            return self._fail(f"light-the-torch ended, but PyTorch is not usable: {problem}")
        return self._end(InstallProgress(f"PyTorch {version} is installed.", finished=True, succeeded=True))

    def cancel(self) -> InstallProgress:
        """Kill the running step and every process it started. Blocks only until they are gone. What pip
        had already put in site-packages is pip's; the next check reports a half-installed torch (a
        cancelled install of light-the-torch leaves nothing)."""
        if self._result is not None:
            return self._result
        if self._children:
            self._children[-1].kill()
            self._children[-1].close()
        elif self.tools is not None:
            self.tools.cancel()
        return self._end(InstallProgress("Installation cancelled.", finished=True, cancelled=True))

    def _poll_tools(self) -> InstallProgress:
        if self.tools is None:
            return InstallProgress("")
        progress = self.tools.poll()
        if not progress.finished:
            return InstallProgress(progress.line or "Installing light-the-torch…")
        if not progress.succeeded:
            error = f"light-the-torch could not be installed: {progress.error or 'cancelled'}"
            return self._end(InstallProgress(progress.line, finished=True, error=error))
        if not tools_ready(self.tools.target):  # a complete-looking folder left by something else
            error = f"{self.tools.target} does not hold {' and '.join(TOOLS)}; delete it and try again"
            return self._end(InstallProgress(progress.line, finished=True, error=error))
        return self._start_or_fail()

    def _start_or_fail(self) -> InstallProgress:
        try:
            self._start_next()
        except OSError as error:
            return self._fail(str(error))
        return InstallProgress(self._latest_line())

    def _start_next(self) -> None:
        child = PolledProcess(self.commands[len(self._children)], self.env)
        self._children.append(child)
        child.start()

    def _latest_line(self) -> str:
        if not self._children:
            return "Installing light-the-torch…"
        return self._children[-1].latest_line("Starting light-the-torch…")

    def _fail(self, error: str) -> InstallProgress:
        return self._end(InstallProgress(self._latest_line(), finished=True, error=error))

    def _end(self, result: InstallProgress) -> InstallProgress:
        self._result = result
        return result


__all__ = [
    "TOOLS",
    "TorchInstall",
    "light_the_torch_args",
    "light_the_torch_command",
    "tools_folder",
    "tools_install",
    "tools_ready",
]
