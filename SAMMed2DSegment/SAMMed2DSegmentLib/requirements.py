"""What the engine process needs before it can run, checked from Slicer's own process (standard library only).

Slicer's process must never import torch (DESIGN 2.5), so nothing here imports what it checks: versions come
from distribution metadata (`importlib.metadata`) and presence from the path finder, which locates a package
without running it.

Packages the engine needs beyond Slicer's bundle are pinned (`Resources/requirements.txt`) to the versions the
project tests with, which are Slicer 5.12.3's. A pin counts as met only by the first distribution of that name
along the engine's `sys.path` (the private package folder first, then Slicer's own folders), and only at the
pinned version: Slicer 5.10's pydicom 2.4.4 does not meet `pydicom==3.0.2`, so pydicom 3.0.2 goes to the
private folder, which only the engine puts on its path; Slicer's own copy is neither replaced nor shadowed in
Slicer's process. The private folder's name records what it was made for, so Slicer versions that need
different packages (5.10 and 5.12 share the per-user cache and Python 3.12) never share one.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata as metadata
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .weights.cache_dir import default_cache_dir

#: Oldest torch the engine runs on: the encoder passes `scale=` to `scaled_dot_product_attention` and the
#: checkpoint loader `mmap=` to `torch.load`, both new in torch 2.1.
MINIMUM_TORCH = "2.1"

#: Written into a private package folder as the last step of an install: a folder without it is not used.
COMPLETE_MARKER = "sammed2d-packages.json"

#: What a model download needs in the engine process beyond the standard library. The engine's start
#: (service/server.py, service/protocol.py) and its download path (server.op_download ->
#: weights/registry.fetch_model, which imports engine/intensity.py) import numpy and nothing else outside the
#: standard library; no torch, nothing of requirements.txt. Slicer bundles numpy (2.0.2 in 5.10, 2.4.6 in
#: 5.12.3). Testing/test_requirements.py runs that path with torch and the pinned packages made unimportable.
DOWNLOAD_NEEDS = ("numpy",)


@dataclass(frozen=True)
class BrokenTorch:
    """A torch release known not to work in Slicer, on the platforms named (`sys.platform` values)."""

    release: str  # "2.13.*" (a whole release series) or an exact version such as "2.13.0"
    platforms: tuple[str, ...]
    reason: str


#: Known-broken torch releases: excluded from what light-the-torch may install (torch_install.py) and
#: reported as "reinstall" when found.
#: - torch 2.13 on Windows (https://github.com/Slicer/light-the-torch/issues/176, open; reproduced on a fresh
#:   Slicer 5.12.2 by a Slicer maintainer): 2.13 ships its licence files under deeply nested
#:   `torch-*.dist-info/licenses/third_party/...` paths (PEP 639 `license-files`), pip fails part-way
#:   writing them beyond Windows' 260-character MAX_PATH, and the half-written torch no longer imports. The
#:   reported workaround is a torch below 2.13. Linux and macOS have no such path limit, and the project's
#:   CI runs torch 2.13.0 on Linux, so the exclusion is Windows-only.
KNOWN_BROKEN_TORCH: tuple[BrokenTorch, ...] = (
    BrokenTorch(
        "2.13.*",
        ("win32",),
        "its install breaks on Windows (paths too long); see github.com/Slicer/light-the-torch/issues/176",
    ),
)


@dataclass(frozen=True)
class Requirement:
    """One line of requirements.txt: `name==version`, `name>=version` or a bare `name`."""

    name: str
    operator: str  # "==", ">=" or "" (any version)
    version: str
    line: str


@dataclass(frozen=True)
class RequirementsState:
    """Whether the engine can start, and what is missing. `torch_problem` is "" when torch is fine;
    `missing` holds the requirement lines to install into `package_folder`; `package_dirs` is what the
    engine should put on its path (the package folder once it is complete)."""

    torch_version: str
    torch_problem: str
    missing: tuple[str, ...]
    package_folder: str
    package_dirs: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return not self.torch_problem and not self.missing

    @property
    def message(self) -> str:
        """One line for the panel."""
        if self.ready:
            return f"Ready: PyTorch {self.torch_version}." if self.torch_version else "Ready."
        parts = [self.torch_problem] if self.torch_problem else []
        if self.missing:
            parts.append("Python packages needed by the engine: " + ", ".join(self.missing))
        return "; ".join(parts)


# -- versions ---------------------------------------------------------------------------------------------

_VERSION = re.compile(r"\s*v?(\d+(?:\.\d+)*)([^+]*)(?:\+.*)?\s*$", re.IGNORECASE)


def release(version: str) -> tuple[tuple[int, ...], str]:
    """'2.13.0+cu130' -> ((2, 13, 0), ''); '3.0.2rc1' -> ((3, 0, 2), 'rc1'). Trailing zeros are dropped
    (PEP 440: 2.1 == 2.1.0) and the local label (+cu130) is ignored; the rest is a pre/post/dev suffix."""
    match = _VERSION.match(version or "")
    if match is None:
        return (), (version or "").strip().lower()
    numbers = [int(part) for part in match.group(1).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers), match.group(2).strip(".-_").lower()


def version_at_least(version: str, minimum: str) -> bool:
    """PEP 440 `>=` for plain release versions: a pre-release or dev release of `minimum` is below it."""
    (have, suffix), (need, _) = release(version), release(minimum)
    if not have or have != need:
        return bool(have) and have > need
    return not suffix or suffix.startswith("post")


def version_matches(version: str, pattern: str) -> bool:
    """`version == pattern` in PEP 440's sense for "X.Y.*" (a release series) and exact versions."""
    if pattern.endswith(".*"):
        prefix = tuple(int(part) for part in pattern[:-2].split("."))
        numbers = release(version)[0]
        return (numbers + (0,) * len(prefix))[: len(prefix)] == prefix
    return release(version) == release(pattern)


