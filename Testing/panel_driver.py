"""The module's Widget without Qt, for tests: the panel model (mrml/panel.py) with the bindings the Widget
makes in SAMMed2DSegment.py, so that clicks in real slice views reach the panel the way they do in Slicer.

What is bound as the Widget binds it:
* the two point lists' events (`_observePointLists`): a point placed (PointPositionDefinedEvent) calls
  `point_placed` and then counts as an edit; a point moved (PointEndInteractionEvent) or removed
  (PointRemovedEvent) is an edit; an edit makes a live update due when `wants_live_update` says so (the
  Widget starts its debounce timer; here `live_update_due` is set and `fire_live_update()` is the timeout);
* the buttons (`onSegment`, `onPropagateFromHere`, `onCancel`, `onToggleIncludeExclude`, `onLiveUpdate`),
  with the segment editor's current segment and its undo saver (`_undoSaver`): the editor's history is
  `vtkSlicerSegmentEditorLogic`'s, on the same editor node the controller writes through, which is what the
  embedded `qMRMLSegmentEditorWidget` delegates its undo/redo to in Slicer 5.13;
* the poll timer (`onPollWorker`) is `wait()`/`poll()`; a scene close (`onSceneStartClose`) is
  `scene_closing()`.
The Widget itself needs Qt and the application, neither of which runs here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import slicer
import vtk

from SAMMed2DSegmentLib.mrml import self_test
from SAMMed2DSegmentLib.mrml.controller import InteractiveSegmentation
from SAMMed2DSegmentLib.mrml.panel import PanelModel, PanelParameters, PanelView
from SAMMed2DSegmentLib.mrml.scene import HeadlessScene
from SAMMed2DSegmentLib.service.client import EngineClient

#: demo/liver-point.mrk.json (LPS there) in RAS: the README's liver point, on slice 10 of the bundled CT.
LIVER_RAS = (93.26171875, 129.89453125, -784.5)

#: As the Widget sets it (`setMaximumNumberOfUndoStates(10)`, like Slicer's Segment Editor module).
UNDO_STATES = 10


def make_panel(
    hs: HeadlessScene, client: EngineClient | None = None, editor: vtk.vtkObject | None = None
) -> PanelModel:
    """A panel model whose controller writes through `editor` (a new segment editor node when None) and
    talks to `client` (a new engine client when None), as the module's Logic makes it."""
    editor = editor or hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    make = lambda: InteractiveSegmentation(hs.scene, client or EngineClient(), editor, hs.app_logic)  # noqa: E731
    return PanelModel(hs, make, lambda download: self_test.READY)


def wait(panel: PanelModel, timeout: float = 300) -> None:
    """The Widget's poll timer until the panel stops asking for it."""
    deadline = time.monotonic() + timeout
    while panel.poll():
        assert time.monotonic() < deadline, "the engine did not answer"
        time.sleep(0.01)


