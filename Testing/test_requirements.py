"""The requirements checker (SAMMed2DSegmentLib.requirements): torch's version, the pinned engine packages
against what Slicer 5.10 and 5.12.3 bundle, the private package folder, and what a model download needs.

Slicer's bundles are rebuilt here as fake site-packages folders (a dist-info folder per package); a fake
`torch/__init__.py` raises when run, so any test that imported it would fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pip._vendor.packaging.requirements import Requirement as PipRequirement
from pip._vendor.packaging.specifiers import SpecifierSet
from pip._vendor.packaging.version import Version

from SAMMed2DSegmentLib import requirements as req

ROOT = Path(__file__).resolve().parents[1]
LIB_PARENT = ROOT / "SAMMed2DSegment"
REQUIREMENTS = LIB_PARENT / "Resources" / "requirements.txt"

#: What Slicer bundles (Slicer/Slicer SuperBuild/External_python-*.cmake). v5.10.0: dicom-requirements:44
#: pydicom 2.4.4, :61 pillow 11.2.1, numpy:43 numpy 2.0.2, extension-manager-ssl-requirements:153
#: typing_extensions 4.14.0, no highdicom, no pyjpegls. v5.12.3: dicom-requirements:45 pydicom 3.0.2,
#: :62 pillow 12.2.0, :94 highdicom 0.27.0, :106 pyjpegls 1.5.1, :117 typing_extensions 4.15.0, numpy:44
#: numpy 2.4.6, scipy:44 scipy 1.17.1, SimpleITK:35 simpleitk 2.5.5.
SLICER_5_10_0 = {"numpy": "2.0.2", "pillow": "11.2.1", "pydicom": "2.4.4", "typing_extensions": "4.14.0"}
SLICER_5_12_3 = {"numpy": "2.4.6", "pillow": "12.2.0", "pydicom": "3.0.2", "highdicom": "0.27.0",
                 "pyjpegls": "1.5.1", "typing_extensions": "4.15.0", "scipy": "1.17.1",
                 "simpleitk": "2.5.5"}  # fmt: skip
PINS = ("safetensors==0.8.0", "highdicom==0.27.0", "pydicom==3.0.2", "pyjpegls==1.5.1",
        "typing-extensions==4.15.0")  # fmt: skip


def fake_distribution(site: Path, name: str, version: str | None, module: str | None = "") -> None:
    """A dist-info folder (version None: without METADATA) and, unless module is None, a package that raises
    when imported."""
    info = site / f"{name.replace('-', '_')}-{version or '0'}.dist-info"
    info.mkdir(parents=True)
    if version is not None:
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if module is not None:
        package = site / (module or name.replace("-", "_"))
        package.mkdir(exist_ok=True)
        (package / "__init__.py").write_text("raise RuntimeError('the checker must not import packages')\n")


def fake_site(folder: Path, bundle: dict[str, str], torch: str | None = "2.12.1+cu130") -> list[str]:
    for name, version in bundle.items():
        fake_distribution(folder, name, version)
    if torch:
        fake_distribution(folder, "torch", torch)
    return [str(folder)]


# -- requirements.txt --------------------------------------------------------------------------------------


def test_requirements_are_the_tested_pins():
    """Pinned (R2): a newer highdicom/pydicom under `--no-deps` could need what Slicer 5.10 lacks. The pins
    are Slicer 5.12.3's versions, and constraints-ci.txt's where it names the package, so CI tests them."""
    lines = tuple(r.line for r in req.read_requirements(REQUIREMENTS))
    assert lines == PINS
    constraints = dict(
        line.split("==") for line in (ROOT / "constraints-ci.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    for requirement in req.read_requirements(REQUIREMENTS):
        assert requirement.operator == "=="
        bundled = SLICER_5_12_3.get(requirement.name.replace("-", "_"))
        assert bundled in (None, requirement.version), f"{requirement.line}: Slicer 5.12.3 has {bundled}"
        assert constraints.get(requirement.name, requirement.version) == requirement.version


def test_ci_runs_what_slicer_5_12_3_bundles():
    """CI tests the engine with Slicer 5.12.3's versions of every package both name."""
    pins = {line.split("==")[0].lower().replace("-", "_"): line.split("==")[1]
            for line in (ROOT / "constraints-ci.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}  # fmt: skip
    shared = sorted(set(pins) & set(SLICER_5_12_3))
    assert {"numpy", "pydicom", "highdicom", "pyjpegls", "simpleitk"} <= set(shared)
    assert [name for name in shared if pins[name] != SLICER_5_12_3[name]] == []


@pytest.mark.parametrize("line", ["foo~=1.0", "bar[extra]==1.0", "baz==1.0; sys_platform == 'win32'", "-r x"])
def test_unsupported_requirement_lines_are_refused(tmp_path, line):
    path = tmp_path / "requirements.txt"
    path.write_text(f"# comment\nsafetensors==0.8.0\n{line}\n")
    with pytest.raises(ValueError, match=":3: unsupported"):
        req.read_requirements(path)


VERSIONS = ["2.0.1", "2.1", "2.1.0", "2.1.0rc1", "2.1.0.post1", "2.12.1+cu130", "2.13.0", "2.13.0+cu130",
            "2.13.0rc2", "2.13.1", "2.14.0.dev20260801", "2.14.0", "3.0.2", "3.0.2rc1", "4.15.0"]  # fmt: skip


@pytest.mark.parametrize("spec", ["==3.0.2", "==4.15", ">=2.1", "==2.13.*", ">=2.13.0"])
def test_version_checks_agree_with_pep_440(spec):
    """The checker's small version logic gives pip's answer on the versions that occur."""
    operator, version = spec[:2], spec[2:]
    for candidate in VERSIONS:
        ours = req.requirement_met(req.Requirement("x", operator, version, ""), candidate)
        if operator == "==" and version.endswith(".*"):
            ours = req.version_matches(candidate, version)
        assert ours == SpecifierSet(spec).contains(Version(candidate), prereleases=True), (spec, candidate)


# -- the pinned packages on each Slicer -------------------------------------------------------------------


def test_on_slicer_5_12_3_only_safetensors_is_needed(tmp_path):
    site = fake_site(tmp_path / "site", SLICER_5_12_3)
    folder = req.package_folder(REQUIREMENTS, tmp_path / "packages", site)
    state = req.check_requirements(REQUIREMENTS, folder, site, platform="linux")
    assert state.missing == ("safetensors==0.8.0",)
    assert (state.torch_version, state.torch_problem, state.ready) == ("2.12.1+cu130", "", False)
    assert state.package_dirs == ()
    assert "safetensors==0.8.0" in state.message and "\n" not in state.message


def test_on_slicer_5_10_the_dicom_packages_go_to_the_private_folder(tmp_path):
    """5.10 bundles pydicom 2.4.4 and typing_extensions 4.14.0 (other versions than pinned) and no highdicom:
    all pins are installed into the private folder, which then comes first on the engine's path."""
    site = fake_site(tmp_path / "site", SLICER_5_10_0)
    folder = req.package_folder(REQUIREMENTS, tmp_path / "packages", site)
    assert req.check_requirements(REQUIREMENTS, folder, site).missing == PINS
    for line in PINS:
        name, version = line.split("==")
        fake_distribution(folder, name, version)
    state = req.check_requirements(REQUIREMENTS, folder, site)
    assert state.missing == PINS, "a folder without the completion marker must not count"
    req.write_marker(folder, PINS)
    state = req.check_requirements(REQUIREMENTS, folder, site, platform="linux")
    assert state.ready and state.missing == () and state.package_dirs == (str(folder),)
    assert state.message == "Ready: PyTorch 2.12.1+cu130."


def test_package_folder_is_stable_and_separate_per_slicer_bundle(tmp_path):
    site_10 = fake_site(tmp_path / "s10", SLICER_5_10_0)
    site_12 = fake_site(tmp_path / "s12", SLICER_5_12_3)
    first = req.package_folder(REQUIREMENTS, tmp_path, site_12)
    assert first == req.package_folder(REQUIREMENTS, tmp_path, site_12)
    assert first != req.package_folder(REQUIREMENTS, tmp_path, site_10)
    assert re.fullmatch(rf"py{sys.version_info[0]}{sys.version_info[1]}-[0-9a-f]{{12}}", first.name)
    changed = tmp_path / "requirements.txt"
    changed.write_text(REQUIREMENTS.read_text() + "numpy==2.4.6\n")
    assert req.package_folder(changed, tmp_path, site_12) != first


def test_package_folder_defaults_to_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMMED2D_CACHE_DIR", str(tmp_path))
    assert req.package_folder(REQUIREMENTS, search_path=[]).parent == tmp_path / "packages"


# -- torch -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "platform", "problem"),
    [
        ({}, "linux", "not installed"),
        ({"torch": ("2.12.1+cu130", "")}, "win32", ""),
        ({"torch": ("2.13.0+cu130", "")}, "linux", ""),
        ({"torch": ("2.13.0+cu130", "")}, "win32", "known not to work"),
        ({"torch": ("2.13.1", "")}, "win32", "known not to work"),
        ({"torch": ("2.14.0", "")}, "win32", ""),
        ({"torch": ("2.0.1", "")}, "linux", "older than 2.1"),
        ({"torch": ("2.1.0rc1", "")}, "linux", "older than 2.1"),
        ({"torch": (None, "")}, "linux", "no package metadata"),
        ({"torch": ("2.12.1", None)}, "linux", "package folder is missing"),
        ({"namespace": True}, "linux", "no package metadata"),
        ({"namespace": True, "torch": (None, None)}, "linux", "no package metadata"),
    ],
)
def test_torch_is_checked_by_version_without_importing_it(tmp_path, layout, platform, problem):
    if "torch" in layout:
        version, module = layout["torch"]
        fake_distribution(tmp_path, "torch", version, module)
    if layout.get("namespace"):  # a torch/ folder without __init__.py, left behind by a failed install
        (tmp_path / "torch" / "lib").mkdir(parents=True, exist_ok=True)
    state = req.check_requirements(REQUIREMENTS, tmp_path / "none", [str(tmp_path)], platform=platform)
    assert (problem in state.torch_problem) if problem else state.torch_problem == ""
    assert "\n" not in state.torch_problem
    if problem:
        assert state.torch_problem in state.message and not state.ready


@pytest.mark.parametrize("platform", ["win32", "linux", "darwin"])
def test_torch_requirement_is_what_the_pytorch_extension_can_use(platform):
    """PyTorchUtilsLogic._getPipInstallArguments appends the requirement to "torch" and hands it to
    light-the-torch (pip's parser): it must be a valid specifier that admits exactly what the check admits."""
    text = req.torch_requirement(platform)
    parsed = PipRequirement("torch" + text)
    assert parsed.name == "torch" and not parsed.marker
    for version in VERSIONS:
        admitted = parsed.specifier.contains(Version(version), prereleases=True)
        assert admitted == (req.torch_problem(version, True, platform) == ""), (platform, version)
    assert ("!=2.13.*" in text) == (platform == "win32")


# -- a model download -------------------------------------------------------------------------------------


def test_download_needs_nothing_but_what_slicer_bundles(tmp_path):
    assert req.check_download_requirements(fake_site(tmp_path, {"numpy": "2.0.2"}, torch=None)).ready
    empty = req.check_download_requirements([str(tmp_path / "empty")])
    assert empty.missing == ("numpy",) and not empty.ready and "numpy" in empty.message


BLOCKER = """
import importlib.abc
import sys

BLOCKED = {"torch", "safetensors", "pydicom", "highdicom", "pyjpegls", "SimpleITK", "scipy", "slicer", "vtk"}


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} imported on the download path")
        return None


sys.meta_path.insert(0, _Blocked())
"""

DOWNLOAD = """
import http.server, sys, threading
from pathlib import Path
from SAMMed2DSegmentLib.service.client import EngineClient
from SAMMed2DSegmentLib.weights import registry

cache = Path(sys.argv[1])
payload = bytes(range(256)) * 64

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
entry = registry.ModelEntry("tiny", "small", "tiny.bin", "", (f"http://127.0.0.1:{server.server_address[1]}/x",),
                            size=len(payload))
assert registry.fetch_model(entry, cache_dir=cache).read_bytes() == payload

# The engine process, started as the module starts it, answers a download request (of a file its cache
# already holds, so no network is needed); it runs with the same blocker (sitecustomize on PYTHONPATH).
target = registry.model_path(registry.REGISTRY["sam-med2d_b"], cache)
target.parent.mkdir(parents=True, exist_ok=True)
target.write_bytes(b"already downloaded")
events = []
client = EngineClient(extra_env={"SAMMED2D_CACHE_DIR": str(cache)})
try:
    job = client.submit("download", {"model": "sam-med2d_b"}, on_event=lambda k, h, a: events.append((k, h)))
    client.wait(job, timeout=120)
finally:
    client.close()
assert events[-1][0] == "done", events
assert Path(events[-1][1]["path"]) == target
print("ok", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""


def test_download_path_runs_without_torch_or_the_engine_packages(tmp_path):
    """R6: a model download must not demand PyTorch nor requirements.txt. Runs registry.fetch_model and the
    engine's start and `download` request with torch and every pinned package made unimportable."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "block"), str(LIB_PARENT)]),
           "SAMMED2D_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", DOWNLOAD, str(tmp_path / "cache")], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok []"


def test_checker_and_installers_import_only_the_standard_library():
    """They run in Slicer's process before anything is installed; isolated mode and no site-packages make any
    other import fail, and the modules loaded are compared with the standard library's list."""
    code = (
        f"import sys; sys.path.insert(0, {str(LIB_PARENT)!r}); before = set(sys.modules)\n"
        "import SAMMed2DSegmentLib.requirements, SAMMed2DSegmentLib.installer\n"
        "import SAMMed2DSegmentLib.torch_install\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new - set(sys.stdlib_module_names) - {'SAMMed2DSegmentLib'}))\n"
    )
    command = [sys.executable, "-I", "-S", "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
