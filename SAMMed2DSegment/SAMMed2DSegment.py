"""SAM-Med2D interactive segmentation module for 3D Slicer (5.10 and 5.12).

This file is thin Qt + MRML glue. The model runs in a child process, the engine process
(SAMMed2DSegmentLib.service), started with Slicer's own Python; this process never imports torch. Why:
PythonQt keeps the GIL while Slicer's main thread waits in the Qt event loop, so a Python worker thread in
Slicer would only run while the GUI happens to run Python. The Widget polls the engine from a qt.QTimer and
never blocks; replies are written into MRML on the main thread (SAMMed2DSegmentLib.mrml.controller).
"""

import logging
import os
from typing import Annotated

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Oldest torch release the engine is written for (light-the-torch is asked for it: requirements.py).
MINIMUM_TORCH_VERSION = "2.1"

# Choices shown in the panel. They mirror the library's constants (geometry.AXES, weights.REGISTRY,
# session.WINDOW_CHOICES); Testing/test_module_script.py checks that they agree, since the library cannot
# be imported at module load time.
AXES = ["axial", "coronal", "sagittal"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
PRECISIONS = ["auto", "fp32", "bf16", "fp16", "int8"]
LOCAL_MODEL = "local file"
MODELS = ["demo", "sam-med2d_b", LOCAL_MODEL]
WINDOWS = ["auto", "ct-soft-tissue", "ct-lung", "ct-bone", "ct-brain", "ct-liver", "custom"]
DIRECTIONS = ["none", "up", "down", "both"]

#: Per-user preferences (QSettings), not scene content.
SETTINGS_LOCAL_CHECKPOINT = "SAMMed2DSegment/localCheckpointPath"

#: Milliseconds between polls of the background worker while it has work, and debounce delays.
POLL_INTERVAL_MS = 50
LIVE_UPDATE_DELAY_MS = 300
PREFETCH_DELAY_MS = 600


#
# SAMMed2DSegment
#


class SAMMed2DSegment(ScriptedLoadableModule):
    """Module description; uses the ScriptedLoadableModule base class."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAM-Med2D Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # torch is checked, and installed if need be, when first needed
        self.parent.contributors = ["SAMMed2D developers"]
        self.parent.helpText = _(
            "Interactive segmentation with SAM-Med2D, a Segment Anything model fine-tuned on medical "
            "images. Place include and exclude points or a box (ROI) on a slice; the model segments that "
            "slice and the result can be propagated through the structure, slice by slice. "
            'See the <a href="https://github.com/SAMMed2D/SlicerSAMMed2D">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "The network is a reimplementation of SAM-Med2D (OpenGVLab, Apache-2.0) and Segment Anything "
            "(Meta, Apache-2.0). See the NOTICE file of the extension."
        )


#
# SAMMed2DSegmentParameterNode
#


@parameterNodeWrapper
class SAMMed2DSegmentParameterNode:
    """
    The parameters needed by the module; saved with the scene.

    inputVolume - the volume to segment (never modified); always the one selected here.
    includePoints - points inside the structure (positive prompts).
    excludePoints - points outside the structure (negative prompts).
    promptROI - optional box prompt; also bounds propagation.
    outputSegmentation - the segmentation that receives the result (segment chosen in the embedded editor).
    axis - orientation of the slices shown to the model.
    followView - take the axis from the slice view where the last point was placed.
    device - where the network runs.
    precision - the encoder's arithmetic (auto: bf16 or int8 where it measured faster here and agreed).
    model - registry model name, or "local file" (path in the user's settings).
    iouThreshold - propagation stops at slices whose predicted IoU is lower.
    window, windowLevel, windowWidth - intensity window shown to the model (level/width for "custom").
    liveUpdate - re-segment the slice whenever a point is placed or moved.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    includePoints: vtkMRMLMarkupsFiducialNode
    excludePoints: vtkMRMLMarkupsFiducialNode
    promptROI: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    axis: Annotated[str, Choice(AXES)] = "axial"
    followView: bool = True
    device: Annotated[str, Choice(DEVICES)] = "auto"
    precision: Annotated[str, Choice(PRECISIONS)] = "auto"
    model: Annotated[str, Choice(MODELS)] = "demo"
    iouThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    window: Annotated[str, Choice(WINDOWS)] = "auto"
    windowLevel: Annotated[float, WithinRange(-5000.0, 100000.0)] = 40.0
    windowWidth: Annotated[float, WithinRange(1.0, 100000.0)] = 400.0
    liveUpdate: bool = True


#
# SAMMed2DSegmentWidget
#


class SAMMed2DSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and to the panel model (SAMMed2DSegmentLib.mrml.panel), and shows
    what the panel model says; every decision is made there, where it is tested headless."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = self.panel = self._parameterNode = self._parameterNodeGuiTag = None
        self._toggleShortcut = None
        self._updatingMarkupsWidgets = False
        self._observedPointLists, self._observedSliceNodes = [], []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMMed2DSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SAMMed2DSegmentLogic()
        self.panel = self.logic.panel

        # The point-list widgets have no parameter-node GUI connector, so they are bound by hand.
        self.ui.includePointsWidget.setNodeBaseName(_("include"))
        self.ui.excludePointsWidget.setNodeBaseName(_("exclude"))
        self.ui.includePointsWidget.connect("markupsNodeChanged()", self.onPointsWidgetChanged)
        self.ui.excludePointsWidget.connect("markupsNodeChanged()", self.onPointsWidgetChanged)

        # The embedded Segment Editor selects/creates the segment, fixes slices by hand, and owns undo/redo:
        # every write of this module is saved in its history first, so its Undo button undoes one action.
        editor = self.ui.segmentEditorWidget
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setSegmentationNodeSelectorVisible(False)
        editor.setSourceVolumeNodeSelectorVisible(False)
        editor.setSwitchToSegmentationsButtonVisible(False)
        editor.setEffectNameOrder(["Paint", "Erase", "Scissors", "Islands", "Smoothing"])
        editor.unorderedEffectsVisible = False
        editor.setMaximumNumberOfUndoStates(10)  # as Slicer's Segment Editor module (SegmentEditor.py:61)

        self.ui.segmentSliceButton.connect("clicked(bool)", lambda: self.onSegment("none"))
        self.ui.propagateUpButton.connect("clicked(bool)", lambda: self.onSegment("up"))
        self.ui.propagateDownButton.connect("clicked(bool)", lambda: self.onSegment("down"))
        self.ui.propagateBothButton.connect("clicked(bool)", lambda: self.onSegment("both"))
        self.ui.propagateFromHereButton.connect("clicked(bool)", self.onPropagateFromHere)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.toggleIncludeExcludeButton.connect("clicked(bool)", self.onToggleIncludeExclude)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.confidenceTable.connect("cellClicked(int,int)", self.onConfidenceCellClicked)
        checkpoint = self.ui.localCheckpointPathLineEdit
        checkpoint.connect("currentPathChanged(QString)", self.onLocalCheckpointChanged)
        self.panel.local_checkpoint = qt.QSettings().value(SETTINGS_LOCAL_CHECKPOINT, "")
        checkpoint.currentPath = self.panel.local_checkpoint

        # The engine is polled only while it has work (no timer that runs forever).
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollWorker)
        self._liveUpdateTimer = _singleShotTimer(LIVE_UPDATE_DELAY_MS, self.onLiveUpdate)
        self._prefetchTimer = _singleShotTimer(PREFETCH_DELAY_MS, self.onPrefetch)

        # Shift+T switches placement between the include and the exclude list (enabled while shown; plain "t"
        # belongs to the slice views). No main window (--no-main-window): no shortcut.
        mainWindow = slicer.util.mainWindow()
        if mainWindow is not None:
            self._toggleShortcut = qt.QShortcut(qt.QKeySequence("Shift+T"), mainWindow)
            self._toggleShortcut.connect("activated()", self.onToggleIncludeExclude)
            self._toggleShortcut.setEnabled(False)
        # The engine process ends with Slicer even if this panel was never shown again.
        self._quitHandler = self.logic.shutdown  # the same object for disconnect() (a module reload)
        slicer.app.connect("aboutToQuit()", self._quitHandler)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes or the module is reloaded."""
        self.removeObservers()
        for timer in (self._pollTimer, self._liveUpdateTimer, self._prefetchTimer):
            timer.stop()  # a pending single-shot must not call into a destroyed widget (module reload)
        if self._toggleShortcut is not None:
            self._toggleShortcut.setParent(None)
            self._toggleShortcut = None
        slicer.app.disconnect("aboutToQuit()", self._quitHandler)  # a reloaded module keeps no old logic
        self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()
        if self.panel.warm_up(self._parameterNode):  # the engine starts and loads the model meanwhile
            self._startPolling()
        if self._toggleShortcut is not None:
            self._toggleShortcut.setEnabled(True)
        self._observeSliceNodes()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()  # Ctrl+Z / Ctrl+Y in views

    def exit(self) -> None:
        if self._toggleShortcut is not None:
            self._toggleShortcut.setEnabled(False)
        self._observeSliceNodes(observe=False)
        self._liveUpdateTimer.stop()
        self._prefetchTimer.stop()
        self.ui.segmentEditorWidget.setActiveEffect(None)  # stop painting when the module is left
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
        # As Slicer's Segment Editor module does: the views stop feeding events to the embedded editor.
        self.ui.segmentEditorWidget.removeViewObservations()

    def onSceneStartClose(self, caller, event) -> None:
        """Running work is cancelled and its results dropped; the panel forgets the old scene."""
        self.panel.scene_closing()
        self._liveUpdateTimer.stop()
        self._prefetchTimer.stop()
        self._observePointLists([])
        self.setParameterNode(None)
        # As Slicer's Segment Editor module does before the nodes go away.
        self.ui.segmentEditorWidget.setSegmentationNode(None)
        self.ui.segmentEditorWidget.removeViewObservations()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        # The editor needs its node before it is given a segmentation (setParameterNode does that).
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = self.logic.displayedVolume()

    def setParameterNode(self, inputParameterNode) -> None:
        """Connect the GUI once per parameter node, not on every enter(): on Slicer 5.10 each connectGui
        leaves an observer behind (parameterNodeWrapper/wrapper.py:212 at v5.10.0; fixed in 5.12.3)."""
        same = (
            inputParameterNode is not None
            and self._parameterNode is not None
            and inputParameterNode.parameterNode is self._parameterNode.parameterNode
        )
        if same:
            self._onParameterNodeModified()
            return
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self._onParameterNodeModified)  # fmt: skip
        self._parameterNode, self._parameterNodeGuiTag = inputParameterNode, None
        if self._parameterNode:
            # Each bound widget carries a "SlicerParameterName" dynamic property in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    # -- parameter node → GUI --------------------------------------------------------------------------

    def onPointsWidgetChanged(self) -> None:
        """Store the point lists selected in the two markups widgets in the parameter node."""
        if self._parameterNode is None or self._updatingMarkupsWidgets:
            return
        self._parameterNode.includePoints = self.ui.includePointsWidget.currentNode()
        self._parameterNode.excludePoints = self.ui.excludePointsWidget.currentNode()

    def _updateMarkupsWidgets(self) -> None:
        """Show the parameter node's point lists in the two markups widgets, without arming placement (which
        enterPlaceModeOnNodeChange would do for each: the first click would become an exclude point)."""
        if self._parameterNode is None:
            return
        widgets = (self.ui.includePointsWidget, self.ui.excludePointsWidget)
        self._updatingMarkupsWidgets = True
        for widget in widgets:
            widget.enterPlaceModeOnNodeChange = False
        try:
            self.ui.includePointsWidget.setCurrentNode(self._parameterNode.includePoints)
            self.ui.excludePointsWidget.setCurrentNode(self._parameterNode.excludePoints)
        finally:
            for widget in widgets:
                widget.enterPlaceModeOnNodeChange = True
            self._updatingMarkupsWidgets = False

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateMarkupsWidgets()
        pn = self._parameterNode
        if pn is not None:
            self._observePointLists([pn.includePoints, pn.excludePoints])
            editor = self.ui.segmentEditorWidget
            # Editor node, then segmentation, then source volume: a source volume without a segmentation is
            # refused with an error (vtkSlicerSegmentEditorLogic::SetSourceVolumeNode).
            if editor.segmentationNode() is not pn.outputSegmentation:
                editor.setSegmentationNode(pn.outputSegmentation)
            if pn.outputSegmentation is not None and editor.sourceVolumeNode() is not pn.inputVolume:
                editor.setSourceVolumeNode(pn.inputVolume)
        self._render()

    def _render(self) -> None:
        """Show the panel model's view: enabled actions, tooltips, status, progress, table, error dialogs."""
        pn = self._parameterNode
        if pn is None:
            self.ui.statusLabel.text = self.panel.activity.status
            return
        view = self.panel.view(pn)
        for button in (self.ui.segmentSliceButton, self.ui.propagateUpButton, self.ui.propagateDownButton,
                       self.ui.propagateBothButton):  # fmt: skip
            button.enabled = view.segment_enabled
        self.ui.segmentSliceButton.toolTip = view.segment_tooltip
        self.ui.propagateFromHereButton.enabled = view.propagate_from_here_enabled
        self.ui.cancelButton.enabled = view.stop_enabled
        self.ui.exportDicomSegButton.enabled = view.export_enabled
        self.ui.exportDicomSegButton.toolTip = view.export_tooltip
        self.ui.windowLevelSpinBox.enabled = view.custom_window
        self.ui.windowWidthSpinBox.enabled = view.custom_window
        self.ui.localCheckpointLabel.setVisible(view.local_model)
        self.ui.localCheckpointPathLineEdit.setVisible(view.local_model)
        self.ui.downloadModelButton.setVisible(not view.local_model)
        self.ui.modelStatusLabel.text = view.model_status
        self.ui.statusLabel.text = view.status
        self.ui.progressBar.setVisible(view.progress is not None)
        if view.progress is not None:
            self.ui.progressBar.setRange(0, view.progress[1])
            self.ui.progressBar.value = view.progress[0]
        table = self.ui.confidenceTable
        table.setRowCount(len(view.rows))
        for r, row in enumerate(view.rows):
            for c, value in enumerate((str(row.index), row.status, f"{row.confidence:.2f}", row.reason)):
                table.setItem(r, c, qt.QTableWidgetItem(value))
        for dialog in self.panel.take_dialogs():
            logging.error(dialog.details or dialog.message)
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(dialog.message, detailedText=dialog.details)

    def onLocalCheckpointChanged(self, path: str) -> None:
        qt.QSettings().setValue(SETTINGS_LOCAL_CHECKPOINT, path)
        self.panel.local_checkpoint = path
        self._render()

    # -- observers ---------------------------------------------------------------------------------------

    def _observePointLists(self, nodes) -> None:
        """Re-segment (debounced) whenever a point of the two lists is placed, moved or removed."""
        nodes = [n for n in nodes if n is not None]
        if nodes == self._observedPointLists:
            return
        # One callback per event: VTK hands Python callbacks the event *name*, and custom MRML events
        # arrive as "NoEvent", so the callback cannot tell them apart by comparing the event id.
        events = (
            (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced),
            (slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPointsEdited),
            (slicer.vtkMRMLMarkupsNode.PointRemovedEvent, self.onPointsEdited),
        )
        for node in self._observedPointLists:
            for eventId, callback in events:
                self.removeObserver(node, eventId, callback)
        for node in nodes:
            for eventId, callback in events:
                self.addObserver(node, eventId, callback)
        self._observedPointLists = nodes

    def _observeSliceNodes(self, observe: bool = True) -> None:
        """Pre-compute embeddings near the slice on screen (debounced) while the module is shown."""
        for node in self._observedSliceNodes:
            self.removeObserver(node, vtk.vtkCommand.ModifiedEvent, self.onSliceNodeModified)
        self._observedSliceNodes = self.logic.sliceNodes() if observe else []
        for node in self._observedSliceNodes:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onSliceNodeModified)

    def onPointPlaced(self, caller, event) -> None:
        if self._parameterNode is not None:
            self.panel.point_placed(self._parameterNode, caller)
        self.onPointsEdited(caller, event)

    def onPointsEdited(self, caller, event) -> None:
        if self._parameterNode is None:
            return
        self._render()
        if self.panel.wants_live_update(self._parameterNode, self.parent.isEntered):
            self._liveUpdateTimer.start()

    def onSliceNodeModified(self, caller, event) -> None:
        self._prefetchTimer.start()

    # -- actions -------------------------------------------------------------------------------------------

    def _ensureRequirements(self, interactive: bool, download: bool = False) -> bool:
        """Ask before installing anything (dialogs belong here, never in the Logic); the panel says what
        is missing, the Logic installs it."""
        while True:
            state = self.panel.requirements(download)
            if state.ready:
                return True
            if not interactive or slicer.app.testingEnabled():
                self.panel.say(state.message)
                self._render()
                return False
            if not slicer.util.confirmOkCancelDisplay(state.message + "\n\n" + _("Install now?")):
                self.panel.say(_("Installation declined; the model cannot run."))
                self._render()
                return False
            try:
                if state.torch_problem:  # torch first; the loop checks everything again afterwards
                    installer, label = self.logic.startTorchInstall(), _("Installing PyTorch…")
                    cancelled = _("Installation cancelled; PyTorch may be partly installed.")
                else:
                    installer = self.logic.startPackageInstall(state.missing)
                    label = _("Installing {packages}…").format(packages=", ".join(state.missing))
                    cancelled = _("Installation cancelled; nothing was installed.")
                if not _installWithProgress(installer, label, cancelled, self.panel):
                    return False
            except Exception as error:
                slicer.util.errorDisplay(_("Installation failed: {error}").format(error=error))
                return False

    def _started(self, started: bool, segmentId: str = "") -> None:
        """An action was asked of the panel: show the segment it writes into, and poll if it started."""
        if segmentId:
            self.ui.segmentEditorWidget.setCurrentSegmentID(segmentId)
        if started:
            self._startPolling()
        self._render()

    def onSegment(self, direction: str, interactive: bool = True) -> None:
        """Segment the prompted slice ("none") or propagate; runs in the engine process."""
        if self._parameterNode is None or not self._ensureRequirements(interactive):
            return
        editor = self.ui.segmentEditorWidget
        segmentId = self.panel.segment(self._parameterNode, direction, editor.currentSegmentID(),
                                       _undoSaver(editor, self._parameterNode), interactive)  # fmt: skip
        self._started(segmentId is not None, segmentId or "")

    def onPropagateFromHere(self) -> None:
        if self._parameterNode is None or not self._ensureRequirements(True):
            return
        editor = self.ui.segmentEditorWidget
        segmentId = self.panel.propagate_from_here(self._parameterNode, editor.currentSegmentID(),
                                                   _undoSaver(editor, self._parameterNode))  # fmt: skip
        self._started(segmentId is not None, segmentId or "")

    def onLiveUpdate(self) -> None:  # never installs (no dialogs from a timer): the first click sets up
        action = self.panel.live_update(self._parameterNode) if self._parameterNode is not None else "skip"
        if action == "later":
            self._liveUpdateTimer.start()
        elif action == "run":
            self.onSegment("none", interactive=False)

    def onPrefetch(self) -> None:
        if self._parameterNode is not None and self.panel.prefetch(self._parameterNode):
            self._startPolling()

    def onCancel(self) -> None:
        self.panel.cancel()
        self._render()

    def onDownloadModel(self) -> None:
        if self._parameterNode is None or not self._ensureRequirements(True, download=True):
            return
        self._started(self.panel.download(self._parameterNode))

    def onToggleIncludeExclude(self) -> None:
        if self._parameterNode is None:
            return
        self.panel.toggle_placement(self._parameterNode)
        self._updateMarkupsWidgets()
        self._render()

    def onConfidenceCellClicked(self, row: int, column: int) -> None:
        rows = self.panel.activity.rows
        location = self.panel.row_location(rows[row]) if 0 <= row < len(rows) else None
        if location is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*location, True)

    def onExportDicomSeg(self) -> None:
        if self._parameterNode is None:
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export DICOM-SEG"), "",
                                              _("DICOM files (*.dcm)"))  # fmt: skip
        if path:
            self._started(self.panel.export_dicom_seg(self._parameterNode, path))

    # -- engine replies (main thread, from the poll timer) ---------------------------------------------

    def _startPolling(self) -> None:
        if not self._pollTimer.isActive():
            self._pollTimer.start()

    def onPollWorker(self) -> None:
        if not self.panel.poll():
            self._pollTimer.stop()
        self._render()


