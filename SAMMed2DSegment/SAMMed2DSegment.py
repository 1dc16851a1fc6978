"""SAM-Med2D interactive segmentation module for 3D Slicer.

This file is thin Qt + MRML glue. The segmentation engine lives in SAMMed2DSegmentLib/, which imports without
the Slicer application; torch and the engine are imported only inside the functions that need them, so the
module loads (and the Extensions Manager can install torch through the PyTorch extension) before they exist.

Threads: the model runs on one persistent background thread (SAMMed2DSegmentLib.service.worker).
"""

import importlib.util
import logging
import os
import re
import threading
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

#: Oldest torch release the engine is written for (passed to the PyTorch extension's installer).
MINIMUM_TORCH_VERSION = "2.1"

# Choices shown in the panel. They mirror the library's constants (geometry.AXES, weights.REGISTRY,
# session.WINDOW_CHOICES); Testing/test_module_script.py checks that they agree, since the library cannot
# be imported at module load time.
AXES = ["axial", "coronal", "sagittal"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
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
        self.parent.dependencies = []  # the PyTorch extension is checked when torch is first needed
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
    model: Annotated[str, Choice(MODELS)] = "demo"
    iouThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    window: Annotated[str, Choice(WINDOWS)] = "auto"
    windowLevel: float = 40.0
    windowWidth: Annotated[float, WithinRange(1.0, 100000.0)] = 400.0
    liveUpdate: bool = True


#
# SAMMed2DSegmentWidget
#


class SAMMed2DSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; no computation here."""

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingMarkupsWidgets = False
        self._observedPointLists = []
        self._observedSliceNodes = []
        self._toggleShortcut = None

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMMed2DSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # The .ui connects the top-level qMRMLWidget's "mrmlSceneChanged(vtkMRMLScene*)" signal to each MRML
        # widget's "setMRMLScene(vtkMRMLScene*)" slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        # Logic implements everything that must also run without the GUI.
        self.logic = SAMMed2DSegmentLogic()
        self.logic.logCallback = self._showStatus

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
        _callIfPresent(editor, "setSourceVolumeNodeSelectorVisible", False)
        _callIfPresent(editor, "setSwitchToSegmentationsButtonVisible", False)
        editor.setEffectNameOrder(["Paint", "Erase", "Scissors", "Islands", "Smoothing"])
        editor.unorderedEffectsVisible = False

        self.ui.segmentSliceButton.connect("clicked(bool)", lambda: self.onSegment("none"))
        self.ui.propagateUpButton.connect("clicked(bool)", lambda: self.onSegment("up"))
        self.ui.propagateDownButton.connect("clicked(bool)", lambda: self.onSegment("down"))
        self.ui.propagateBothButton.connect("clicked(bool)", lambda: self.onSegment("both"))
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.toggleIncludeExcludeButton.connect("clicked(bool)", self.onToggleIncludeExclude)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.confidenceTable.connect("cellClicked(int,int)", self.onConfidenceCellClicked)
        self.ui.localCheckpointPathLineEdit.connect(
            "currentPathChanged(QString)", self.onLocalCheckpointChanged
        )
        self.ui.localCheckpointPathLineEdit.currentPath = qt.QSettings().value(SETTINGS_LOCAL_CHECKPOINT, "")

        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False

        # The worker is polled only while it has work (no timer that runs forever).
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollWorker)
        self._liveUpdateTimer = _singleShotTimer(LIVE_UPDATE_DELAY_MS, self.onLiveUpdate)
        self._prefetchTimer = _singleShotTimer(PREFETCH_DELAY_MS, self.onPrefetch)

        # "T" switches point placement between the include and the exclude list (enabled while shown).
        self._toggleShortcut = qt.QShortcut(qt.QKeySequence("T"), slicer.util.mainWindow())
        self._toggleShortcut.connect("activated()", self.onToggleIncludeExclude)
        self._toggleShortcut.setEnabled(False)

        # These connections ensure that we update parameter node when scene is closed.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Make sure parameter node is initialized (needed for module reload).
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()
        for timer in (self._pollTimer, self._liveUpdateTimer, self._prefetchTimer):
            timer.stop()  # a pending single-shot must not call into a destroyed widget (module reload)
        if self._toggleShortcut is not None:
            self._toggleShortcut.setParent(None)
            self._toggleShortcut = None
        self.logic.shutdown()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self._toggleShortcut.setEnabled(True)
        self._observeSliceNodes()
        _callIfPresent(self.ui.segmentEditorWidget, "installKeyboardShortcuts")  # Ctrl+Z / Ctrl+Y in views

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        self._toggleShortcut.setEnabled(False)
        self._observeSliceNodes(observe=False)
        self._liveUpdateTimer.stop()
        self._prefetchTimer.stop()
        self.ui.segmentEditorWidget.setActiveEffect(None)  # stop painting when the module is left
        _callIfPresent(self.ui.segmentEditorWidget, "uninstallKeyboardShortcuts")
        # As Slicer's Segment Editor module does: the views stop feeding events to the embedded editor.
        self.ui.segmentEditorWidget.removeViewObservations()
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module).
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed: running work is cancelled and its results dropped."""
        self.logic.onSceneClosing()
        self._liveUpdateTimer.stop()
        self._prefetchTimer.stop()
        self._observePointLists([])
        self.ui.confidenceTable.setRowCount(0)
        self.setParameterNode(None)
        # As Slicer's Segment Editor module does before the nodes go away.
        self.ui.segmentEditorWidget.setSegmentationNode(None)
        self.ui.segmentEditorWidget.removeViewObservations()

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        # The editor needs its node before it is given a segmentation (setParameterNode does that).
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.setParameterNode(self.logic.getParameterNode())

        # Select a volume if nothing is selected yet: the one shown in the views, else the first one.
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = self.logic.displayedVolume()

    def setParameterNode(self, inputParameterNode) -> None:
        """
        Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated
        immediately.

        :param inputParameterNode: a SAMMed2DSegmentParameterNode, or None.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )
        self._parameterNode = inputParameterNode
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
        """Show the parameter node's point lists in the two markups widgets."""
        if self._parameterNode is None:
            return
        widgets = (self.ui.includePointsWidget, self.ui.excludePointsWidget)
        self._updatingMarkupsWidgets = True
        # enterPlaceModeOnNodeChange is meant for a list the user picks or creates; showing both lists here
        # would otherwise arm placement for the include and then the exclude list (the first click after
        # entering the module would become an exclude point).
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
            if editor.segmentationNode() is not pn.outputSegmentation:
                editor.setSegmentationNode(pn.outputSegmentation)
            _callIfPresent(editor, "setSourceVolumeNode", pn.inputVolume)
        self._updateGuiState()

    def _updateGuiState(self) -> None:
        """Enable what can be used now, and say why the rest cannot."""
        pn = self._parameterNode
        busy = self.logic.busy
        hasVolume = pn is not None and pn.inputVolume is not None
        hasPrompt = pn is not None and bool(
            pn.promptROI or (pn.includePoints and pn.includePoints.GetNumberOfDefinedControlPoints() > 0)
        )
        canRun = hasVolume and hasPrompt
        for button in (
            self.ui.segmentSliceButton,
            self.ui.propagateUpButton,
            self.ui.propagateDownButton,
            self.ui.propagateBothButton,
        ):
            button.enabled = canRun
        if not hasVolume:
            tip = _("Select the input volume first.")
        elif not hasPrompt:
            tip = _("Place at least one include point (or a box) on a slice of the input volume.")
        else:
            tip = ""
        self.ui.segmentSliceButton.toolTip = tip or _(
            "Segment the slice that holds the points (Ctrl+Z undoes)."
        )
        self.ui.cancelButton.enabled = busy
        custom = pn is not None and pn.window == "custom"
        self.ui.windowLevelSpinBox.enabled = custom
        self.ui.windowWidthSpinBox.enabled = custom
        localModel = pn is not None and pn.model == LOCAL_MODEL
        self.ui.localCheckpointLabel.setVisible(localModel)
        self.ui.localCheckpointPathLineEdit.setVisible(localModel)
        self.ui.downloadModelButton.setVisible(not localModel)
        if pn is not None:
            self.ui.modelStatusLabel.text = self.logic.modelStatus(pn.model, self._localCheckpoint())
        self.ui.exportDicomSegButton.enabled = bool(
            hasVolume and pn.outputSegmentation and not busy and self.logic.volumeFromDicom(pn.inputVolume)
        )

    def _localCheckpoint(self) -> str:
        return self.ui.localCheckpointPathLineEdit.currentPath

    def onLocalCheckpointChanged(self, path: str) -> None:
        qt.QSettings().setValue(SETTINGS_LOCAL_CHECKPOINT, path)
        self._updateGuiState()

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
            for event, callback in events:
                self.removeObserver(node, event, callback)
        for node in nodes:
            for event, callback in events:
                self.addObserver(node, event, callback)
        self._observedPointLists = nodes

    def _observeSliceNodes(self, observe: bool = True) -> None:
        """Pre-compute embeddings near the slice on screen (debounced) while the module is shown."""
        for node in self._observedSliceNodes:
            self.removeObserver(node, vtk.vtkCommand.ModifiedEvent, self.onSliceNodeModified)
        self._observedSliceNodes = []
        if not observe:
            return
        self._observedSliceNodes = self.logic.sliceNodes()
        for node in self._observedSliceNodes:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onSliceNodeModified)

    def onPointPlaced(self, caller, event) -> None:
        """A point was placed: take the axis from the view it was placed in, then re-segment."""
        pn = self._parameterNode
        if pn is not None and pn.followView:
            count = caller.GetNumberOfControlPoints()
            if count:
                position = [0.0, 0.0, 0.0]
                caller.GetNthControlPointPositionWorld(count - 1, position)
                axis = self.logic.axisForPoint(position)
                if axis and axis != pn.axis:
                    pn.axis = axis
        self.onPointsEdited(caller, event)

    def onPointsEdited(self, caller, event) -> None:
        pn = self._parameterNode
        if pn is None:
            return
        self._updateGuiState()
        # Only while the panel is shown: edits made in other modules do not rewrite the segmentation.
        if pn.liveUpdate and self.parent.isEntered:
            self._liveUpdateTimer.start()

    def onSliceNodeModified(self, caller, event) -> None:
        self._prefetchTimer.start()

    # -- actions -------------------------------------------------------------------------------------------

    def onSegment(self, direction: str, interactive: bool = True) -> None:
        """Segment the prompted slice ("none") or propagate; runs in the background."""
        pn = self._parameterNode
        if pn is None:
            return
        try:
            # A failed load (bad file, device not available) is shown, not only logged.
            self.logic.requestModel(pn.model, pn.device, self._localCheckpoint(), onError=self._onJobError)
            segmentationNode, segmentId = self.logic.ensureOutput(
                pn.inputVolume, pn.outputSegmentation, self.ui.segmentEditorWidget.currentSegmentID()
            )
            if pn.outputSegmentation is not segmentationNode:
                pn.outputSegmentation = segmentationNode
            editor = self.ui.segmentEditorWidget
            editor.setCurrentSegmentID(segmentId)

            def saveUndoState(segmentationNode=segmentationNode):
                # The editor keeps the history of its own segmentation only: if the user switched to another
                # one while the model ran, saving now would record the wrong node.
                current = editor.segmentationNode()
                if current is not None and current.GetID() == segmentationNode.GetID():
                    editor.saveStateForUndo()

            self.logic.startSegmentation(
                pn.inputVolume,
                pn.includePoints,
                pn.excludePoints,
                pn.promptROI,
                segmentationNode,
                segmentId,
                axis=pn.axis,
                direction=direction,
                window=pn.window,
                windowLevel=pn.windowLevel,
                windowWidth=pn.windowWidth,
                iouThreshold=pn.iouThreshold,
                saveUndoState=saveUndoState,
                onDone=self._onSegmentationDone,
                onError=self._onJobError,
                onProgress=self._onSliceProgress,
                preview=not interactive,
            )
        except Exception as error:
            if interactive:
                slicer.util.errorDisplay(_("Segmentation could not start: {error}").format(error=error))
            else:
                self._showStatus(str(error))
            return
        self._showBusy(_("Segmenting…") if direction == "none" else _("Propagating…"))

    def onLiveUpdate(self) -> None:
        # Never from a timer: installation dialogs. The first "Segment this slice" sets things up.
        if not self.logic.requirementsReady or not self.ui.segmentSliceButton.enabled:
            return
        if self.logic.busy:  # e.g. a prefetch started by scrolling: try again shortly, do not drop the edit
            self._liveUpdateTimer.start()
            return
        self.onSegment("none", interactive=False)

    def onPrefetch(self) -> None:
        pn = self._parameterNode
        if pn is None or pn.inputVolume is None or self.logic.busy:
            return
        self.logic.prefetchAroundViews(pn.inputVolume, pn.axis, pn.window, pn.windowLevel, pn.windowWidth)
        self._startPolling()

    def onCancel(self) -> None:
        self.logic.cancel()
        self._showStatus(_("Stopping… slices already finished are kept."))

    def onDownloadModel(self) -> None:
        pn = self._parameterNode
        if pn is None:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be downloaded."), waitCursor=False):
            self.logic.startDownload(
                pn.model,
                onProgress=self._onDownloadProgress,
                onDone=self._onDownloadDone,
                onError=self._onJobError,
            )
            self._showBusy(_("Downloading the model…"))
            self.ui.progressBar.setRange(0, 100)

    def onToggleIncludeExclude(self) -> None:
        """Place include points, or exclude points if include points are being placed (key: T)."""
        if self._parameterNode is None:
            return
        self.logic.ensurePointLists(self._parameterNode)
        self.logic.togglePlacement(self._parameterNode)

    def onConfidenceCellClicked(self, row: int, column: int) -> None:
        pn = self._parameterNode
        item = self.ui.confidenceTable.item(row, 0)
        if pn is None or pn.inputVolume is None or item is None:
            return
        x, y, z = self.logic.sliceCenter(pn.inputVolume, self.logic.lastAxis, int(item.text()))
        slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)

    def onExportDicomSeg(self) -> None:
        pn = self._parameterNode
        if pn is None:
            return
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export DICOM-SEG"), "", _("DICOM files (*.dcm)")
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("DICOM-SEG export failed."), waitCursor=True):
            written = self.logic.exportDicomSeg(pn.outputSegmentation, pn.inputVolume, path)
            self._showStatus(_("DICOM-SEG written to {path}").format(path=written))

    # -- worker results (main thread, from the poll timer) ---------------------------------------------

    def _startPolling(self) -> None:
        if not self._pollTimer.isActive():
            self._pollTimer.start()

    def onPollWorker(self) -> None:
        self.logic.poll()
        if not self.logic.busy:
            self._pollTimer.stop()
            self.ui.progressBar.hide()
            self._updateGuiState()

    def _showBusy(self, text: str) -> None:
        self.ui.progressBar.setRange(0, 0)  # busy indicator: the number of slices is not known beforehand
        self.ui.progressBar.show()
        self._showStatus(text)
        self._startPolling()
        self._updateGuiState()

    def _showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def _onSliceProgress(self, outcome) -> None:
        self._showStatus(
            _("Slice {index}: {status}, predicted IoU {iou:.2f}").format(
                index=outcome.index, status=outcome.status, iou=outcome.predicted_iou
            )
        )

    def _onDownloadProgress(self, progress) -> None:
        done, total = progress
        if total:
            self.ui.progressBar.value = int(100 * done / total)
        self._showStatus(_("Downloaded {mb:.0f} MB").format(mb=done / 1e6))

    def _onDownloadDone(self, path) -> None:
        self._showStatus(_("Model ready: {path}").format(path=path))
        self._updateGuiState()

    def _onSegmentationDone(self, summary: dict) -> None:
        self._showStatus(summary["message"])
        table = self.ui.confidenceTable
        rows = summary["rows"]
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            values = [str(row.index), row.status, f"{row.confidence:.2f}", row.reason]
            for c, value in enumerate(values):
                table.setItem(r, c, qt.QTableWidgetItem(value))

    def _onJobError(self, error, details: str) -> None:
        logging.error(details)
        self._showStatus(str(error))
        if not slicer.app.testingEnabled():
            slicer.util.errorDisplay(str(error), detailedText=details)