# -- requirements.txt -------------------------------------------------------------------------------------

_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:(==|>=)\s*([0-9][A-Za-z0-9.+!_-]*))?$")


def read_requirements(path: str | Path) -> list[Requirement]:
    """Requirement lines of a requirements.txt file (comments and blank lines left out). Only what the
    checker understands is accepted (`==`, `>=`, bare names): anything else raises ValueError rather than
    being checked wrongly."""
    requirements = []
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _REQUIREMENT.match(line)
        if match is None:
            raise ValueError(f"{Path(path).name}:{number}: unsupported requirement {line!r}")
        name, operator, version = match.group(1), match.group(2) or "", match.group(3) or ""
        requirements.append(Requirement(name, operator, version, line))
    return requirements


def requirement_met(requirement: Requirement, version: str | None) -> bool:
    if not version:
        return False
    if requirement.operator == "==":
        return version_matches(version, requirement.version)
    if requirement.operator == ">=":
        return version_at_least(version, requirement.version)
    return True


def installed_version(name: str, search_path: Sequence[str]) -> str | None:
    """Version of the first distribution called `name` along `search_path` (the one an import would find
    first), or None when there is none or its metadata has no version."""
    for distribution in metadata.distributions(name=name, path=list(search_path)):
        try:
            return distribution.version or None
        except (OSError, TypeError, ValueError):  # a metadata folder without readable METADATA
            return None
    return None


def unmet(requirements: Iterable[Requirement], search_path: Sequence[str]) -> tuple[str, ...]:
    """The requirement lines that the first distribution along `search_path` does not meet."""
    return tuple(
        r.line for r in requirements if not requirement_met(r, installed_version(r.name, search_path))
    )


# -- the private package folder ---------------------------------------------------------------------------


def package_folder(
    requirements_path: str | Path,
    cache_dir: str | Path | None = None,
    search_path: Sequence[str] | None = None,
) -> Path:
    """The private package folder for these requirements, this Python and what this Slicer lacks:
    `<cache>/packages/py312-<digest>`. The digest covers the requirements file and the lines that Slicer's
    own packages (`search_path`, default `sys.path`) do not meet, so a Slicer that bundles other versions
    gets its own folder instead of finding a folder made for another."""
    path = list(sys.path if search_path is None else search_path)
    lacking = unmet(read_requirements(requirements_path), path)
    digest = hashlib.sha256(Path(requirements_path).read_bytes())
    digest.update("\0".join(lacking).encode("utf-8"))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "packages"
    return root / f"py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:12]}"


