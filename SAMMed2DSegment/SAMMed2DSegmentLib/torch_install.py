"""Installs PyTorch as the PyTorch extension does, but in child processes that the caller polls (standard
library, no Qt, no torch): Slicer's GUI keeps running, Cancel works, and torch is never imported into
Slicer's process (the engine process is the one that imports it).

The PyTorch extension (fepegar/SlicerPyTorch, PyTorchUtils/PyTorchUtils.py at e1c85cc) installs torch with
`installTorch` (:194-227): `pip install light-the-torch>=0.5` (:247, through slicer.util.pip_install) where
`import light_the_torch._patch` fails (:218-222), then `python -m light_the_torch install torch<range>
torchvision` (:224, the arguments built at :234-243), waiting for both in Slicer's main thread, and then
`import torch` in Slicer's process (:225). The same two commands run here, one after the other. Whether
light-the-torch is there, and afterwards whether torch is, is read from package metadata
(requirements.check_torch) instead of an import. torch goes where light-the-torch (pip) puts it, Slicer's
own site-packages, as with the extension: the documented place for torch in Slicer, shared with other
extensions.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from .installer import InstallProgress
from .polled_process import PolledProcess, pip_error
from .requirements import check_torch, installed_version, version_at_least

#: The light-the-torch the extension installs when it has none (PyTorchUtils.py:247).
LIGHT_THE_TORCH = "light-the-torch>=0.5"
_LIGHT_THE_TORCH_MINIMUM = "0.5"


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


def light_the_torch_installed(search_path: Sequence[str] | None = None) -> bool:
    """Whether light-the-torch (at least the version the extension asks for) is there, from its metadata."""
    version = installed_version("light-the-torch", list(sys.path if search_path is None else search_path))
    return version is not None and version_at_least(version, _LIGHT_THE_TORCH_MINIMUM)


def torch_install_commands(
    python: str,
    torch_requirement: str,
    backend: str | None = None,
    search_path: Sequence[str] | None = None,
) -> list[list[str]]:
    """The commands the extension would run in `python` (Slicer's PythonSlicer), the pip step only where
    light-the-torch is missing."""
    commands = []
    if not light_the_torch_installed(search_path):
        commands.append([python, "-m", "pip", "install", LIGHT_THE_TORCH])
    commands.append([python, "-m", "light_the_torch", *light_the_torch_args(torch_requirement, backend)])
    return commands


class TorchInstall:
    """`commands` run one after the other, each in a child process group of its own; the install succeeded
    when all of them did and torch is then found, usable, along `search_path` (default: `sys.path` at
    that moment)."""

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        search_path: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        platform: str = sys.platform,
    ) -> None:
        if not commands:
            raise ValueError("nothing to run")
        self.commands = [list(command) for command in commands]
        self.search_path = None if search_path is None else list(search_path)
        self.env = env
        self.platform = platform
        self._children: list[PolledProcess] = []
        self._result: InstallProgress | None = None

    @property
    def pid(self) -> int | None:
        return self._children[-1].pid if self._children else None

    @property
    def output(self) -> str:
        """The last lines the commands printed (for an error dialog's details)."""
        return "\n".join(line for child in self._children for line in child.lines)

    def start(self) -> None:
        """Start the first command (returns at once). Raises OSError when it cannot be started."""
        if self._children or self._result is not None:
            raise RuntimeError("this install has already been started")
        try:
            self._start_next()
        except OSError as error:
            self._fail(str(error))
            raise

    def poll(self) -> InstallProgress:
        """Read what the running command printed, start the next one when it has succeeded, and check torch
        once the last one has. Never waits for a command."""
        if self._result is not None:
            return self._result
        if not self._children:
            return InstallProgress("")
        child = self._children[-1]
        code = child.poll()
        if code is None:
            return InstallProgress(self._latest_line())
        child.close()
        if code != 0:
            return self._fail(pip_error(child.lines, code))
        if len(self._children) < len(self.commands):
            try:
                self._start_next()
            except OSError as error:
                return self._fail(str(error))
            return InstallProgress(self._latest_line())
        search_path = sys.path if self.search_path is None else self.search_path
        version, problem = check_torch(search_path, self.platform)
        if problem:
            return self._fail(f"light-the-torch ended, but PyTorch is not usable: {problem}")
        return self._end(InstallProgress(f"PyTorch {version} is installed.", finished=True, succeeded=True))

    def cancel(self) -> InstallProgress:
        """Kill the running command and every process it started. Blocks only until they are gone. What pip
        had already put in site-packages is pip's; the next check reports a half-installed torch."""
        if self._result is not None:
            return self._result
        if self._children:
            self._children[-1].kill()
            self._children[-1].close()
        return self._end(InstallProgress("Installation cancelled.", finished=True, cancelled=True))

    def _start_next(self) -> None:
        child = PolledProcess(self.commands[len(self._children)], self.env)
        self._children.append(child)
        child.start()

    def _latest_line(self) -> str:
        pip_step = self.commands[len(self._children) - 1][1:3] == ["-m", "pip"]
        starting = "Installing light-the-torch…" if pip_step else "Starting light-the-torch…"
        return self._children[-1].latest_line(starting)

    def _fail(self, error: str) -> InstallProgress:
        return self._end(InstallProgress(self._latest_line(), finished=True, error=error))

    def _end(self, result: InstallProgress) -> InstallProgress:
        self._result = result
        return result


__all__ = [
    "LIGHT_THE_TORCH",
    "TorchInstall",
    "light_the_torch_args",
    "light_the_torch_installed",
    "torch_install_commands",
]
