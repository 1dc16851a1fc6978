"""SAM-Med2D interactive segmentation module for 3D Slicer (5.10 and 5.12).

This file is thin Qt + MRML glue. The model runs in a child process, the engine process
(SAMMed2DSegmentLib.service), started with Slicer's own Python; this process never imports torch. Why:
PythonQt keeps the GIL while Slicer's main thread waits in the Qt event loop, so a Python worker thread in
Slicer would only run while the GUI happens to run Python. The Widget polls the engine from a qt.QTimer and
never blocks; replies are written into MRML on the main thread (SAMMed2DSegmentLib.mrml.controller).
"""

import importlib.util
import logging
import os
import re
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
PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
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
    precision - the encoder's arithmetic (auto: bf16 where the processor has it and it measured faster).
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
        editor.setSourceVolumeNodeSelectorVisible(False)
        editor.setSwitchToSegmentationsButtonVisible(False)
        editor.setEffectNameOrder(["Paint", "Erase", "Scissors", "Islands", "Smoothing"])
        editor.unorderedEffectsVisible = False

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

        # Shift+T switches point placement between the include and the exclude list (enabled while shown;
        # plain "t" belongs to the slice views). No main window (--no-main-window): no shortcut.
        mainWindow = slicer.util.mainWindow()
        if mainWindow is not None:
            self._toggleShortcut = qt.QShortcut(qt.QKeySequence("Shift+T"), mainWindow)
            self._toggleShortcut.connect("activated()", self.onToggleIncludeExclude)
            self._toggleShortcut.setEnabled(False)
        # The engine process ends with Slicer even if this panel was never shown again.
        slicer.app.connect("aboutToQuit()", self.logic.shutdown)

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
        if self._toggleShortcut is not None:
            self._toggleShortcut.setEnabled(True)
        self._observeSliceNodes()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()  # Ctrl+Z / Ctrl+Y in views

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._toggleShortcut is not None:
            self._toggleShortcut.setEnabled(False)
        self._observeSliceNodes(observe=False)
        self._liveUpdateTimer.stop()
        self._prefetchTimer.stop()
        self.ui.segmentEditorWidget.setActiveEffect(None)  # stop painting when the module is left
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
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
            # Editor node, then segmentation, then source volume: a source volume without a segmentation is
            # refused with an error (vtkSlicerSegmentEditorLogic::SetSourceVolumeNode).
            if editor.segmentationNode() is not pn.outputSegmentation:
                editor.setSegmentationNode(pn.outputSegmentation)
            if pn.outputSegmentation is not None and editor.sourceVolumeNode() is not pn.inputVolume:
                editor.setSourceVolumeNode(pn.inputVolume)
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
        self.ui.propagateFromHereButton.enabled = bool(hasVolume and pn.outputSegmentation and not busy)
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

    def _options(self, direction: str):
        from SAMMed2DSegmentLib.mrml.controller import SegmentOptions

        pn = self._parameterNode
        return SegmentOptions(pn.axis, direction, pn.window, pn.windowLevel, pn.windowWidth, pn.iouThreshold)

    def _ensureRequirements(self, interactive: bool) -> bool:
        """Ask before installing anything (dialogs belong here, never in the Logic)."""
        while True:
            try:
                self.logic.checkRequirements()
                return True
            except RequirementsNeeded as needed:
                if not interactive or slicer.app.testingEnabled():
                    self._showStatus(str(needed))
                    return False
                if not slicer.util.confirmOkCancelDisplay(str(needed) + "\n\n" + _("Install now?")):
                    self._showStatus(_("Installation declined; the model cannot run."))
                    return False
                try:
                    if needed.torch:
                        self.logic.installTorch()
                    else:
                        self.logic.installEnginePackages(needed.packages)
                except Exception as error:
                    slicer.util.errorDisplay(_("Installation failed: {error}").format(error=error))
                    return False

    def _prepare(self, interactive: bool):
        """Model requested, output segment chosen; returns (segmentationNode, segmentId, saveUndoState)."""
        pn = self._parameterNode
        self.logic.requestModel(
            pn.model, pn.device, self._localCheckpoint(), onError=self._onJobError, precision=pn.precision
        )
        segmentationNode, segmentId = self.logic.ensureOutput(
            pn.inputVolume, pn.outputSegmentation, self.ui.segmentEditorWidget.currentSegmentID()
        )
        if pn.outputSegmentation is not segmentationNode:
            pn.outputSegmentation = segmentationNode
        editor = self.ui.segmentEditorWidget
        editor.setCurrentSegmentID(segmentId)

        def saveUndoState(segmentationNode=segmentationNode):
            # The editor keeps the history of its own segmentation only: if the user switched to another one
            # while the model ran, saving now would record the wrong node.
            current = editor.segmentationNode()
            if current is not None and current.GetID() == segmentationNode.GetID():
                editor.saveStateForUndo()

        return segmentationNode, segmentId, saveUndoState

    def onSegment(self, direction: str, interactive: bool = True) -> None:
        """Segment the prompted slice ("none") or propagate; runs in the engine process."""
        pn = self._parameterNode
        if pn is None or not self._ensureRequirements(interactive):
            return
        try:
            segmentationNode, segmentId, saveUndoState = self._prepare(interactive)
            self.logic.startSegmentation(
                pn.inputVolume, pn.includePoints, pn.excludePoints, pn.promptROI, segmentationNode, segmentId,
                self._options(direction), saveUndoState=saveUndoState, onSlice=self._onSliceProgress,
                onDone=self._onSegmentationDone, onError=self._onJobError,
            )  # fmt: skip
        except Exception as error:
            if interactive:
                slicer.util.errorDisplay(_("Segmentation could not start: {error}").format(error=error))
            else:
                self._showStatus(str(error))
            return
        self._showBusy(_("Segmenting…") if direction == "none" else _("Propagating…"))

    def onPropagateFromHere(self) -> None:
        """Propagate both ways from the slice on screen as the segment has it now (after a correction)."""
        pn = self._parameterNode
        if pn is None or pn.inputVolume is None or not self._ensureRequirements(True):
            return
        try:
            segmentationNode, segmentId, saveUndoState = self._prepare(True)
            index = self.logic.viewedSliceIndex(pn.inputVolume, pn.axis)
            if index is None:
                raise ValueError(_("Show a slice of the input volume in the {axis} view first.").format(
                    axis=pn.axis))  # fmt: skip
            self.logic.startPropagationFromSlice(
                pn.inputVolume, segmentationNode, segmentId, index, self._options("both"), pn.promptROI,
                saveUndoState=saveUndoState, onSlice=self._onSliceProgress, onDone=self._onSegmentationDone,
                onError=self._onJobError,
            )  # fmt: skip
        except Exception as error:
            slicer.util.errorDisplay(_("Propagation could not start: {error}").format(error=error))
            return
        self._showBusy(_("Propagating from the slice on screen…"))

    def onLiveUpdate(self) -> None:
        # Never from a timer: installation dialogs. The first "Segment this slice" sets things up.
        if not self.ui.segmentSliceButton.enabled:
            return
        if self.logic.busy:  # e.g. a propagation running: try again shortly, do not drop the edit
            self._liveUpdateTimer.start()
            return
        self.onSegment("none", interactive=False)

    def onPrefetch(self) -> None:
        pn = self._parameterNode
        if pn is None or pn.inputVolume is None or self.logic.busy:
            return
        try:
            if self.logic.prefetchAroundViews(pn.inputVolume, self._options("none")) is not None:
                self._startPolling()
        except Exception as error:  # pre-encoding is a courtesy: say why it did not happen, never raise
            logging.info("SAMMed2D: no pre-encoding: %s", error)

    def onCancel(self) -> None:
        self.logic.cancel()
        self._showStatus(_("Stopping… slices already finished are kept."))

    def onDownloadModel(self) -> None:
        pn = self._parameterNode
        if pn is None or not self._ensureRequirements(True):
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
        """Place include points, or exclude points if include points are being placed (Shift+T)."""
        pn = self._parameterNode
        if pn is None:
            return
        self.logic.ensurePointLists(pn)
        self._updateMarkupsWidgets()
        # The place button of a markups widget works only once it has a node (qSlicerMarkupsPlaceWidget).
        widget = self.ui.excludePointsWidget if self.logic.placingInclude(pn) else self.ui.includePointsWidget
        widget.placeActive(True)

    def onConfidenceCellClicked(self, row: int, column: int) -> None:
        pn = self._parameterNode
        item = self.ui.confidenceTable.item(row, 0)
        job = self.logic.lastJob
        if pn is None or pn.inputVolume is None or item is None or job is None:
            return
        x, y, z = self.logic.sliceCenter(pn.inputVolume, job.geometry.axis, int(item.text()))
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
            self.logic.startExportDicomSeg(
                pn.outputSegmentation, pn.inputVolume, path,
                onDone=lambda out: self._showStatus(_("DICOM-SEG written to {path}").format(path=out)),
                onError=self._onJobError,
            )  # fmt: skip
            self._showBusy(_("Writing the DICOM-SEG…"))

    # -- engine replies (main thread, from the poll timer) ---------------------------------------------

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

    def _onSliceProgress(self, row) -> None:
        self._showStatus(
            _("Slice {index}: {status}, predicted IoU {iou:.2f}").format(
                index=row.index, status=row.status, iou=row.predicted_iou
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

    def _onSegmentationDone(self, job) -> None:
        written, kept = len(job.written), len(job.kept)
        if job.state == "cancelled":
            message = _("Stopped: {n} slice(s) written.").format(n=written)
        elif not written:
            message = _("The model found nothing at the prompts; nothing was written.")
        else:
            message = _("{n} slice(s) written; the least certain are listed first.").format(n=written)
        if kept:
            message += " " + _("{n} slice(s) edited by hand were kept.").format(n=kept)
        self._showStatus(message)
        rows = job.table()
        table = self.ui.confidenceTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            values = [str(row.index), row.status, f"{row.confidence:.2f}", row.reason]
            for c, value in enumerate(values):
                table.setItem(r, c, qt.QTableWidgetItem(value))

    def _onJobError(self, message, details: str) -> None:
        logging.error(details or message)
        self._showStatus(str(message))
        if not slicer.app.testingEnabled():
            slicer.util.errorDisplay(str(message), detailedText=details)


def _singleShotTimer(delayMs: int, callback):
    timer = qt.QTimer()
    timer.setSingleShot(True)
    timer.setInterval(delayMs)
    timer.connect("timeout()", callback)
    return timer


#
# SAMMed2DSegmentLogic
#


class RequirementsNeeded(RuntimeError):
    """Something must be installed before the model can run; the Widget asks the user, then calls
    `installTorch()` or `installEnginePackages(packages)` (the Logic never shows a dialog)."""

    def __init__(self, message: str, torch: bool = False, packages: tuple = ()):
        super().__init__(message)
        self.torch = torch
        self.packages = tuple(packages)


class SAMMed2DSegmentLogic(ScriptedLoadableModuleLogic):
    """All actual work goes here (or into SAMMed2DSegmentLib): usable from the Python console and tests,
    without an instance of the Widget. Takes nodes and values as arguments, never widgets; shows no dialog.

    The model runs in the engine process (SAMMed2DSegmentLib.service), which this process never waits for:
    the `start…` methods return at once, and `poll()` (called by the Widget from a qt.QTimer, on the main
    thread) delivers the engine's replies and writes the slices into MRML as they arrive. The MRML side of it
    all is SAMMed2DSegmentLib.mrml.controller.InteractiveSegmentation, tested headless.
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._controller = None
        self.lastJob = None
        #: Optional function taking one string; receives the progress messages (e.g. to show them in a GUI).
        self.logCallback = None

    def getParameterNode(self):
        return SAMMed2DSegmentParameterNode(super().getParameterNode())

    def log(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # -- the engine --------------------------------------------------------------------------------------

    @property
    def controller(self):
        """The Qt-free controller and its engine client (the engine process starts on the first request)."""
        if self._controller is None:
            from SAMMed2DSegmentLib.mrml.controller import InteractiveSegmentation
            from SAMMed2DSegmentLib.service.client import EngineClient

            client = EngineClient(python=self.pythonExecutable(), package_dirs=[self.packageFolder()])
            self._controller = InteractiveSegmentation(
                slicer.mrmlScene, client, self.segmentEditorNode(), slicer.app.applicationLogic()
            )
        return self._controller

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's own Python (PythonSlicer: the launcher that sets up Slicer's Python environment)."""
        import shutil
        import sys

        found = sys.executable or shutil.which("PythonSlicer")
        if not found:
            raise RuntimeError(_("Slicer's Python interpreter (PythonSlicer) was not found."))
        return found

    @staticmethod
    def packageFolder() -> str:
        """This extension's private package folder, versioned by Python and requirements; only the engine
        process puts it on its sys.path, so nothing Slicer bundles is upgraded or shadowed in Slicer."""
        import sys

        from SAMMed2DSegmentLib.weights.cache_dir import default_cache_dir

        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-r{_requirementsDigest()}"
        return os.path.join(str(default_cache_dir()), "packages", tag)

    @property
    def busy(self) -> bool:
        return self._controller is not None and self._controller.busy

    def poll(self) -> int:
        """Deliver the engine's replies (main thread only). Returns the number of events handled."""
        return self._controller.poll() if self._controller is not None else 0

    def wait(self, job, timeoutSeconds: float = 600.0) -> None:
        """Block until a job has ended (console and self-test; the GUI polls from a timer). It reads the
        engine's replies as they come and never sleeps while the engine is busy: the engine process runs
        regardless of what this thread does."""
        self.controller.wait(job, timeoutSeconds)

    def cancel(self) -> None:
        """Stop the running job (propagation keeps the slices finished so far) and drop queued ones."""
        if self._controller is not None:
            self._controller.cancel()

    def onSceneClosing(self) -> None:
        """Everything computed for the old scene is dropped, never written into the new one."""
        if self._controller is not None:
            self._controller.scene_closing()
        self.lastJob = None

    def shutdown(self) -> None:
        if self._controller is not None:
            self._controller.shutdown()
            self._controller = None

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
    def placingInclude(parameterNode) -> bool:
        """Whether include points are being placed now (so the toggle switches to exclude)."""
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        include = parameterNode.includePoints
        return bool(
            include is not None
            and interactionNode.GetCurrentInteractionMode() == interactionNode.Place
            and selectionNode.GetActivePlaceNodeID() == include.GetID()
        )

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

    @staticmethod
    def volumeFromDicom(volumeNode) -> bool:
        return bool(volumeNode is not None and volumeNode.GetAttribute("DICOM.instanceUIDs"))

    @staticmethod
    def modality(volumeNode):
        from SAMMed2DSegmentLib.mrml.dicom_database import source_modality

        return source_modality(volumeNode, getattr(slicer, "dicomDatabase", None))

    def sliceIndexAt(self, volumeNode, axis: str, pointRas):
        """Index of the `axis` slice of the volume through a world RAS point, or None outside it."""
        geometry = self.controller.snapshot(volumeNode).geometry(axis)
        return geometry.slice_of(float(geometry.ras_to_continuous(pointRas)[0, 0]))

    def viewedSliceIndex(self, volumeNode, axis: str):
        """The `axis` slice of the volume shown in the matching view (Red/Green/Yellow), or None."""
        from SAMMed2DSegmentLib.mrml.volumes import array_from_vtk_matrix

        views = {n.GetOrientation().lower(): n for n in self.sliceNodes()}
        if axis not in views:
            return None
        return self.sliceIndexAt(volumeNode, axis, array_from_vtk_matrix(views[axis].GetSliceToRAS())[:3, 3])

    def sliceCenter(self, volumeNode, axis: str, index: int) -> tuple:
        from SAMMed2DSegmentLib.engine.session import slice_center_ras

        geometry = self.controller.snapshot(volumeNode).geometry(axis)
        return tuple(float(c) for c in slice_center_ras(geometry, index))

    # -- model ---------------------------------------------------------------------------------------------

    def resolveModelPath(self, model: str, localPath: str = "") -> str:
        """The checkpoint file for a model choice: a registry name (bundled or already downloaded) or, for
        "local file", the user's file. Raises a clear error when it must be downloaded first."""
        from SAMMed2DSegmentLib.weights import registry

        if model == LOCAL_MODEL:
            if not localPath:
                raise ValueError(_("Choose the checkpoint file (Model → local file)."))
            return str(registry.check_local_file(localPath))
        return str(registry.resolve_model(model))

    def modelStatus(self, model: str, localPath: str = "") -> str:
        """One line for the panel: whether the chosen model is ready, and what to do if not."""
        try:
            path = self.resolveModelPath(model, localPath)
        except Exception as error:  # shown to the user, never raised from here
            return str(error)
        loaded = self._controller.model if self._controller is not None else {}
        if loaded.get("path") == path:
            name = os.path.basename(path)
            return _("Loaded: {name} on {device}").format(name=name, device=loaded["device"])
        return _("Ready: {name}").format(name=os.path.basename(path))

    def requestModel(
        self, model: str, device: str = "auto", localPath: str = "", onError=None, precision: str = "auto"
    ):
        """Make sure the chosen model is loaded in the engine before the next job (queued there)."""
        self.checkRequirements()
        path = self.resolveModelPath(model, localPath)
        return self.controller.request_model(path, device, onError, precision=precision)

    def startDownload(self, model: str, onProgress=None, onDone=None, onError=None):
        """Download a registry model in the engine process (resumable; cancel with `cancel()`)."""
        from SAMMed2DSegmentLib.weights import registry

        if model not in registry.REGISTRY:
            raise ValueError(_("Only registry models can be downloaded; choose a local file instead."))

        def onEvent(kind, header, arrays):
            if kind == "progress" and onProgress:
                onProgress((header["done"], header["total"]))
            elif kind == "done" and onDone:
                onDone(header["path"])
            elif kind == "cancelled":
                self.log(_("Download stopped; the part already downloaded is kept and the next one resumes."))
            elif kind == "error" and onError:
                onError(header.get("message", ""), header.get("details", ""))

        return self.controller.client.submit("download", {"model": model}, on_event=onEvent)

    # -- segmentation ------------------------------------------------------------------------------------

    def startSegmentation(
        self, volumeNode, includePoints, excludePoints, roiNode, segmentationNode, segmentId: str, options,
        saveUndoState=None, onSlice=None, onDone=None, onError=None,
    ):  # fmt: skip
        """Segment the slice(s) holding the prompts, then propagate `options.direction`, in the engine; the
        slices are written as they arrive (one undo step through `saveUndoState`, e.g. the embedded Segment
        Editor's saveStateForUndo) with the editor's masking settings. Returns the job."""
        if volumeNode is None:
            raise ValueError(_("Select the input volume first."))
        job = self.controller.start_segmentation(
            volumeNode, includePoints, excludePoints, roiNode, segmentationNode, segmentId, options,
            modality=self.modality(volumeNode), save_undo=saveUndoState, on_slice=onSlice,
            on_done=onDone, on_error=onError,
        )  # fmt: skip
        self.lastJob = job
        return job

    def startPropagationFromSlice(
        self, volumeNode, segmentationNode, segmentId: str, index: int, options, roiNode=None,
        saveUndoState=None, onSlice=None, onDone=None, onError=None,
    ):  # fmt: skip
        """Propagate from slice `index` as the segment has it now (after a correction); slices edited by hand
        are kept."""
        job = self.controller.start_propagation_from_slice(
            volumeNode, segmentationNode, segmentId, index, options, modality=self.modality(volumeNode),
            roi_node=roiNode, save_undo=saveUndoState, on_slice=onSlice, on_done=onDone, on_error=onError,
        )  # fmt: skip
        self.lastJob = job
        return job

    def segment(self, *args, **kwargs):
        """`startSegmentation` and wait (console, self-test). Returns the finished job; raises on error."""
        errors = []
        job = self.startSegmentation(*args, onError=lambda message, details: errors.append(message), **kwargs)
        self.wait(job)
        if errors or job.state == "failed":
            raise RuntimeError(errors[0] if errors else job.message)
        if job.state == "stale":
            raise RuntimeError(job.message)
        return job

    def prefetchAroundViews(self, volumeNode, options):
        """While idle, the engine encodes the `options.axis` slices from the one on screen outwards."""
        if volumeNode is None or self._controller is None:
            return None
        center = self.viewedSliceIndex(volumeNode, options.axis)
        if center is None:
            return None
        return self._controller.prefetch(volumeNode, options.axis, center, options, self.modality(volumeNode))

    # -- DICOM-SEG ---------------------------------------------------------------------------------------

    def startExportDicomSeg(self, segmentationNode, volumeNode, outputPath: str, database=None, onDone=None,
                            onError=None):  # fmt: skip
        """Write every segment of `segmentationNode` as a DICOM Segmentation that references the series
        `volumeNode` was loaded from (its DICOM.instanceUIDs through the DICOM database); the engine process
        writes it (highdicom lives there). Raises ValueError when the volume did not come from DICOM."""
        if segmentationNode is None or volumeNode is None:
            raise ValueError(_("Select the input volume and the segmentation to export."))
        from SAMMed2DSegmentLib.mrml.dicom_database import source_files

        model = self._controller.model if self._controller is not None else {}
        if not model.get("sha256"):
            raise ValueError(
                _("No SAM-Med2D model was used in this session, so the DICOM-SEG cannot name it: "
                  "segment with a model first.")  # fmt: skip
            )
        if database is None:
            database = getattr(slicer, "dicomDatabase", None)
        files = source_files(volumeNode, database)
        return self.controller.start_export(segmentationNode, volumeNode, files, outputPath, model["sha256"],
                                            on_done=onDone, on_error=onError)  # fmt: skip

    # -- dependencies ------------------------------------------------------------------------------------

    @staticmethod
    def requirementsPath() -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    def missingPackages(self) -> list:
        """Requirements the engine cannot satisfy from Slicer's own packages or the private folder."""
        folder = self.packageFolder()
        return [req for req in _readRequirements(self.requirementsPath()) if not _satisfied(req, [folder])]

    def checkRequirements(self) -> None:
        """Raises RequirementsNeeded (for the Widget to ask the user) when torch or a package is missing."""
        if importlib.util.find_spec("torch") is None:
            raise RequirementsNeeded(_("PyTorch is needed; it is installed through the PyTorch extension."),
                                     torch=True)  # fmt: skip
        missing = self.missingPackages()
        if missing:
            raise RequirementsNeeded(
                _("These Python packages are needed by the segmentation engine: {packages}").format(
                    packages=", ".join(missing)), packages=missing)  # fmt: skip

    def installTorch(self) -> None:
        """Through the PyTorch extension, which picks a build matching the GPU driver (the Widget asked)."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError as e:
            raise RuntimeError(
                _("This module requires the PyTorch extension. Install it from the Extensions Manager, "
                  "restart the application, and try again.")  # fmt: skip
            ) from e
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}"
        )
        if torch is None:
            raise RuntimeError(_("PyTorch could not be installed."))

    def installEnginePackages(self, packages) -> None:
        """pip install into the private folder only (`--target`, `--no-deps`: nothing of Slicer's changes)."""
        import subprocess

        folder = self.packageFolder()
        os.makedirs(folder, exist_ok=True)
        command = [self.pythonExecutable(), "-m", "pip", "install", "--no-deps", "--target", folder]
        command += list(packages)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(_("Installing {packages} failed: {reason}").format(
                packages=", ".join(packages), reason=lines[-1] if lines else result.returncode))  # fmt: skip


def _requirementsDigest() -> str:
    import hashlib

    with open(SAMMed2DSegmentLogic.requirementsPath(), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:8]


def _satisfied(requirement: str, folders) -> bool:
    """Whether an installed distribution (Slicer's, or in `folders`) meets a "name>=version" requirement."""
    import importlib.metadata as metadata

    name, _sep, minimum = (part.strip() for part in requirement.partition(">="))
    versions = [d.version for d in metadata.distributions(name=name, path=list(folders))]
    try:
        versions.append(metadata.version(name))
    except metadata.PackageNotFoundError:
        pass
    return any(not minimum or _versionTuple(v) >= _versionTuple(minimum) for v in versions)


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
        """The library imports without torch, the parameter node has its defaults, bad input is refused."""
        self.delayDisplay("Starting the test")
        import sys

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
        with self.assertRaises(ValueError):
            logic.resolveModelPath(LOCAL_MODEL, os.path.join(slicer.app.temporaryPath, "no-such.pth"))
        with self.assertRaises(ValueError):  # not from DICOM (and no model used yet)
            logic.startExportDicomSeg(
                slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode"),
                volumeNode,
                os.path.join(slicer.app.temporaryPath, "x.dcm"),
            )
        self.assertNotIn("torch", sys.modules)  # the model lives in the engine process only
        self.delayDisplay("Test passed")

    def test_SAMMed2DSegmentDicomSegmentPropagateUndoExport(self):
        import tempfile

        import numpy as np
        from DICOMLib import DICOMUtils

        logic = SAMMed2DSegmentLogic()
        try:
            logic.checkRequirements()
        except RequirementsNeeded as needed:  # ctest runs with --testing: install without asking
            if needed.torch:
                logic.installTorch()
            if needed.packages:
                logic.installEnginePackages(needed.packages)
            logic.checkRequirements()

        with tempfile.TemporaryDirectory() as folder, DICOMUtils.TemporaryDICOMDatabase() as database:
            self.delayDisplay("Writing and loading a synthetic CT series")
            seriesUID = _writeSyntheticCtSeries(folder)
            DICOMUtils.importDicom(folder, database)
            loaded = DICOMUtils.loadSeriesByUID([seriesUID])
            self.assertEqual(len(loaded), 1)
            volumeNode = slicer.mrmlScene.GetNodeByID(loaded[0])
            self.assertTrue(logic.volumeFromDicom(volumeNode))

            self.delayDisplay("Segmenting one slice from one include point, in the engine process")
            logic.requestModel("demo", "cpu")
            include = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
            include.AddControlPoint(*_ijkToRas(volumeNode, (32, 32, 10)))  # the centre of the bright ball
            segmentationNode, segmentId = logic.ensureOutput(volumeNode)
            from SAMMed2DSegmentLib.mrml.controller import SegmentOptions

            history = slicer.vtkSegmentationHistory()
            history.SetSegmentation(segmentationNode.GetSegmentation())
            job = logic.segment(volumeNode, include, None, None, segmentationNode, segmentId,
                                SegmentOptions(direction="none"))  # fmt: skip
            self.assertEqual(job.written, [10])
            labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            oneSlice = int(labelmap.sum())
            self.assertGreater(oneSlice, 0)
            self.assertEqual(int(labelmap[10].sum()), oneSlice)  # only the prompted slice (k = 10)
            self.assertTrue(labelmap[10, 32, 32])  # the include point is inside the mask

            self.delayDisplay("Propagating: slices stream in while this thread only reads replies")
            both = SegmentOptions(direction="both")
            job = logic.segment(volumeNode, include, None, None, segmentationNode, segmentId, both,
                                saveUndoState=history.SaveState)  # fmt: skip
            self.assertGreaterEqual(len(job.written), 2)
            labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            self.assertGreater(int(labelmap.sum()), oneSlice)

            self.delayDisplay("Undo goes back one action")
            self.assertTrue(history.RestorePreviousState())
            labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            self.assertEqual(int(labelmap.sum()), oneSlice)

            self.delayDisplay("Exporting DICOM-SEG in the engine process")
            written = []
            out = os.path.join(folder, "seg.dcm")
            exportJob = logic.startExportDicomSeg(
                segmentationNode, volumeNode, out, database, onDone=written.append,
                onError=lambda m, d: self.fail(d),
            )  # fmt: skip
            logic.wait(exportJob)
            self.assertEqual(len(written), 1)
            import pydicom

            seg = pydicom.dcmread(written[0])
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