def folder_complete(folder: str | Path) -> bool:
    """Whether an install finished there (the marker is the last thing an install writes)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def write_marker(folder: str | Path, packages: Sequence[str]) -> None:
    """Mark `folder` as a complete install of `packages` (called on the staging folder before it moves)."""
    record = {"packages": list(packages), "python": sys.version.split()[0]}
    (Path(folder) / COMPLETE_MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


# -- torch ------------------------------------------------------------------------------------------------


def torch_requirement(platform: str = sys.platform) -> str:
    """The version range appended to "torch" on light-the-torch's command line (torch_install.py, as the
    PyTorch extension's `installTorch(torchVersionRequirement=...)` does): ">=2.1,!=2.13.*" on Windows."""
    excluded = [f",!={b.release}" for b in KNOWN_BROKEN_TORCH if platform in b.platforms]
    return f">={MINIMUM_TORCH}" + "".join(excluded)


def torch_problem(
    version: str | None, package_found: bool, platform: str = sys.platform, leftovers: bool = False
) -> str:
    """ "" when this torch can run the engine, otherwise one line saying what to do. `version` is None when
    no metadata gives one; `leftovers`: something called torch is there all the same (a metadata folder
    without a version, or a namespace folder left behind by a failed install)."""
    if version is None and not package_found and not leftovers:
        return "PyTorch is not installed; light-the-torch installs a build that suits this computer."
    if version is None:
        return "PyTorch is installed incompletely (no package metadata); reinstall it."
    if not package_found:
        return f"PyTorch {version} is installed incompletely (its package folder is missing); reinstall it."
    if not version_at_least(version, MINIMUM_TORCH):
        return f"PyTorch {version} is older than {MINIMUM_TORCH}, which the engine needs; reinstall it."
    for broken in KNOWN_BROKEN_TORCH:
        if platform in broken.platforms and version_matches(version, broken.release):
            return f"PyTorch {version} is known not to work here: {broken.reason}. Reinstall it."
    return ""


def torch_files(search_path: Sequence[str]) -> tuple[bool, bool]:
    """(a regular `torch` package is on the path, something else called torch is: a namespace folder or a
    metadata folder). Found by the path finder and the metadata index; nothing is imported."""
    spec = importlib.machinery.PathFinder.find_spec("torch", list(search_path))
    package = spec is not None and spec.loader is not None and spec.origin is not None
    metadata_folder = next(iter(metadata.distributions(name="torch", path=list(search_path))), None)
    return package, (spec is not None and not package) or metadata_folder is not None


def check_torch(search_path: Sequence[str], platform: str = sys.platform) -> tuple[str, str]:
    """(torch's version or "", its problem or "") for the torch found first along `search_path`, from the
    metadata and the path finder only: Slicer's process must never import torch, not even to check an install
    that has just ended (whose files the finders' caches may not know yet)."""
    importlib.invalidate_caches()
    version = installed_version("torch", search_path)
    package, leftovers = torch_files(search_path)
    return version or "", torch_problem(version, package, platform, leftovers)


# -- the checks -------------------------------------------------------------------------------------------


def check_requirements(
    requirements_path: str | Path,
    package_folder: str | Path,
    search_path: Sequence[str] | None = None,
    platform: str = sys.platform,
) -> RequirementsState:
    """What the engine still needs: torch (found in Slicer's folders, checked against the minimum and the
    known-broken releases) and the pinned packages (found first in the package folder, if complete, then in
    Slicer's folders: the engine's own search order)."""
    base = list(sys.path if search_path is None else search_path)
    folder = str(package_folder)
    dirs = (folder,) if folder_complete(folder) else ()
    engine_path = [*dirs, *base]
    version, problem = check_torch(engine_path, platform)
    missing = unmet(read_requirements(requirements_path), engine_path)
    return RequirementsState(version, problem, missing, folder, dirs)


def check_download_requirements(search_path: Sequence[str] | None = None) -> RequirementsState:
    """What downloading a model in the engine needs: numpy only (Slicer bundles it), never torch."""
    base = list(sys.path if search_path is None else search_path)
    missing = tuple(name for name in DOWNLOAD_NEEDS if installed_version(name, base) is None)
    return RequirementsState("", "", missing, "", ())


__all__ = [
    "COMPLETE_MARKER",
    "DOWNLOAD_NEEDS",
    "KNOWN_BROKEN_TORCH",
    "MINIMUM_TORCH",
    "BrokenTorch",
    "Requirement",
    "RequirementsState",
    "check_download_requirements",
    "check_requirements",
    "check_torch",
    "folder_complete",
    "installed_version",
    "package_folder",
    "read_requirements",
    "release",
    "requirement_met",
    "torch_files",
    "torch_problem",
    "torch_requirement",
    "unmet",
    "version_at_least",
    "version_matches",
    "write_marker",
]