def _singleShotTimer(delayMs: int, callback):
    timer = qt.QTimer()
    timer.setSingleShot(True)
    timer.setInterval(delayMs)
    timer.connect("timeout()", callback)
    return timer


def _callIfPresent(obj, method: str, *args) -> None:
    """Call a method that only newer Slicer versions have (e.g. 'Source' replaced 'Master' in 5.2)."""
    if hasattr(obj, method):
        getattr(obj, method)(*args)


#
# SAMMed2DSegmentLogic
#


class SAMMed2DSegmentLogic(ScriptedLoadableModuleLogic):
    """All actual work goes here (or into SAMMed2DSegmentLib): usable from the Python console and tests,
    without an instance of the Widget. Takes nodes and values as arguments, never widgets.

    Synchronous calls (`segment`, `exportDicomSeg`) suit the console and the self-test; the `start…`
    methods run on the background worker and deliver their results through `poll()`, which must be called
    on the main thread (the Widget does it from a timer) and is where MRML gets written.
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.model = None
        self.predictor = None
        self.session = None  # engine.session.SegmentationSession, used on the worker thread only
        self.checkpointPath = None
        self.checkpointInfo = None
        self.device = None
        self.lastAxis = "axial"
        self.lastSegmentation = None  # SAMMed2DSegmentLib.engine.segmenter.VolumeSegmentation of the last run
        #: Optional function taking one string; receives the progress messages (e.g. to show them in a GUI).
        self.logCallback = None
        self._worker = None
        self._requestedModel = None  # (path, device) of the model loaded or being loaded
        self._loadedModel = None  # (path, device) of the model the session holds (set on the worker)
        self.requirementsReady = False  # set once torch and the requirements were found or installed
        self._snapshot = None
        self._histories = {}
        self._provenance = {}  # (segmentation node ID, segment name) → dicom_seg.Provenance of its last run

    def getParameterNode(self):
        return SAMMed2DSegmentParameterNode(super().getParameterNode())

    def log(self, text: str) -> None:
        logging.info(text)
        # The callback usually updates a Qt widget: never call it from the worker thread.
        if self.logCallback and threading.current_thread() is threading.main_thread():
            self.logCallback(text)

    # -- background worker -----------------------------------------------------------------------------

    @property
    def worker(self):
        if self._worker is None:
            from SAMMed2DSegmentLib.service.worker import Worker

            self._worker = Worker("SAMMed2D worker")
        return self._worker

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.busy

    def poll(self) -> int:
        """Deliver finished background work (main thread only). Returns the number of callbacks run."""
        return self._worker.poll() if self._worker is not None else 0

    def waitForWorker(self, timeoutSeconds: float = 600.0) -> None:
        """Block, polling, until the worker is idle (self-test and console use; the GUI uses a timer)."""
        import time

        deadline = time.monotonic() + timeoutSeconds
        while self.busy:
            self.poll()
            if time.monotonic() > deadline:
                raise TimeoutError(_("The background work did not finish in time."))
            slicer.app.processEvents()
            time.sleep(0.01)
        self.poll()

    def cancel(self) -> None:
        """Stop the running job (propagation keeps the slices finished so far) and drop queued ones."""
        if self._worker is not None:
            self._worker.cancel_all()
        self._forgetUnloadedModel()

    def _forgetUnloadedModel(self) -> None:
        """A model load dropped from the queue (or failed) must be requested again by the next job; the
        model the session still holds is the one in use."""
        self._requestedModel = self._loadedModel

    def onSceneClosing(self) -> None:
        """Everything computed for the old scene is dropped, never written into the new one."""
        if self._worker is not None:
            self._worker.new_epoch()
        self._forgetUnloadedModel()
        self._snapshot = None
        self._histories.clear()
        self._provenance.clear()
        self.lastSegmentation = None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(timeout=2.0)

    # -- scene helpers -----------------------------------------------------------------------------------

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
        """The background volume of the Red view, else the first scalar volume, else None."""
        compositeNode = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
        if compositeNode is not None and compositeNode.GetBackgroundVolumeID():
            node = slicer.mrmlScene.GetNodeByID(compositeNode.GetBackgroundVolumeID())
            if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
                return node
        return slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    @staticmethod
    def sliceNodes() -> list:
        return [
            slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceNode{name}")
            for name in ("Red", "Green", "Yellow")
            if slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceNode{name}") is not None
        ]

    def axisForPoint(self, pointRas) -> str:
        """The axis of the slice view in which a point was just placed, or None when it is ambiguous."""
        from SAMMed2DSegmentLib.engine.session import axis_from_views
        from SAMMed2DSegmentLib.mrml.volumes import array_from_vtk_matrix

        views = [(n.GetOrientation(), array_from_vtk_matrix(n.GetSliceToRAS())) for n in self.sliceNodes()]
        return axis_from_views(pointRas, views)

    def ensurePointLists(self, parameterNode) -> None:
        """Create the include (green) and exclude (red) point lists when missing."""
        for field, name, color in (
            ("includePoints", "include", (0.0, 0.8, 0.3)),
            ("excludePoints", "exclude", (0.9, 0.15, 0.15)),
        ):
            if getattr(parameterNode, field) is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
                node.CreateDefaultDisplayNodes()
                node.GetDisplayNode().SetSelectedColor(*color)
                node.GetDisplayNode().SetColor(*color)
                setattr(parameterNode, field, node)

    @staticmethod
    def togglePlacement(parameterNode) -> None:
        """Place points into the other list than the one being placed now (the "T" key)."""
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        include, exclude = parameterNode.includePoints, parameterNode.excludePoints
        placingInclude = (
            interactionNode.GetCurrentInteractionMode() == interactionNode.Place
            and selectionNode.GetActivePlaceNodeID() == include.GetID()
        )
        target = exclude if placingInclude else include
        selectionNode.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selectionNode.SetActivePlaceNodeID(target.GetID())
        interactionNode.SetPlaceModePersistence(1)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def ensureOutput(
        self, volumeNode, segmentationNode=None, segmentId: str = "", segmentName: str = "SAM-Med2D"
    ):
        """The segmentation and segment to write into, created on demand (new segmentations get the
        volume's grid). Returns (segmentationNode, segmentId)."""
        if volumeNode is None:
            raise ValueError(_("Select the input volume first."))
        from SAMMed2DSegmentLib.mrml.segmentations import ensure_segment, ensure_segmentation

        segmentationNode = ensure_segmentation(
            self.headlessScene(), volumeNode, segmentationNode, name=f"{volumeNode.GetName()} segmentation"
        )
        # A node made by the selector's "Create new" has no display node yet: the result would not show.
        segmentationNode.CreateDefaultDisplayNodes()  # does nothing when it already has one
        if not segmentId or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            segmentId = ensure_segment(segmentationNode, segmentName)
        return segmentationNode, segmentId

    def historyFor(self, segmentationNode):
        """An undo history for a segmentation, for use without the Widget (console, tests): each write is
        one step; `undo(segmentationNode)` goes back one. The Widget uses the embedded Segment Editor's."""
        key = segmentationNode.GetID()
        history = self._histories.get(key)
        if history is None or history.GetSegmentation() is not segmentationNode.GetSegmentation():
            history = slicer.vtkSegmentationHistory()
            history.SetSegmentation(segmentationNode.GetSegmentation())
            self._histories[key] = history
        return history

    def undo(self, segmentationNode) -> bool:
        return bool(self.historyFor(segmentationNode).RestorePreviousState())

    # -- inputs of a job ---------------------------------------------------------------------------------

    def volumeSnapshot(self, volumeNode):
        """The voxels and geometry for the worker, copied again only when the volume changed."""
        from SAMMed2DSegmentLib.mrml.dicom_database import source_modality
        from SAMMed2DSegmentLib.mrml.interaction import snapshot_volume, volume_state_key

        if self._snapshot is None or self._snapshot.key != volume_state_key(volumeNode):
            modality = source_modality(volumeNode, getattr(slicer, "dicomDatabase", None))
            self._snapshot = snapshot_volume(volumeNode, modality)
        return self._snapshot

    @staticmethod
    def volumeFromDicom(volumeNode) -> bool:
        return bool(volumeNode is not None and volumeNode.GetAttribute("DICOM.instanceUIDs"))

    def sliceIndexAt(self, volumeNode, axis: str, pointRas):
        """Index of the `axis` slice of the volume through a world RAS point, or None outside it."""
        geometry = self.volumeSnapshot(volumeNode).geometry(axis)
        return geometry.slice_of(float(geometry.ras_to_continuous(pointRas)[0, 0]))

    def sliceCenter(self, volumeNode, axis: str, index: int) -> tuple:
        from SAMMed2DSegmentLib.engine.session import slice_center_ras

        return tuple(
            float(c) for c in slice_center_ras(self.volumeSnapshot(volumeNode).geometry(axis), index)
        )

    # -- model ---------------------------------------------------------------------------------------------

    def resolveModelPath(self, model: str, localPath: str = "") -> str:
        """The checkpoint file for a model choice: a registry name (bundled or already downloaded) or, for
        "local file", the user's file. Raises a clear error when it must be downloaded first."""
        from SAMMed2DSegmentLib.weights import registry as weights

        if model == LOCAL_MODEL:
            if not localPath:
                raise ValueError(_("Choose the checkpoint file (Model → local file)."))
            return str(weights.check_local_file(localPath))
        return str(weights.resolve_model(model))

    def modelStatus(self, model: str, localPath: str = "") -> str:
        """One line for the panel: whether the chosen model is ready, and what to do if not."""
        try:
            path = self.resolveModelPath(model, localPath)
        except Exception as error:  # shown to the user, never raised from here
            return str(error)
        if self._requestedModel and self._requestedModel[0] == path:
            return _("Loaded: {name} on {device}").format(
                name=os.path.basename(path), device=self.device or "…"
            )
        return _("Ready: {name}").format(name=os.path.basename(path))

    def startDownload(self, model: str, onProgress=None, onDone=None, onError=None):
        """Download a registry model in the background (resumable; cancel with `cancel()`)."""
        from SAMMed2DSegmentLib.weights import registry as weights

        if model not in weights.REGISTRY:
            raise ValueError(_("Only registry models can be downloaded; choose a local file instead."))
        entry = weights.REGISTRY[model]
        from SAMMed2DSegmentLib.service.worker import JobCancelled

        def job(context):
            try:
                return str(
                    weights.fetch_model(
                        entry,
                        progress=lambda done, total: context.progress((done, total)),
                        cancel=context.cancel_event,
                    )
                )
            except weights.DownloadCancelled:  # the user pressed Stop: not an error dialog
                raise JobCancelled from None

        stopped = _("Download stopped; the part already downloaded is kept and the next download resumes.")
        return self.worker.submit(
            job,
            name=f"download {model}",
            on_progress=onProgress,
            on_done=onDone,
            on_error=onError,
            on_cancelled=lambda: self.log(stopped),
            key="download",
        )

    def loadModel(self, checkpointPath: str, device: str = "auto"):
        """
        Load a SAM-Med2D checkpoint and make a predictor for it (synchronously, on the calling thread).

        :param checkpointPath: a SAM-Med2D checkpoint file (the official .pth layout, a plain state dict,
            or safetensors).
        :param device: "auto" (CUDA, then Apple MPS, then the CPU), "cpu", "cuda", "cuda:N" or "mps".
        :returns: the SAMMed2DSegmentLib.engine.predictor.SamMed2DPredictor.
        :raises ValueError: the file does not exist, or the device is unknown or not available.
        """
        if not checkpointPath or not os.path.isfile(checkpointPath):
            raise ValueError(_("Checkpoint file not found: {path}").format(path=checkpointPath))
        self.setupPythonRequirements()
        self._loadModel(checkpointPath, device)
        self._requestedModel = (checkpointPath, device)
        return self.predictor

    def _loadModel(self, checkpointPath: str, device: str) -> None:
        """Runs on whichever thread will run the model (the worker, in the module)."""
        from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
        from SAMMed2DSegmentLib.engine.session import SegmentationSession
        from SAMMed2DSegmentLib.weights.checkpoint import load_model, resolve_device

        torchDevice = resolve_device(device)
        logging.info("SAMMed2D: loading %s on %s", checkpointPath, torchDevice)  # may be the worker thread
        model, checkpointInfo = load_model(checkpointPath, device=torchDevice)
        self.model = model
        self.checkpointInfo = checkpointInfo
        self.predictor = SamMed2DPredictor(model)
        self.session = SegmentationSession(self.predictor)
        self.checkpointPath = checkpointPath
        self.device = str(torchDevice)
        self._loadedModel = (checkpointPath, device)

    def requestModel(self, model: str, device: str = "auto", localPath: str = "", onError=None):
        """Make sure the chosen model will be loaded before the next job: dependencies are checked here
        (main thread: installation dialogs), the loading itself is queued on the worker. Returns the job,
        or None when that model is already loaded or queued."""
        self.setupPythonRequirements()
        path = self.resolveModelPath(model, localPath)
        if self._requestedModel == (path, device):
            return None
        self._requestedModel = (path, device)

        def forget(error, details):
            self._forgetUnloadedModel()
            if onError:
                onError(error, details)

        def loaded(result):  # main thread (poll)
            self.log(
                _("Model loaded: {name} on {device}").format(name=os.path.basename(path), device=self.device)
            )

        return self.worker.submit(
            lambda context: self._loadModel(path, device),
            name="load model",
            on_done=loaded,
            on_error=forget,
        )

    # -- segmentation ------------------------------------------------------------------------------------

    def _applySegmentation(
        self,
        segmentation,
        snapshotKey,
        volumeNode,
        segmentationNode,
        segmentId,
        history,
        prompts,
        checkpointInfo,
    ):
        """Main-thread half: write the accepted slices as one undo step, remember the run's provenance for
        the DICOM-SEG export; returns a summary for the GUI."""
        from SAMMed2DSegmentLib.engine.session import confidence_table
        from SAMMed2DSegmentLib.formats.dicom_seg import build_provenance
        from SAMMed2DSegmentLib.mrml.interaction import write_result

        masks = segmentation.result.masks()
        written = 0
        if masks:
            written = write_result(
                slicer.mrmlScene,
                segmentationNode,
                segmentId,
                volumeNode,
                snapshotKey,
                segmentation.geometry,
                masks,
                history,
            )
        self.lastSegmentation = segmentation
        self.lastAxis = segmentation.geometry.axis
        if written and checkpointInfo is not None:
            points, rois, direction = prompts
            name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
            self._provenance[(segmentationNode.GetID(), name)] = build_provenance(
                points,
                rois,
                segmentation.result.slices.values(),
                model=f"SAM-Med2D {checkpointInfo.build}",
                model_sha256=checkpointInfo.sha256,
                axis=self.lastAxis,
                propagate=direction,
                segment=name,
                window=(segmentation.window.low, segmentation.window.high),
            )
        rows = confidence_table(segmentation.result)
        if segmentation.result.cancelled:
            message = _("Stopped: {n} slice(s) written.").format(n=written)
        elif not masks:
            message = _("The model found nothing at the prompts; nothing was written.")
        else:
            message = _("{n} slice(s) written; the least certain are listed first.").format(n=written)
        return {"written": written, "rows": rows, "message": message}

    def _historyArgument(self, segmentationNode, saveUndoState):
        from SAMMed2DSegmentLib.mrml.interaction import CallbackHistory

        if saveUndoState is not None:
            return CallbackHistory(segmentationNode, saveUndoState)
        return self.historyFor(segmentationNode)

    def segment(self, *args, **kwargs) -> dict:
        """
        Segment and wait (console, self-test): the same arguments as `startSegmentation` without the
        callbacks. The work still runs on the worker thread (where the model lives); this call polls it.

        :returns: {"written": slices written, "rows": per-slice confidence, least certain first, "message"}.
        :raises ValueError: missing volume or prompts, prompts off the volume, bad options; the worker's
            error when the model failed; RuntimeError when the result was dropped (scene closed, cancelled).
        """
        results, errors = [], []
        self.startSegmentation(
            *args, onDone=results.append, onError=lambda error, _: errors.append(error), **kwargs
        )
        self.waitForWorker()
        if errors:
            raise errors[0]
        if not results:
            raise RuntimeError(_("The segmentation was cancelled or its inputs were removed."))
        return results[0]

    def startSegmentation(
        self,
        volumeNode,
        includePoints,
        excludePoints,
        roiNode,
        segmentationNode,
        segmentId: str,
        axis: str = "axial",
        direction: str = "none",
        window: str = "auto",
        windowLevel: float = 40.0,
        windowWidth: float = 400.0,
        iouThreshold: float = 0.5,
        saveUndoState=None,
        onDone=None,
        onError=None,
        onProgress=None,
        preview: bool = False,
    ):
        """Segment the slice(s) holding the prompts, then propagate in `direction` ("none", "up", "down",
        "both"), in the background: results are written when `poll()` delivers them, after checking
        that the nodes still exist and the volume did not change. A `preview` (live update while points are
        placed) replaces a preview that has not started yet. The written slices are one undo step: through
        `saveUndoState` (e.g. a Segment Editor's saveStateForUndo), else the logic's own history
        (`undo(segmentationNode)`). Returns the worker job."""
        # Main-thread half: copy what the worker needs out of the nodes.
        if volumeNode is None:
            raise ValueError(_("Select the input volume first."))
        if direction not in DIRECTIONS:
            raise ValueError(_("Unknown direction {direction!r}.").format(direction=direction))
        from SAMMed2DSegmentLib.engine.propagation import PropagationSettings
        from SAMMed2DSegmentLib.engine.session import window_for
        from SAMMed2DSegmentLib.mrml.interaction import prompts_from_nodes

        snapshot = self.volumeSnapshot(volumeNode)
        points, rois = prompts_from_nodes(includePoints, excludePoints, roiNode)
        if not points and not rois:
            raise ValueError(_("Place at least one include point (or a box) first."))
        settings = PropagationSettings(iou_threshold=float(iouThreshold))

        noModel = _("No model is loaded (choose one under Model).")  # translated here, on the main thread

        def run(context):
            # The session and the checkpoint it came from, read together on the worker thread, which is the
            # only one that replaces them: the run's provenance names the model that really made it.
            session, checkpointInfo = self.session, self.checkpointInfo
            if session is None:
                raise RuntimeError(noModel)
            windowValue = window_for(snapshot, window, windowLevel, windowWidth)
            segmentation = session.segment(
                snapshot,
                windowValue,
                points,
                rois,
                axis,
                direction,
                settings,
                progress=lambda count, outcome: context.progress(outcome),
                should_cancel=lambda: context.cancelled,
            )
            return segmentation, checkpointInfo

        prompts = (points, rois, direction)
        history = self._historyArgument(segmentationNode, saveUndoState)

        def done(result):
            from SAMMed2DSegmentLib.mrml.interaction import StaleResultError

            segmentation, checkpointInfo = result
            try:
                summary = self._applySegmentation(
                    segmentation,
                    snapshot.key,
                    volumeNode,
                    segmentationNode,
                    segmentId,
                    history,
                    prompts,
                    checkpointInfo,
                )
            except StaleResultError as error:
                self.log(str(error))
                return
            except Exception as error:
                import traceback

                if onError:
                    onError(error, traceback.format_exc())
                return
            if onDone:
                onDone(summary)

        return self.worker.submit(
            run,
            name=f"segment {direction}",
            on_done=done,
            on_error=onError,
            on_progress=onProgress,
            key="preview" if preview else None,
        )

    def prefetchAroundViews(
        self,
        volumeNode,
        axis: str,
        window: str = "auto",
        windowLevel: float = 40.0,
        windowWidth: float = 400.0,
    ):
        """Encode, in the background, the slices near the one shown in the view of `axis`, so the first click
        there is fast. Does nothing before a model is loaded. Returns the job or None."""
        if self.session is None or volumeNode is None:
            return None
        from SAMMed2DSegmentLib.engine.session import window_for
        from SAMMed2DSegmentLib.mrml.volumes import array_from_vtk_matrix

        views = {n.GetOrientation().lower(): n for n in self.sliceNodes()}
        if axis not in views:
            return None
        center = self.sliceIndexAt(
            volumeNode, axis, array_from_vtk_matrix(views[axis].GetSliceToRAS())[:3, 3]
        )
        if center is None:
            return None
        snapshot = self.volumeSnapshot(volumeNode)

        def run(context):
            if self.session is None:
                return []
            windowValue = window_for(snapshot, window, windowLevel, windowWidth)
            return self.session.prefetch(
                snapshot, windowValue, axis, center, should_cancel=lambda: context.cancelled
            )

        return self.worker.submit(run, name="prefetch", key="prefetch")

    # -- DICOM-SEG ---------------------------------------------------------------------------------------

    def exportDicomSeg(
        self, segmentationNode, volumeNode, outputPath: str, database=None, modelHash: str = ""
    ) -> str:
        """
        Write every segment of `segmentationNode` as a DICOM Segmentation that references the series
        `volumeNode` was loaded from (found through its DICOM.instanceUIDs attribute and the DICOM database).

        :param database: a ctkDICOMDatabase (default: slicer.dicomDatabase).
        :param modelHash: SHA-256 of the checkpoint that made the segments (default: the loaded model's).
        :raises ValueError: the volume did not come from DICOM, instances are missing, the grids differ, …
        """
        if segmentationNode is None or volumeNode is None:
            raise ValueError(_("Select the input volume and the segmentation to export."))
        from SAMMed2DSegmentLib.mrml.dicom_database import source_datasets
        from SAMMed2DSegmentLib.mrml.dicom_segmentations import export_dicom_seg

        modelHash = modelHash or (self.checkpointInfo.sha256 if self.checkpointInfo else "")
        if not modelHash:
            raise ValueError(
                _(
                    "No SAM-Med2D model was used in this session, so the DICOM-SEG cannot name it: "
                    "segment with a model first."
                )
            )
        if database is None:
            database = getattr(slicer, "dicomDatabase", None)
        datasets = source_datasets(volumeNode, database)
        build = self.checkpointInfo.build if self.checkpointInfo else "vit_b"
        provenance = {
            name: record
            for (nodeId, name), record in self._provenance.items()
            if nodeId == segmentationNode.GetID()
        }
        written = export_dicom_seg(
            segmentationNode,
            volumeNode,
            datasets,
            outputPath,
            modelHash,
            f"SAM-Med2D {build}",
            provenance=provenance,
        )
        self.log(_("DICOM-SEG written to {path}").format(path=written))
        return str(written)

    # -- dependencies ------------------------------------------------------------------------------------

    @staticmethod
    def requirementsPath() -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    def setupPythonRequirements(self, installInTesting: bool = False) -> None:
        """
        Make sure torch (from the PyTorch extension) and the packages in Resources/requirements.txt are
        installed, asking the user before installing anything. Never called at import time.

        :param installInTesting: in testing mode (ctest runs Slicer with --testing), install missing packages
            without asking instead of skipping them; the self-test needs them (PyTorchUtils installs torch
            without asking in testing mode too).
        :raises RuntimeError: the PyTorch extension is missing, or the user declined an installation.
        """
        if self.requirementsReady:
            return
        self._setupTorch()
        self._setupPackages(installInTesting)
        self.requirementsReady = True

    def _setupTorch(self) -> None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError as e:
            raise RuntimeError(
                _(
                    "This module requires the PyTorch extension. Install it from the Extensions Manager, "
                    "restart the application, and try again."
                )
            ) from e

        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            self.log(_("PyTorch is not installed yet; installing it through the PyTorch extension."))
            torch = torchLogic.installTorch(
                askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}"
            )
            if torch is None:
                raise RuntimeError(_("PyTorch is required by this module; its installation was cancelled."))
        else:
            import torch
        if _versionTuple(torch.__version__) < _versionTuple(MINIMUM_TORCH_VERSION):
            raise RuntimeError(
                _(
                    "PyTorch {installed} is installed but this module needs {required} or later. "
                    "Update it in the PyTorch Utils module (uninstall, restart, install)."
                ).format(installed=torch.__version__, required=MINIMUM_TORCH_VERSION)
            )

    def _setupPackages(self, installInTesting: bool = False) -> None:
        requirementsPath = self.requirementsPath()
        unattended = installInTesting and slicer.app.testingEnabled()  # no dialog may block a ctest run
        try:
            import slicer.packaging as slicerPackaging  # Slicer 5.12 and later
        except ImportError:
            slicerPackaging = None
        if slicerPackaging is not None:
            # Checks what is missing, asks the user, installs with a progress dialog, offers a restart.
            # Skipped in testing mode; raises RuntimeError if the user declines.
            slicerPackaging.pip_ensure(
                slicerPackaging.load_requirements(requirementsPath),
                requester="SAMMed2D",
                skip_in_testing=not unattended,  # its dialogs answer themselves in testing mode
            )
            return

        # Slicer 5.6 to 5.10: install what cannot be imported, after a confirmation.
        missing = [req for req in _readRequirements(requirementsPath) if not _requirementImportable(req)]
        if not missing:
            return
        if unattended:
            slicer.util.pip_install(missing)
            return
        if slicer.app.testingEnabled():
            logging.warning("Missing Python packages (not installed in testing mode): %s", ", ".join(missing))
            return
        message = _(
            "This module needs these Python packages, which will now be downloaded and installed: {packages}"
        )
        if not slicer.util.confirmOkCancelDisplay(message.format(packages=", ".join(missing))):
            raise RuntimeError(_("Installation of the required Python packages was cancelled."))
        slicer.util.pip_install(missing)


