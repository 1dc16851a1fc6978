"""A scene with the module logics the bridge needs, built without the Slicer application.

Inside Slicer the application builds all of this; headless (command line, tests) we build it the way
trame-slicer's `SlicerApp` does: one `vtkSlicerApplicationLogic` per scene, with the Colors, Volumes,
Segmentations and Markups logics registered on it. Also here: turning VTK's error spew during a failed read
into one clear Python exception (`captured_vtk_messages`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import slicer
import vtk

log = logging.getLogger(__name__)


@dataclass
class HeadlessScene:
    """A scene and the logics the bridge calls. Inside Slicer, build one from the application's objects::

    HeadlessScene(slicer.mrmlScene, slicer.app.applicationLogic(), slicer.modules.colors.logic(),
                  slicer.modules.volumes.logic(), slicer.modules.segmentations.logic(),
                  slicer.modules.markups.logic())
    """

    scene: vtk.vtkObject
    app_logic: vtk.vtkObject
    colors_logic: vtk.vtkObject
    volumes_logic: vtk.vtkObject
    segmentations_logic: vtk.vtkObject
    markups_logic: vtk.vtkObject


def _register(app_logic: vtk.vtkObject, scene: vtk.vtkObject, name: str, logic: vtk.vtkObject) -> None:
    # Order as in trame-slicer: scene first (RegisterNodes runs there), then the application logic.
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic(name, logic)


def _deduplicate_converter_rules() -> None:
    """Every segmentations logic registers its converter rules again in the process-wide factory; with
    several scenes in one process the duplicates pile up and slow down conversion path search."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    seen: set[str] = set()
    for rule in list(factory.GetConverterRules()):
        name = rule.GetClassName()
        if name in seen:
            factory.UnregisterConverterRule(rule)
        else:
            seen.add(name)


def quiet_vtk_logging() -> None:
    """Hide VTK/MRML warnings and info on stderr, keep errors. Process-wide, so for headless use only."""
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)


def create_headless_scene(quiet: bool = True) -> HeadlessScene:
    """A new scene with application, colors, volumes, segmentations and markups logics; each call builds
    an independent set, so several scenes can live in one process."""
    if quiet:
        quiet_vtk_logging()
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()  # the application's own color logic serves as the Colors module logic
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    app_logic.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    markups = slicer.vtkSlicerMarkupsLogic()
    for name, logic in (("Volumes", volumes), ("Segmentations", segmentations), ("Markups", markups)):
        _register(app_logic, scene, name, logic)
    _deduplicate_converter_rules()
    if hasattr(slicer.vtkMRMLSliceNode, "AddDefaultSliceOrientationPresets"):
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    return HeadlessScene(scene, app_logic, colors, volumes, segmentations, markups)


# -- VTK messages ----------------------------------------------------------------------------------------

_HEADER = re.compile(r"^(ERROR|Warning|Generic Warning): In .*?, line \d+\s*$", re.MULTILINE)
# Pipeline bookkeeping that VTK prints after every failing reader; it never says why.
_NOISE = ("returned failure for request", "Failed to read node", "Number of files listed in the node")


@dataclass
class VtkMessages:
    """Text VTK printed while captured."""

    text: str = ""

    def errors(self) -> list[str]:
        """The distinct error messages, bookkeeping removed, each without the object address prefix."""
        out: list[str] = []
        blocks = _HEADER.split(self.text)
        # split() with one group gives [before, kind, body, kind, body, ...]
        for kind, body in zip(blocks[1::2], blocks[2::2], strict=True):
            if kind != "ERROR":
                continue
            message = body.strip().splitlines()[0] if body.strip() else ""
            message = re.sub(r"^\w+ \(0x[0-9a-fA-F]+\): ", "", message).strip()
            if message and not any(n in message for n in _NOISE) and message not in out:
                out.append(message)
        return out

    def summary(self, limit: int = 1) -> str:
        """One line for an exception message."""
        errors = self.errors()
        return "; ".join(errors[:limit]) if errors else "no details from VTK"


@contextmanager
def captured_vtk_messages() -> Iterator[VtkMessages]:
    """Collect what VTK/MRML print (errors included) instead of showing it, for reads and writes whose
    failure we report ourselves as one exception. Everything is also logged at DEBUG level."""
    messages = VtkMessages()
    previous_window = vtk.vtkOutputWindow.GetInstance()
    previous_verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    window = vtk.vtkStringOutputWindow()
    vtk.vtkOutputWindow.SetInstance(window)
    # vtkErrorMacro also logs through vtkLogger straight to stderr; silence that path too while capturing.
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    try:
        yield messages
    finally:
        vtk.vtkLogger.SetStderrVerbosity(previous_verbosity)
        vtk.vtkOutputWindow.SetInstance(previous_window)
        messages.text = window.GetOutput() or ""
        if messages.text:
            log.debug("VTK output:\n%s", messages.text)
