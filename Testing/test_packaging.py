"""Static checks of the extension's packaging; no Slicer needed (stdlib + pytest only).

What the Extensions Manager installs is decided by CMake lists, what the Widget can reach is decided by the
.ui file, and what the Extensions Index accepts is decided by the extension metadata. None of these are
exercised by the pure-Python tests, so they are checked here.
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_NAME = "SAMMed2DSegment"
MODULE_DIR = ROOT / MODULE_NAME
LIB_DIR = MODULE_DIR / f"{MODULE_NAME}Lib"
MODULE_SCRIPT = MODULE_DIR / f"{MODULE_NAME}.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"
S4EXT = ROOT / "SAMMed2D.s4ext"
CATALOG_ENTRY = ROOT / "SAMMed2D.json"
ICONS = [
    ROOT / "Resources" / "Icons" / "SAMMed2D.png",
    MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png",
]


# ----------------------------------------------------------------------------------------------------
# Helpers


def _strip_cmake_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def cmake_set(text: str, variable: str) -> list[str]:
    """Items of `set(VARIABLE item item ...)` in a CMakeLists text (comments removed, quotes kept off)."""
    match = re.search(rf"\bset\(\s*{re.escape(variable)}\b(.*?)\)", _strip_cmake_comments(text), re.S)
    if match is None:
        raise AssertionError(f"set({variable} ...) not found")
    return [item.strip('"') for item in match.group(1).split()]


def module_cmake_lists() -> tuple[str, list[str], list[str]]:
    """(module name, scripts, resources) of the module's CMakeLists.txt, ${MODULE_NAME} expanded."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    (name,) = cmake_set(text, "MODULE_NAME")

    def expand(items: list[str]) -> list[str]:
        return [item.replace("${MODULE_NAME}", name) for item in items]

    return (
        name,
        expand(cmake_set(text, "MODULE_PYTHON_SCRIPTS")),
        expand(cmake_set(text, "MODULE_PYTHON_RESOURCES")),
    )


def lib_py_files_on_disk() -> list[str]:
    """Every .py file under SAMMed2DSegmentLib, relative to the module folder, in POSIX form."""
    return sorted(
        p.relative_to(MODULE_DIR).as_posix() for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts
    )


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def slicer_parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def module_ast() -> ast.Module:
    return ast.parse(MODULE_SCRIPT.read_text(encoding="utf-8"), filename=str(MODULE_SCRIPT))