def _versionTuple(version: str) -> tuple:
    """'2.1.0+cu121' -> (2, 1, 0); stops at the first part that is not a number."""
    numbers = []
    for part in version.split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def _readRequirements(path: str) -> list:
    """Requirement lines of a requirements.txt file (comments, blank lines and pip options left out)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith("-")]


def _requirementImportable(requirement: str) -> bool:
    """Whether the distribution named by a requirement line can be imported (version not checked)."""
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    return importlib.util.find_spec(name.replace("-", "_").lower()) is not None


#
# SAMMed2DSegmentTest
#


class SAMMed2DSegmentTest(ScriptedLoadableModuleTest):
    """Self-test run inside the Slicer application (Reload and Test, SelfTests module, or ctest): a small
    synthetic CT series goes through a temporary DICOM database, is segmented from one include point with the
    bundled demo model, propagated, undone, and exported as DICOM-SEG. It never writes the user's settings or
    DICOM database."""

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_SAMMed2DSegmentLogicLoads()
        self.setUp()
        self.test_SAMMed2DSegmentDicomSegmentPropagateUndoExport()

    def test_SAMMed2DSegmentLogicLoads(self):
        """The engine library imports, the parameter node has its defaults, and bad input is refused."""
        self.delayDisplay("Starting the test")

        import SAMMed2DSegmentLib

        self.assertIsInstance(SAMMed2DSegmentLib.__version__, str)

        logic = SAMMed2DSegmentLogic()
        parameterNode = logic.getParameterNode()
        self.assertIn(parameterNode.axis, AXES)
        self.assertIn(parameterNode.device, DEVICES)
        self.assertIn(parameterNode.model, MODELS)
        parameterNode.axis = "coronal"
        self.assertEqual(logic.getParameterNode().axis, "coronal")
        with self.assertRaises(ValueError):
            parameterNode.axis = "oblique"

        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        parameterNode.inputVolume = volumeNode
        self.assertEqual(logic.getParameterNode().inputVolume.GetID(), volumeNode.GetID())

        self.assertTrue(os.path.isfile(logic.requirementsPath()))
        logic.setupPythonRequirements(installInTesting=True)  # exportDicomSeg needs highdicom
        with self.assertRaises(ValueError):
            logic.loadModel(os.path.join(slicer.app.temporaryPath, "no-such-checkpoint.pth"))
        with self.assertRaises(ValueError):  # not from DICOM: the message says how to get a DICOM volume
            logic.exportDicomSeg(
                slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode"),
                volumeNode,
                os.path.join(slicer.app.temporaryPath, "x.dcm"),
                modelHash="0" * 64,
            )
        self.delayDisplay("Test passed")

    def test_SAMMed2DSegmentDicomSegmentPropagateUndoExport(self):
        import tempfile

        import numpy as np
        from DICOMLib import DICOMUtils

        logic = SAMMed2DSegmentLogic()
        logic.setupPythonRequirements(installInTesting=True)  # ctest runs with --testing
        checkpoint = logic.resolveModelPath("demo")  # the model shipped with the extension

        with tempfile.TemporaryDirectory() as folder, DICOMUtils.TemporaryDICOMDatabase() as database:
            self.delayDisplay("Writing and loading a synthetic CT series")
            seriesUID = _writeSyntheticCtSeries(folder)
            DICOMUtils.importDicom(folder, database)
            loaded = DICOMUtils.loadSeriesByUID([seriesUID])
            self.assertEqual(len(loaded), 1)
            volumeNode = slicer.mrmlScene.GetNodeByID(loaded[0])
            self.assertTrue(logic.volumeFromDicom(volumeNode))

            self.delayDisplay("Segmenting one slice from one include point")
            logic.loadModel(checkpoint, "cpu")
            include = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
            center = _ijkToRas(volumeNode, (32, 32, 10))  # the centre of the bright ball
            include.AddControlPoint(*center)
            segmentationNode, segmentId = logic.ensureOutput(volumeNode)
            summary = logic.segment(
                volumeNode, include, None, None, segmentationNode, segmentId, direction="none"
            )
            self.assertEqual(summary["written"], 1)
            labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            oneSlice = int(labelmap.sum())
            self.assertGreater(oneSlice, 0)
            self.assertEqual(int(labelmap[10].sum()), oneSlice)  # only the prompted slice (k = 10)
            self.assertTrue(labelmap[10, 32, 32])  # the include point is inside the mask

            self.delayDisplay("Propagating in the background")
            done = []
            logic.startSegmentation(
                volumeNode,
                include,
                None,
                None,
                segmentationNode,
                segmentId,
                direction="both",
                onDone=done.append,
                onError=lambda error, details: self.fail(details),
            )
            logic.waitForWorker()
            self.assertEqual(len(done), 1)
            self.assertGreaterEqual(done[0]["written"], 1)
            self.assertEqual(len(done[0]["rows"]), len(logic.lastSegmentation.result.slices))
            labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            propagated = int(labelmap.sum())
            self.assertGreaterEqual(propagated, oneSlice)

            self.delayDisplay("Undo goes back one action")
            self.assertTrue(logic.undo(segmentationNode))
            labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            self.assertEqual(int(labelmap.sum()), oneSlice)

            self.delayDisplay("Exporting DICOM-SEG")
            import pydicom

            out = logic.exportDicomSeg(
                segmentationNode, volumeNode, os.path.join(folder, "seg.dcm"), database
            )
            seg = pydicom.dcmread(out)
            self.assertEqual(seg.Modality, "SEG")
            referenced = {
                i.ReferencedSOPInstanceUID
                for s in seg.ReferencedSeriesSequence
                for i in s.ReferencedInstanceSequence
            }
            self.assertEqual(referenced, set(volumeNode.GetAttribute("DICOM.instanceUIDs").split()))
            self.assertEqual(int(seg.NumberOfFrames), int(np.count_nonzero(labelmap.any(axis=(1, 2)))))
        logic.shutdown()
        self.delayDisplay("Test passed")


def _ijkToRas(volumeNode, ijk) -> list:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return list(matrix.MultiplyPoint([*ijk, 1.0])[:3])


def _writeSyntheticCtSeries(folder: str, slices: int = 20, size: int = 64) -> str:
    """A CT series of a soft-tissue ball (radius 12 px) in fat, written with pydicom; returns its UID."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    k, j, i = np.mgrid[:slices, :size, :size]
    ball = ((i - 32) ** 2 + (j - 32) ** 2 + ((k - 10) * 2.0) ** 2) <= 12**2
    voxels = np.where(ball, 60, -100).astype(np.int16)
    for index in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(os.path.join(folder, f"ct{index:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "SAMMed2D^Test", "SAMMED2D-TEST", "CT"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-32.0, -32.0, 2.0 * index]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = size, size, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = voxels[index].tobytes()
        try:
            ds.save_as(ds.filename, enforce_file_format=True)  # pydicom 3
        except TypeError:  # pydicom 2
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(ds.filename, write_like_original=False)
    return series