class WidgetDriver:
    """The panel, its parameters and the embedded editor's undo history, bound as the Widget binds them."""

    def __init__(self, hs: HeadlessScene, client: EngineClient, volume: vtk.vtkObject, **params: Any) -> None:
        self.hs = hs
        # The module's own editor node: a singleton, so it outlives a scene close as in the application.
        self.editor_node = hs.scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
        self.editor_node.UnRegister(None)
        self.editor_node.SetSingletonTag("SAMMed2DSegment")
        self.editor_node = hs.scene.AddNode(self.editor_node)
        self.editor = slicer.vtkSlicerSegmentEditorLogic()
        self.editor.SetMRMLScene(hs.scene)
        self.editor.SetMRMLApplicationLogic(hs.app_logic)
        self.editor.SetSegmentEditorNode(self.editor_node)
        self.editor.SetMaximumNumberOfUndoStates(UNDO_STATES)
        self.p = PanelParameters(inputVolume=volume, device="cpu", **params)
        self.panel = make_panel(hs, client, self.editor_node)
        self.shown = True  # the module panel is entered
        self.live_update_due = False
        self.segment_id = ""  # the editor's current segment
        self._observations: list[tuple[vtk.vtkObject, int]] = []
        self._observed: list[vtk.vtkObject] = []

    def new_parameters(self, volume: vtk.vtkObject, **params: Any) -> None:
        """A new parameter node after a scene close (`onSceneEndClose` → `initializeParameterNode`)."""
        self.p = PanelParameters(inputVolume=volume, device="cpu", **params)
        self.segment_id = ""

    # -- what the Widget shows ---------------------------------------------------------------------------
    def view(self) -> PanelView:
        return self.panel.view(self.p)

    @property
    def status(self) -> str:
        return self.view().status

    # -- observers (`_observePointLists`) ----------------------------------------------------------------
    def _observe_point_lists(self) -> None:
        nodes = [n for n in (self.p.includePoints, self.p.excludePoints) if n is not None]
        if nodes == self._observed:
            return
        self._unobserve()
        markups = slicer.vtkMRMLMarkupsNode
        events: tuple[tuple[int, Callable], ...] = (
            (markups.PointPositionDefinedEvent, self._on_point_placed),
            (markups.PointEndInteractionEvent, self._on_points_edited),
            (markups.PointRemovedEvent, self._on_points_edited),
        )
        for node in nodes:
            for event, callback in events:
                self._observations.append((node, node.AddObserver(event, callback)))
        self._observed = nodes

    def _unobserve(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations, self._observed = [], []

    def _on_point_placed(self, caller: vtk.vtkObject, event: str) -> None:
        self.panel.point_placed(self.p, caller)
        self._on_points_edited(caller, event)

    def _on_points_edited(self, caller: vtk.vtkObject, event: str) -> None:
        if self.panel.wants_live_update(self.p, self.shown):
            self.live_update_due = True

    # -- buttons -----------------------------------------------------------------------------------------
    def toggle(self) -> str:
        """Shift+T (a Qt shortcut on the main window, so never a key event of the views)."""
        which = self.panel.toggle_placement(self.p)
        self._observe_point_lists()
        return which

    def save_undo(self) -> None:
        """`_undoSaver`: the editor keeps the history of its own segmentation only."""
        current, target = self.editor_node.GetSegmentationNode(), self.p.outputSegmentation
        if current is not None and target is not None and current.GetID() == target.GetID():
            self.editor.SaveStateForUndo()

    def _started(self, segment_id: str | None) -> str | None:
        """`_started` and the parameter node observer: the editor shows the output segmentation and the
        segment written into."""
        seg = self.p.outputSegmentation
        if seg is not None and self.editor_node.GetSegmentationNode() is not seg:
            self.editor_node.SetAndObserveSegmentationNode(seg)
            self.editor_node.SetAndObserveSourceVolumeNode(self.p.inputVolume)
        if segment_id:
            self.segment_id = segment_id
            self.editor_node.SetSelectedSegmentID(segment_id)
        return segment_id

    def segment(self, direction: str = "none", interactive: bool = True) -> str | None:
        """Segment this slice ("none") or Propagate up/down/both. As `_ensureRequirements` without a user to
        ask (a timer, or testing): missing packages are said on the status line and nothing starts."""
        state = self.panel.requirements(False)
        if not state.ready:
            self.panel.say(state.message)
            return None
        return self._started(self.panel.segment(self.p, direction, self.segment_id, self.save_undo,
                                                interactive))  # fmt: skip

    def propagate_from_here(self) -> str | None:
        return self._started(self.panel.propagate_from_here(self.p, self.segment_id, self.save_undo))

    def fire_live_update(self) -> str:
        """The live-update timer's timeout (`onLiveUpdate`): "later" keeps it due, "run" segments."""
        action = self.panel.live_update(self.p)
        self.live_update_due = action == "later"
        if action == "run":
            self.segment("none", interactive=False)
        return action

    def cancel(self) -> None:
        self.panel.cancel()

    def undo(self) -> None:
        self.editor.Undo()

    def redo(self) -> None:
        self.editor.Redo()

    def poll(self) -> bool:
        return self.panel.poll()

    def wait(self, timeout: float = 300) -> None:
        wait(self.panel, timeout)

    def scene_closing(self) -> None:
        """`onSceneStartClose`: the panel forgets the old scene; the point lists are no longer observed."""
        self.panel.scene_closing()
        self.live_update_due = False
        self._unobserve()
        self.editor_node.SetAndObserveSegmentationNode(None)

    def close(self) -> None:
        self._unobserve()


__all__ = ["LIVER_RAS", "UNDO_STATES", "WidgetDriver", "make_panel", "wait"]