def parameter_node_fields() -> dict[str, str]:
    """Field name -> annotation source of the @parameterNodeWrapper class in the module script."""
    source = MODULE_SCRIPT.read_text(encoding="utf-8")
    for node in module_ast().body:
        if isinstance(node, ast.ClassDef) and node.name == f"{MODULE_NAME}ParameterNode":
            return {
                item.target.id: ast.get_source_segment(source, item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise AssertionError(f"class {MODULE_NAME}ParameterNode not found")


def read_s4ext(path: Path) -> dict[str, str]:
    """`keyword value` lines; '#' starts a comment line; the value is the rest of the line."""
    fields: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, value = line.partition(" ")
        fields[keyword] = value.strip()
    return fields


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk; raises on a bad signature, truncation or a CRC mismatch."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG signature")
    chunks, pos = [], 8
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("truncated chunk header")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        if len(payload) != length:
            raise ValueError("truncated chunk")
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if crc != zlib.crc32(kind + payload) & 0xFFFFFFFF:
            raise ValueError(f"bad CRC in {kind!r} chunk")
        chunks.append((kind, payload))
        pos += 12 + length
    return chunks


# ----------------------------------------------------------------------------------------------------
# (a) CMake lists every Lib .py file, and everything listed exists


def test_module_cmake_lists_every_lib_python_file():
    name, scripts, _ = module_cmake_lists()
    assert name == MODULE_NAME
    assert f"{MODULE_NAME}.py" in scripts
    on_disk = set(lib_py_files_on_disk())
    assert on_disk, "no .py files found under SAMMed2DSegmentLib"
    listed = {s for s in scripts if s.startswith(f"{MODULE_NAME}Lib/")}
    assert sorted(on_disk - listed) == [], (
        "Lib files missing from MODULE_PYTHON_SCRIPTS (they would not be installed)"
    )
    assert sorted(listed - on_disk) == [], "MODULE_PYTHON_SCRIPTS lists Lib files that do not exist"
    assert len(scripts) == len(set(scripts)), "duplicate entries in MODULE_PYTHON_SCRIPTS"


def test_module_cmake_listed_files_exist():
    _, scripts, resources = module_cmake_lists()
    for required in (
        f"Resources/Icons/{MODULE_NAME}.png",
        f"Resources/UI/{MODULE_NAME}.ui",
        "Resources/requirements.txt",
    ):
        assert required in resources
    missing = [item for item in scripts + resources if not (MODULE_DIR / item).is_file()]
    assert missing == []


def test_module_cmake_builds_and_registers_tests():
    text = _strip_cmake_comments((MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8"))
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S)
    assert macro is not None
    args = macro.group(1).split()
    for keyword in ("NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS"):
        assert keyword in args
    assert re.search(
        r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", text, re.S
    )
    assert re.search(r"add_subdirectory\(\s*Testing\s*\)", text)
    assert re.search(
        r"add_subdirectory\(\s*Python\s*\)", (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text()
    )
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_licence_and_notice_are_installed_with_the_module_resources():
    """Apache-2.0 section 4 asks for the licence and the NOTICE to travel with the distributed module, and
    the module's acknowledgement refers to the NOTICE."""
    text = _strip_cmake_comments((MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8"))
    legal = cmake_set(text, "MODULE_LEGAL_FILES")
    assert sorted(legal) == ["LICENSE", "NOTICE"]
    for name in legal:
        assert (ROOT / name).is_file(), name
    loop = re.search(r"foreach\(\s*(\w+)\s+\$\{MODULE_LEGAL_FILES\}\s*\)(.*?)endforeach\(\)", text, re.S)
    assert loop is not None, "MODULE_LEGAL_FILES is not iterated"
    body = " ".join(loop.group(2).replace("${" + loop.group(1) + "}", "<file>").split())
    source = "${CMAKE_CURRENT_SOURCE_DIR}/../<file>"
    installed = "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources"  # where the module's resources go
    built = "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/Resources/<file>"
    assert f"install( FILES {source} DESTINATION {installed} COMPONENT RuntimeLibraries )" in body, body
    assert f"configure_file( {source} {built} COPYONLY )" in body, body


def test_requirements_do_not_pull_torch():
    """torch must come from light-the-torch (a build for the GPU driver), never from this pip install."""
    lines = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    names = [re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower() for line in lines]
    names = [n for n in names if n and not n.startswith("#")]
    assert "safetensors" in names
    assert "torch" not in names
    # The pins themselves, against what Slicer bundles, are checked in test_requirements.py.


# ----------------------------------------------------------------------------------------------------
# (b) The .ui holds every widget the module script uses, bound to real parameters


def test_every_ui_attribute_used_in_script_exists_in_ui_file():
    used = set(re.findall(r"\bself\.ui\.(\w+)", MODULE_SCRIPT.read_text(encoding="utf-8")))
    assert used, "the module script uses no self.ui.<widget>; the regular expression is probably wrong"
    assert sorted(used - set(ui_widgets())) == []


def test_ui_root_is_qmrmlwidget_named_after_module():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top is not None
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", MODULE_NAME)


def test_ui_parameter_names_match_parameter_node_fields():
    fields = parameter_node_fields()
    bound = {name: slicer_parameter_name(w) for name, w in ui_widgets().items() if slicer_parameter_name(w)}
    assert bound, "no widget carries a SlicerParameterName"
    assert sorted(set(bound.values()) - set(fields)) == []
    expected = {
        "inputVolumeSelector": "inputVolume",
        "roiSelector": "promptROI",
        "outputSegmentationSelector": "outputSegmentation",
        "axisComboBox": "axis",
    }
    for widget, parameter in expected.items():
        assert bound.get(widget) == parameter
    # A QComboBox can only be bound to a str parameter that carries a Choice annotation.
    widgets = ui_widgets()
    for widget, parameter in bound.items():
        if widgets[widget].get("class") == "QComboBox":
            assert "Choice(" in fields[parameter], f"{parameter} needs Annotated[str, Choice([...])]"


def test_markups_widgets_are_not_bound_by_connect_gui():
    """The parameter node wrapper has no GUI connector for qSlicerSimpleMarkupsWidget (connectGui fails)."""
    markups = [w for w in ui_widgets().values() if w.get("class") == "qSlicerSimpleMarkupsWidget"]
    assert {w.get("name") for w in markups} == {"includePointsWidget", "excludePointsWidget"}
    assert [w.get("name") for w in markups if slicer_parameter_name(w)] == []


def test_every_mrml_widget_receives_the_scene():
    root = ET.parse(UI_FILE).getroot()
    mrml_widgets = {
        w.get("name")
        for w in root.iter("widget")
        if w.get("class") in ("qMRMLNodeComboBox", "qSlicerSimpleMarkupsWidget")
    }
    connected = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == MODULE_NAME
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert len(mrml_widgets) == 5
    assert sorted(mrml_widgets - connected) == []


def ui_strings() -> list[str]:
    return [s.text or "" for s in ET.parse(UI_FILE).getroot().iter("string")]


def test_ui_names_the_toggle_shortcut_the_script_installs():
    """The panel must name the key sequence the module binds; a bare T toggles the slice view's layers."""
    bound = re.findall(r'QKeySequence\("([^"]+)"\)', MODULE_SCRIPT.read_text(encoding="utf-8"))
    assert bound == ["Shift+T"], bound
    texts = ui_strings()
    stale = [t for t in texts if re.search(r"Press T\b|\(T\)|shortcut: T\.", t)]
    assert stale == []
    assert sum("Shift+T" in t for t in texts) == 3


# ----------------------------------------------------------------------------------------------------
# (c) The module script compiles and has the shape Slicer looks for


def test_module_script_byte_compiles(tmp_path):
    py_compile.compile(str(MODULE_SCRIPT), cfile=str(tmp_path / "module.pyc"), doraise=True)


def test_module_script_defines_the_classes_slicer_looks_for():
    classes = {node.name for node in module_ast().body if isinstance(node, ast.ClassDef)}
    for suffix in ("", "Widget", "Logic", "Test", "ParameterNode"):
        assert f"{MODULE_NAME}{suffix}" in classes


def test_module_script_imports_no_heavy_module_at_top_level():
    """torch and the engine are imported inside functions only, so the module loads without them."""
    top_level = set()
    for node in module_ast().body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert top_level.isdisjoint({"torch", "numpy", "safetensors", f"{MODULE_NAME}Lib", "PyTorchUtils"})


# ----------------------------------------------------------------------------------------------------
# (d) Extension metadata


S4EXT_REQUIRED = (
    "scm",
    "scmurl",
    "scmrevision",
    "depends",
    "build_subdirectory",
    "homepage",
    "contributors",
    "category",
    "iconurl",
    "description",
    "enabled",
)
CMAKE_EXTENSION_VARIABLES = (
    "EXTENSION_HOMEPAGE",
    "EXTENSION_CONTRIBUTORS",
    "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL",
    "EXTENSION_DEPENDS",
)


@pytest.mark.parametrize("field", S4EXT_REQUIRED)
def test_s4ext_has_required_field(field):
    assert read_s4ext(S4EXT).get(field, "") != "", f"{field} missing or empty in {S4EXT.name}"


def test_s4ext_values():
    fields = read_s4ext(S4EXT)
    assert fields["scm"] == "git"
    assert fields["depends"] == "NA"  # torch_install.py installs PyTorch without the PyTorch extension
    assert fields["category"] == "Segmentation"
    assert fields["enabled"] in ("0", "1")
    assert fields["iconurl"].startswith("https://raw.githubusercontent.com/")
    assert fields["iconurl"].endswith(".png")


def top_cmake_variables() -> dict[str, str]:
    text = _strip_cmake_comments((ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    return {m.group(1): m.group(2) for m in re.finditer(r'\bset\(\s*(EXTENSION_\w+)\s+"([^"]*)"\s*\)', text)}


def test_top_cmakelists_declares_the_extension():
    text = _strip_cmake_comments((ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert re.search(r"\bproject\(\s*SAMMed2D\s*\)", text)
    for line in (
        r"find_package\(\s*Slicer\s+REQUIRED\s*\)",
        r"include\(\s*\$\{Slicer_USE_FILE\}\s*\)",
        r"add_subdirectory\(\s*SAMMed2DSegment\s*\)",
        r"include\(\s*\$\{Slicer_EXTENSION_GENERATE_CONFIG\}\s*\)",
        r"include\(\s*\$\{Slicer_EXTENSION_CPACK\}\s*\)",
    ):
        assert re.search(line, text), line
    assert "## NEXT_MODULE" in (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    variables = top_cmake_variables()
    for name in CMAKE_EXTENSION_VARIABLES:
        assert variables.get(name, "").strip() != "", f"{name} missing or empty"
    assert variables["EXTENSION_DEPENDS"] == "NA"  # no extension needed (Slicer's template spells it so)


def test_cmake_and_s4ext_agree():
    variables, fields = top_cmake_variables(), read_s4ext(S4EXT)
    assert variables["EXTENSION_HOMEPAGE"] == fields["homepage"]
    assert variables["EXTENSION_ICONURL"] == fields["iconurl"]
    assert variables["EXTENSION_SCREENSHOTURLS"].split() == fields["screenshoturls"].split()
    assert variables["EXTENSION_DEPENDS"].split() == fields["depends"].split()


#: Where a URL of this repository's tree names a file: raw files and GitHub's blob/tree/raw pages.
REPOSITORY_FILE_URL = (
    r"https://(?:raw\.githubusercontent\.com/{repo}/[^/]+|github\.com/{repo}/(?:blob|tree|raw)/[^/]+)/(.+)$"
)


def metadata_urls() -> list[str]:
    """Every URL in the extension metadata: the top-level CMakeLists.txt, the .s4ext and the catalog entry."""
    texts = [_strip_cmake_comments((ROOT / "CMakeLists.txt").read_text(encoding="utf-8")),
             "\n".join(read_s4ext(S4EXT).values()), CATALOG_ENTRY.read_text(encoding="utf-8")]  # fmt: skip
    return [url.rstrip(".,)") for text in texts for url in re.findall(r"https?://[^\s\"']+", text)]


def repository_path(url: str) -> str | None:
    """The path inside this repository that a URL names, or None when it points elsewhere."""
    homepage = top_cmake_variables()["EXTENSION_HOMEPAGE"]
    repo = re.escape(homepage.removeprefix("https://github.com/").removesuffix(".git").strip("/"))
    match = re.match(REPOSITORY_FILE_URL.format(repo=repo), url)
    return match.group(1) if match else None


def test_metadata_urls_into_this_repository_name_existing_files():
    """A URL into the tree (icon, screenshots) must name a file that is committed, or the Extensions
    Manager shows a broken image and the Extensions Index checker rejects it."""
    inside = {url: repository_path(url) for url in metadata_urls() if repository_path(url)}
    assert inside, "no metadata URL points into this repository; the pattern is probably wrong"
    assert [url for url, path in inside.items() if not (ROOT / path).is_file()] == []


def test_repository_path_reads_raw_and_blob_urls():
    repo = top_cmake_variables()["EXTENSION_HOMEPAGE"].removeprefix("https://github.com/")
    assert repository_path(f"https://raw.githubusercontent.com/{repo}/main/a/b.png") == "a/b.png"
    assert repository_path(f"https://github.com/{repo}/blob/v1/README.md") == "README.md"
    assert repository_path("https://raw.githubusercontent.com/other/repo/main/a.png") is None


# The catalog entry (SAMMed2D.json), as the Extensions Index's 5.10 and 5.12 branches take it. The schema is
# Slicer/Slicer:Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json, the same at v5.10.0 and v5.12.3
# ("required" line 7, "additionalProperties": false line 8, properties lines 9-65) and, formatted otherwise,
# as schemas/ on the index's 5.10 and 5.12 branches (v1.0.2 is not on the 5.10 branch). Its constraints are
# restated here, not copied (the Slicer licence would have to travel with a copy).
CATALOG_SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
CATALOG_SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str,
                             "scm_type": str, "build_dependencies": list, "build_subdirectory": str,
                             "enabled": bool, "tier": int}  # fmt: skip
CATALOG_SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"


def catalog_entry() -> dict:
    return json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))


def catalog_schema_errors(entry: dict) -> list[str]:
    """What the v1.0.1 schema would reject in `entry` (the subset of JSON Schema that it uses)."""
    errors = [f"missing {key}" for key in CATALOG_SCHEMA_REQUIRED if key not in entry]
    for key, value in entry.items():
        expected = CATALOG_SCHEMA_PROPERTIES.get(key)
        if expected is None:
            errors.append(f"unknown key {key}")
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            errors.append(f"{key} is not {expected.__name__}")
    if not all(isinstance(item, str) for item in entry.get("build_dependencies", [])):
        errors.append("build_dependencies holds a non-string")
    if entry.get("scm_type", "git") not in ("git", "local"):
        errors.append("scm_type is neither git nor local")
    if not isinstance(entry.get("tier", 1), int) or not 1 <= entry.get("tier", 1) <= 5:
        errors.append("tier outside 1..5")
    return errors


def test_catalog_entry_passes_the_schema():
    entry = catalog_entry()
    assert catalog_schema_errors(entry) == []
    assert entry["$schema"] == CATALOG_SCHEMA_URL


@pytest.mark.parametrize(
    ("change", "error"),
    [({"scm_url": None}, "missing scm_url"), ({"homepage": "x"}, "unknown key homepage"),
     ({"tier": 6}, "tier outside 1..5"), ({"enabled": 1}, "enabled is not bool"),
     ({"build_dependencies": "PyTorch"}, "build_dependencies is not list")],
)  # fmt: skip
def test_catalog_schema_check_rejects_what_the_schema_rejects(change, error):
    entry = {**catalog_entry(), **change}
    entry = {key: value for key, value in entry.items() if value is not None}
    assert error in catalog_schema_errors(entry)


def test_catalog_entry_agrees_with_cmake_and_s4ext():
    """The index names the extension after the file and checks it against project(); the factory builds
    the extensions the entry lists first ("NA" in CMake and .s4ext is none: Slicer v5.12.3
    Extensions/CMake/SlicerExtensionDescriptionSpec.cmake:76-80)."""
    entry, variables, fields = catalog_entry(), top_cmake_variables(), read_s4ext(S4EXT)
    project = re.search(r"\bproject\(\s*(\w+)", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert project is not None and CATALOG_ENTRY.stem == project.group(1)

    def listed(value: str) -> list[str]:
        return [] if value == "NA" else value.split()

    assert entry["build_dependencies"] == listed(variables["EXTENSION_DEPENDS"]) == listed(fields["depends"])
    assert entry["scm_url"].removesuffix(".git") == variables["EXTENSION_HOMEPAGE"] == fields["homepage"]
    assert entry["scm_url"] == fields["scmurl"] and entry["scm_revision"] == fields["scmrevision"]
    assert entry["category"] == fields["category"] == "Segmentation"  # one of the index's accepted categories
    assert str(entry["tier"]) == fields["tier"]


def test_catalog_entry_follows_the_index_naming_rules():
    """scripts/check_description_files.py on the index's 5.10 and 5.12 branches: scm_url scheme git or https
    (check_scm_url_syntax), extension name not starting with "Slicer" (check_extension_name), repository name
    starting with "Slicer" (check_git_repository_name)."""
    url = catalog_entry()["scm_url"]
    assert url.split("://", 1)[0] in ("git", "https")
    assert not CATALOG_ENTRY.stem.lower().startswith("slicer")
    assert url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git").startswith("Slicer")


def test_icon_url_points_at_the_icon_in_this_repository():
    url = top_cmake_variables()["EXTENSION_ICONURL"]
    match = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)$", url)
    assert match is not None, url
    assert (ROOT / match.group(1)).is_file()


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert (ROOT / "NOTICE").is_file()


# ----------------------------------------------------------------------------------------------------
# (e) Icons


@pytest.mark.parametrize("icon", ICONS, ids=lambda p: p.name)
def test_icon_is_128_rgba_png(icon):
    chunks = png_chunks(icon.read_bytes())
    kind, ihdr = chunks[0]
    assert kind == b"IHDR" and len(ihdr) == 13
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    assert (width, height) == (128, 128)
    assert (bit_depth, colour_type, interlace) == (8, 6, 0)  # 8-bit RGBA, not interlaced
    assert chunks[-1][0] == b"IEND"
    raw = zlib.decompress(b"".join(payload for k, payload in chunks if k == b"IDAT"))
    assert len(raw) == height * (1 + width * 4)


# ----------------------------------------------------------------------------------------------------
# (f) Screenshots and the real-Slicer workflow (tier D, which cannot run here)

SLICER_WORKFLOW = ROOT / ".github" / "workflows" / "slicer.yml"


def test_screenshot_urls_name_small_pngs_in_resources_screenshots():
    urls = top_cmake_variables()["EXTENSION_SCREENSHOTURLS"].split()
    assert urls, "the Extensions Index checker requires a screenshot URL"
    for url in urls:
        path = repository_path(url)
        assert path is not None and path.startswith("Resources/Screenshots/") and path.endswith(".png"), url
        data = (ROOT / path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000, path


def _workflow_commands(text: str) -> str:
    """The shell of the workflow's steps: PyYAML's parse where PyYAML is installed (it is no dependency of
    this project, so `make test` may lack it), else the `run: |` blocks read from the text."""
    try:
        import yaml
    except ModuleNotFoundError:
        blocks = re.findall(r"^( +)run: \|\n((?:\1  .*\n|\s*\n)+)", text, flags=re.MULTILINE)
        return "\n".join(body for _, body in blocks)
    workflow = yaml.safe_load(text)
    (job,) = workflow["jobs"].values()
    assert job["strategy"]["matrix"]["slicer"] == ["5.10", "5.12"]
    assert job["strategy"]["fail-fast"] is False and job["env"]["DISPLAY"] == ":99"
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_slicer_workflow_runs_the_self_test_in_slicer_5_10_and_5_12(tmp_path):
    text = SLICER_WORKFLOW.read_text(encoding="utf-8")
    assert re.search(r"^ +slicer: \[\"5\.10\", \"5\.12\"\]$", text, flags=re.MULTILINE)
    commands = _workflow_commands(text)
    assert "Xvfb :99" in commands
    assert "version=${{ matrix.slicer }}" in commands
    assert "runUnitTest(" in commands and "'SAMMed2DSegment')" in commands
    assert "--additional-module-paths" in commands
    scripts = re.findall(r"--python-script (\S+)", commands)
    assert scripts
    for script in scripts:
        py_compile.compile(str(ROOT / script), doraise=True, cfile=str(tmp_path / "script.pyc"))
    assert "slicer_prepare.py requirements" in commands
