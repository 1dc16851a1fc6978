"""Static checks of SAMMed2DSegment.py, which needs the Slicer application to run: what the Widget calls
exists on the Logic, what the Logic imports from the library exists, and the panel's choices are the
library's (stdlib AST + the library; no Slicer)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from SAMMed2DSegmentLib.engine.geometry import AXES
from SAMMed2DSegmentLib.engine.precision import PRECISIONS
from SAMMed2DSegmentLib.engine.propagation import DIRECTIONS
from SAMMed2DSegmentLib.engine.session import WINDOW_CHOICES
from SAMMed2DSegmentLib.weights.registry import REGISTRY

MODULE_DIR = Path(__file__).resolve().parents[1] / "SAMMed2DSegment"
SCRIPT = MODULE_DIR / "SAMMed2DSegment.py"
UI = MODULE_DIR / "Resources" / "UI" / "SAMMed2DSegment.ui"
TREE = ast.parse(SCRIPT.read_text(encoding="utf-8"))


def _constants() -> dict[str, object]:
    """Top-level NAME = literal assignments, in order (a literal may name an earlier constant)."""
    values: dict[str, object] = {}
    for node in TREE.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                code = compile(ast.Expression(node.value), "<constant>", "eval")
                values[node.targets[0].id] = eval(code, {}, values)
            except Exception:
                continue
    return values


def _constant(name: str):
    values = _constants()
    assert name in values, f"{name} not found"
    return values[name]


def _class(name: str) -> ast.ClassDef:
    return next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == name)


def _methods(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def _attribute_uses(cls: ast.ClassDef, owner: str) -> set[str]:
    """Names X in `self.<owner>.X` (owner "logic") or `self.X(...)` calls (owner "")."""
    found = set()
    for node in ast.walk(cls):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if owner and isinstance(value, ast.Attribute) and value.attr == owner:
            if isinstance(value.value, ast.Name) and value.value.id == "self":
                found.add(node.attr)
        elif not owner and isinstance(value, ast.Name) and value.id == "self":
            found.add(node.attr)
    return found


def test_panel_choices_are_the_library_choices():
    assert _constant("AXES") == list(AXES)
    assert _constant("WINDOWS") == list(WINDOW_CHOICES)
    assert _constant("MODELS") == [*REGISTRY, _constant("LOCAL_MODEL")]
    assert sorted(_constant("DIRECTIONS")) == sorted(DIRECTIONS)
    assert _constant("PRECISIONS") == list(PRECISIONS)


@pytest.mark.parametrize(
    "widget, constant",
    [
        ("axisComboBox", "AXES"),
        ("deviceComboBox", "DEVICES"),
        ("precisionComboBox", "PRECISIONS"),
        ("modelComboBox", "MODELS"),
        ("windowComboBox", "WINDOWS"),
    ],  # fmt: skip
)
def test_ui_combo_items_are_the_choices(widget, constant):
    root = ET.parse(UI).getroot()
    combo = next(w for w in root.iter("widget") if w.get("name") == widget)
    items = [item.find("property/string").text for item in combo.findall("item")]
    assert items == _constant(constant)


def _assigned_on_self(cls: ast.ClassDef) -> set[str]:
    return {
        t.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }


def test_everything_the_widget_asks_of_the_logic_exists():
    logic = _class("SAMMed2DSegmentLogic")
    defined = _methods(logic) | _assigned_on_self(logic) | {"getParameterNode"}
    used = _attribute_uses(_class("SAMMed2DSegmentWidget"), "logic")
    assert used, "the widget calls no logic method; the AST walk is probably wrong"
    assert sorted(used - defined) == []


def test_everything_the_logic_uses_on_itself_exists():
    logic = _class("SAMMed2DSegmentLogic")
    assigned = _assigned_on_self(logic)
    base = {"getParameterNode"}  # ScriptedLoadableModuleLogic
    missing = _attribute_uses(logic, "") - _methods(logic) - assigned - base
    assert sorted(missing) == []


def test_every_library_import_in_the_module_resolves():
    imports = [
        (n.module, alias.name)
        for n in ast.walk(TREE)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("SAMMed2DSegmentLib")
        for alias in n.names
    ]
    assert len(imports) > 10
    for module, name in imports:
        found = hasattr(importlib.import_module(module), name)
        found = found or importlib.util.find_spec(f"{module}.{name}") is not None  # a submodule
        assert found, f"{module}.{name}"


def test_module_defines_no_computation_the_library_has():
    """The Widget has no numpy/torch code; it only calls the Logic."""
    widget_source = ast.get_source_segment(
        SCRIPT.read_text(encoding="utf-8"), _class("SAMMed2DSegmentWidget")
    )
    for forbidden in ("import numpy", "import torch", "np.", "torch."):
        assert forbidden not in widget_source


def test_observer_callbacks_do_not_compare_event_ids():
    """VTK passes Python observers the event *name* (custom MRML events arrive as "NoEvent"), so a callback
    that compares `event` with an event id never matches: each event needs its own callback."""
    source = SCRIPT.read_text(encoding="utf-8")
    assert "event ==" not in source and "== event" not in source


def test_the_logic_shows_no_dialog_and_never_spins_the_event_loop():
    """Dialogs belong to the Widget; the Logic raises RequirementsNeeded instead of asking."""
    logic = ast.get_source_segment(SCRIPT.read_text(encoding="utf-8"), _class("SAMMed2DSegmentLogic"))
    for forbidden in ("confirmOkCancelDisplay", "errorDisplay", "processEvents", "askConfirmation=True",
                      "time.sleep"):  # fmt: skip
        assert forbidden not in logic


def test_what_the_module_imports_from_the_library_never_loads_torch():
    """Every SAMMed2DSegmentLib module the Slicer-side file imports, in a fresh interpreter: no torch (and no
    highdicom, which Slicer 5.10 does not bundle), since the model lives in the engine process."""
    modules = sorted({node.module for node in ast.walk(TREE) if isinstance(node, ast.ImportFrom)
                      and (node.module or "").startswith("SAMMed2DSegmentLib")})  # fmt: skip
    assert "SAMMed2DSegmentLib.mrml.controller" in modules and "SAMMed2DSegmentLib.service.client" in modules
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + (
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'highdicom'))\n"
            "assert not bad, bad[:5]\n"
        )
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=MODULE_DIR)


def test_the_panel_parameters_are_the_parameter_node_fields():
    """The panel model takes the module's parameter node wrapper or, headless, PanelParameters: the same
    fields with the same defaults."""
    import dataclasses

    from SAMMed2DSegmentLib.mrml.panel import PanelParameters

    node = _class("SAMMed2DSegmentParameterNode")
    fields = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            fields[item.target.id] = ast.literal_eval(item.value) if item.value is not None else None
    panel = {f.name: f.default for f in dataclasses.fields(PanelParameters)}
    assert fields == panel


def test_the_widget_is_a_thin_binding():
    """Its decisions live in the panel model (DESIGN 2.7): the Widget stays under 400 lines and the Logic
    delegates to the library."""
    widget = _class("SAMMed2DSegmentWidget")
    assert widget.end_lineno - widget.lineno + 1 < 400
    assert "panel" in _attribute_uses(widget, "")
    assert "panel" in _assigned_on_self(_class("SAMMed2DSegmentLogic"))


def _function(name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(TREE) if isinstance(n, ast.FunctionDef) and n.name == name)


def _names(node: ast.AST) -> set[str]:
    """Every name, attribute and imported module mentioned under `node`."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            found.add(n.id)
        elif isinstance(n, ast.Attribute):
            found.add(n.attr)
        elif isinstance(n, ast.alias):
            found.update(n.name.split("."))
    return found