def _waitProcessingEvents(milliseconds: int) -> None:
    """Let the GUI run for `milliseconds` without spinning: `processEvents` with a time limit returns at once
    when no event is pending, which turned the poll loop into a busy loop on the GUI thread."""
    loop = qt.QEventLoop()
    qt.QTimer.singleShot(milliseconds, loop.quit)
    loop.exec_()


def _installWithProgress(installer, label: str, cancelled: str, panel) -> bool:
    """An installer's child processes (the engine's packages, or PyTorch), polled with progress and Cancel;
    the GUI keeps running meanwhile."""
    dialog = qt.QProgressDialog(label, _("Cancel"), 0, 0, slicer.util.mainWindow())
    dialog.setWindowModality(qt.Qt.WindowModal)
    dialog.show()
    progress = None
    try:
        progress = installer.poll()
        while not progress.finished:
            if dialog.wasCanceled:
                panel.say(cancelled)
                return False
            dialog.setLabelText(progress.line or dialog.labelText)
            _waitProcessingEvents(POLL_INTERVAL_MS)
            progress = installer.poll()
    finally:
        if progress is None or not progress.finished:  # Cancel, or an error while polling: no orphan pip
            installer.cancel()
        dialog.close()
    if progress.error:
        raise RuntimeError(progress.error)
    return True