def test_torch_is_installed_through_the_polled_progress_dialog():
    """The PyTorch extension's installTorch waits for light-the-torch in Slicer's main thread (the GUI
    repaints only per output line) and then imports torch into Slicer: the module uses neither it nor a
    WaitCursor, and installs torch, like the engine's packages, through the one polled progress dialog."""
    used = _names(TREE)
    assert "startTorchInstall" in used and "_installWithProgress" in used, "the AST walk is probably wrong"
    assert not {"PyTorchUtils", "PyTorchUtilsLogic", "installTorch", "WaitCursor", "torch"} & used
    ensure = _function("_ensureRequirements")
    starts = {n.func.attr for n in ast.walk(ensure) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Attribute) and n.func.attr.startswith("start")}  # fmt: skip
    assert starts == {"startTorchInstall", "startPackageInstall"}
    calls = [n for n in ast.walk(ensure) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "_installWithProgress"]  # fmt: skip
    assert len(calls) == 1, "one dialog code path for both installs"
    dialog = _function("_installWithProgress")
    assert {"QProgressDialog", "poll", "cancel", "wasCanceled"} <= _names(dialog)
    logic = _class("SAMMed2DSegmentLogic")
    start = next(n for n in logic.body if isinstance(n, ast.FunctionDef) and n.name == "startTorchInstall")
    assert {"TorchInstall", "in_slicer", "torch_requirement", "start"} <= _names(start)


def test_the_install_dialog_waits_without_spinning():
    """`processEvents` with a time limit returns at once when nothing is pending: the poll loop waits in a
    short event loop instead, so the GUI thread does not spin for the minutes a PyTorch download takes."""
    tree = ast.parse(SCRIPT.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    loop = next(n for n in functions if n.name == "_installWithProgress")
    calls = [n for n in ast.walk(loop) if isinstance(n, ast.Call)]
    called = {n.func.attr for n in calls if isinstance(n.func, ast.Attribute)}
    assert "processEvents" not in called
    names = {n.func.id for n in calls if isinstance(n.func, ast.Name)}
    assert "_waitProcessingEvents" in names