def _undoSaver(editor, parameterNode):
    """The embedded editor's undo step, saved before the first slice is written; the editor keeps the history
    of its own segmentation only, so nothing is saved if the user switched to another one meanwhile."""

    def save():
        current, target = editor.segmentationNode(), parameterNode.outputSegmentation
        if current is not None and target is not None and current.GetID() == target.GetID():
            editor.saveStateForUndo()

    return save


def _singleShotTimer(delayMs: int, callback):
    timer = qt.QTimer()
    timer.setSingleShot(True)
    timer.setInterval(delayMs)
    timer.connect("timeout()", callback)
    return timer


#
# SAMMed2DSegmentLogic
#


class SAMMed2DSegmentLogic(ScriptedLoadableModuleLogic):
    """The application's objects handed to the library: the panel model (SAMMed2DSegmentLib.mrml.panel) does
    the work, on this scene, with an engine process started with Slicer's own Python and this extension's
    private package folder. Usable from the Python console and the self-test without the Widget; shows no
    dialog."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from SAMMed2DSegmentLib.mrml.panel import PanelModel

        self.panel = PanelModel(
            self.headlessScene(), self.makeController, self.requirements,
            lambda: getattr(slicer, "dicomDatabase", None),
        )  # fmt: skip

    def getParameterNode(self):
        return SAMMed2DSegmentParameterNode(super().getParameterNode())

    def makeController(self):
        """A controller with its engine client (the engine process starts with its first request)."""
        from SAMMed2DSegmentLib.mrml.controller import InteractiveSegmentation
        from SAMMed2DSegmentLib.service.client import EngineClient

        client = EngineClient(python=self.pythonExecutable(), package_dirs=self.requirements().package_dirs)
        return InteractiveSegmentation(
            slicer.mrmlScene, client, self.segmentEditorNode(), slicer.app.applicationLogic()
        )

    def shutdown(self) -> None:
        self.panel.shutdown()

    # -- the application's objects -----------------------------------------------------------------------

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's own Python (PythonSlicer: qSlicerCoreApplication.cxx sets sys.executable to it)."""
        import shutil
        import sys

        found = sys.executable or shutil.which("PythonSlicer")
        if not found:
            raise RuntimeError(_("Slicer's Python interpreter (PythonSlicer) was not found."))
        return found

    @staticmethod
    def headlessScene():
        """The application's scene and logics in the form the MRML bridge takes."""
        from SAMMed2DSegmentLib.mrml.scene import HeadlessScene

        return HeadlessScene(
            slicer.mrmlScene,
            slicer.app.applicationLogic(),
            slicer.modules.colors.logic(),
            slicer.modules.volumes.logic(),
            slicer.modules.segmentations.logic(),
            slicer.modules.markups.logic(),
        )

    @staticmethod
    def segmentEditorNode():
        """This module's own segment editor node (a singleton, so it is not shared with Segment Editor)."""
        node = slicer.mrmlScene.GetSingletonNode("SAMMed2DSegment", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("SAMMed2DSegment")
            node = slicer.mrmlScene.AddNode(node)
        return node

    @staticmethod
    def displayedVolume():
        from SAMMed2DSegmentLib.mrml.views import displayed_volume

        return displayed_volume(slicer.mrmlScene)

    @staticmethod
    def sliceNodes() -> list:
        from SAMMed2DSegmentLib.mrml.views import slice_nodes

        return slice_nodes(slicer.mrmlScene)

    # -- dependencies ------------------------------------------------------------------------------------

    @staticmethod
    def requirementsPath() -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    @classmethod
    def packageFolder(cls) -> str:
        """This extension's private package folder, versioned by Python and requirements; only the engine
        process puts it on its sys.path, so nothing Slicer bundles is upgraded or shadowed in Slicer."""
        from SAMMed2DSegmentLib import requirements

        return str(requirements.package_folder(cls.requirementsPath()))

    def requirements(self, download: bool = False):
        """What must be installed before the engine can run (a download needs nothing: standard library)."""
        from SAMMed2DSegmentLib import requirements

        if download:
            return requirements.check_download_requirements()
        return requirements.check_requirements(self.requirementsPath(), self.packageFolder())

    def startTorchInstall(self):
        """PyTorch with light-the-torch (the PyTorch extension's command), run from a private folder with the
        pip it is made for (Slicer's own pip is left as it is), in child processes the caller polls;
        whether torch is then usable is read from its metadata: it is never imported here."""
        from SAMMed2DSegmentLib import requirements
        from SAMMed2DSegmentLib.torch_install import TorchInstall

        installer = TorchInstall.in_slicer(self.pythonExecutable(), requirements.torch_requirement())
        installer.start()
        return installer

    def startPackageInstall(self, packages):
        """pip into the private folder (`--target`, `--no-deps`: nothing of Slicer's changes), in a child
        process the caller polls."""
        from SAMMed2DSegmentLib.installer import PipInstall

        installer = PipInstall(self.pythonExecutable(), list(packages), self.packageFolder())
        installer.start()
        return installer


#
# SAMMed2DSegmentTest
#


class SAMMed2DSegmentTest(ScriptedLoadableModuleTest):
    """Self-test run inside the Slicer application (Reload and Test, SelfTests module, or ctest). The checks
    themselves are SAMMed2DSegmentLib.mrml.self_test's, which Testing/test_self_test.py also runs headless;
    here they get the application's scene, DICOM database and logic. It never writes the user's settings
    or DICOM database."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Reload and Test calls this directly (ScriptedLoadableModule.py:83-85), where a skipped test would
        show as a failure: the reason is shown instead."""
        import unittest

        for test in (
            self.test_SAMMed2DSegmentLogicLoads,
            self.test_SAMMed2DSegmentDicomSegmentPropagateUndoExport,
        ):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as skipped:
                self.delayDisplay(f"Skipped: {skipped}")

    def test_SAMMed2DSegmentLogicLoads(self):
        """The parameter node has its defaults and validates choices (needs Slicer's parameterNodeWrapper);
        the rest is the library's check, which also runs headless."""
        from SAMMed2DSegmentLib.mrml import self_test

        self.delayDisplay("Starting the test")
        logic = SAMMed2DSegmentLogic()
        parameterNode = logic.getParameterNode()
        self.assertIn(parameterNode.axis, AXES)
        self.assertIn(parameterNode.device, DEVICES)
        self.assertIn(parameterNode.model, MODELS)
        parameterNode.axis = "coronal"
        self.assertEqual(logic.getParameterNode().axis, "coronal")
        with self.assertRaises(ValueError):
            parameterNode.axis = "oblique"
        self_test.check_logic_loads(logic.panel, slicer.app.temporaryPath)
        self.delayDisplay("Test passed")

    def test_SAMMed2DSegmentDicomSegmentPropagateUndoExport(self):
        """A synthetic CT series through a temporary DICOM database, segmented, propagated, undone and
        exported as DICOM-SEG in the engine process. Skipped, with the reason, when PyTorch or the engine's
        packages are missing: a test must not install gigabytes (the extensions factory has no PyTorch)."""
        import tempfile

        from DICOMLib import DICOMUtils

        from SAMMed2DSegmentLib.mrml import self_test

        logic = SAMMed2DSegmentLogic()
        state = logic.requirements()
        if not state.ready:
            self.skipTest(f"the engine test needs what is missing: {state.message}")
        with tempfile.TemporaryDirectory() as folder, DICOMUtils.TemporaryDICOMDatabase() as database:
            self.delayDisplay("Writing and loading a synthetic CT series")
            seriesUID = self_test.write_synthetic_ct_series(folder)
            DICOMUtils.importDicom(folder, database)
            loaded = DICOMUtils.loadSeriesByUID([seriesUID])
            self.assertEqual(len(loaded), 1)
            volumeNode = slicer.mrmlScene.GetNodeByID(loaded[0])
            self.delayDisplay("Segmenting, propagating, undoing and exporting in the engine process")
            self_test.check_segment_propagate_undo_export(
                logic.headlessScene(), logic.makeController, volumeNode, database, folder
            )
        logic.shutdown()
        self.delayDisplay("Test passed")
