"""SAM-Med2D interactive segmentation module for 3D Slicer.

This file is thin Qt + MRML glue. The segmentation engine lives in SAMMed2DSegmentLib/, which imports without
the Slicer application; torch and the engine are imported only inside the functions that need them.
"""

import importlib.util
import logging
import os
import re
from typing import Annotated

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
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Oldest torch release the engine is written for (passed to the PyTorch extension's installer).
MINIMUM_TORCH_VERSION = "2.1"

AXES = ["axial", "coronal", "sagittal"]
DEVICES = ["auto", "cpu", "cuda", "mps"]


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

    inputVolume - the volume to segment (never modified).
    includePoints - points inside the structure (positive prompts).
    excludePoints - points outside the structure (negative prompts).
    promptROI - optional box prompt.
    outputSegmentation - the segmentation that receives the result.
    axis - orientation of the slices shown to the model.
    device - where the network runs.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    includePoints: vtkMRMLMarkupsFiducialNode
    excludePoints: vtkMRMLMarkupsFiducialNode
    promptROI: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    axis: Annotated[str, Choice(AXES)] = "axial"
    device: Annotated[str, Choice(DEVICES)] = "auto"


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

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMMed2DSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets. The .ui connects the top-level qMRMLWidget's
        # "mrmlSceneChanged(vtkMRMLScene*)" signal to each MRML widget's "setMRMLScene(vtkMRMLScene*)" slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        # Logic implements everything that must also run without the GUI.
        self.logic = SAMMed2DSegmentLogic()

        # The point-list widgets have no parameter-node GUI connector, so they are bound by hand.
        self.ui.includePointsWidget.setNodeBaseName(_("include"))
        self.ui.excludePointsWidget.setNodeBaseName(_("exclude"))
        self.ui.includePointsWidget.connect("markupsNodeChanged()", self.onPointsWidgetChanged)
        self.ui.excludePointsWidget.connect("markupsNodeChanged()", self.onPointsWidgetChanged)

        self.ui.progressBar.hide()

        # Segmentation of whole volumes is not available yet: the button stays disabled (see _checkCanApply).
        self.ui.segmentButton.enabled = False

        # These connections ensure that we update parameter node when scene is closed.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Make sure parameter node is initialized (needed for module reload).
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed.
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module).
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore.
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        # If this module is shown while the scene is closed then recreate a new parameter node immediately.
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        # Parameter node stores all user choices in parameter values, node selections, etc.
        # so that when the scene is saved and reloaded, these settings are restored.
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user.
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

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
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # bound widget; connectGui binds those widgets to the parameters of the same name.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

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
        self._updatingMarkupsWidgets = True
        try:
            self.ui.includePointsWidget.setCurrentNode(self._parameterNode.includePoints)
            self.ui.excludePointsWidget.setCurrentNode(self._parameterNode.excludePoints)
        finally:
            self._updatingMarkupsWidgets = False

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateMarkupsWidgets()
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Update the Segment button. It stays disabled until volume segmentation is available."""
        self.ui.segmentButton.enabled = False
        parameterNode = self._parameterNode
        hasPrompt = parameterNode is not None and bool(parameterNode.promptROI or parameterNode.includePoints)
        if parameterNode is None or not parameterNode.inputVolume or not hasPrompt:
            self.ui.segmentButton.toolTip = _(
                "Select an input volume and place include points or a box (ROI). "
                "Segmentation of volumes is coming in a later version of this module."
            )
        else:
            self.ui.segmentButton.toolTip = _(
                "Segmentation of volumes is coming in a later version of this module."
            )


#
# SAMMed2DSegmentLogic
#


class SAMMed2DSegmentLogic(ScriptedLoadableModuleLogic):
    """All actual work goes here (or into SAMMed2DSegmentLib): usable from the Python console and tests,
    without an instance of the Widget. Takes nodes and values as arguments, never widgets.
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.model = None
        self.predictor = None
        self.checkpointPath = None
        self.checkpointInfo = None
        self.device = None
        #: Optional function taking one string; receives the progress messages (e.g. to show them in a GUI).
        self.logCallback = None

    def getParameterNode(self):
        return SAMMed2DSegmentParameterNode(super().getParameterNode())

    def log(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    @staticmethod
    def requirementsPath() -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    def setupPythonRequirements(self) -> None:
        """
        Make sure torch (from the PyTorch extension) and the packages in Resources/requirements.txt are
        installed, asking the user before installing anything. Never called at import time.

        :raises RuntimeError: the PyTorch extension is missing, or the user declined an installation.
        """
        self._setupTorch()
        self._setupPackages()

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

    def _setupPackages(self) -> None:
        requirementsPath = self.requirementsPath()
        try:
            import slicer.packaging as slicerPackaging  # Slicer 5.12 and later
        except ImportError:
            slicerPackaging = None
        if slicerPackaging is not None:
            # Checks what is missing, asks the user, installs with a progress dialog, offers a restart.
            # Skipped in testing mode; raises RuntimeError if the user declines.
            slicerPackaging.pip_ensure(
                slicerPackaging.load_requirements(requirementsPath), requester="SAMMed2D"
            )
            return

        # Slicer 5.6 to 5.10: install what cannot be imported, after a confirmation.
        missing = [req for req in _readRequirements(requirementsPath) if not _requirementImportable(req)]
        if not missing:
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

    def loadModel(self, checkpointPath: str, device: str = "auto"):
        """
        Load a SAM-Med2D checkpoint and make a predictor for it; both are kept on the logic.

        :param checkpointPath: a SAM-Med2D checkpoint file (the official .pth layout or a plain state dict).
        :param device: "auto" (CUDA, then Apple MPS, then the CPU), "cpu", "cuda", "cuda:N" or "mps".
        :returns: the SAMMed2DSegmentLib.predictor.SamMed2DPredictor.
        :raises ValueError: the file does not exist, or the device is unknown or not available.
        """
        if not checkpointPath or not os.path.isfile(checkpointPath):
            raise ValueError(_("Checkpoint file not found: {path}").format(path=checkpointPath))

        self.setupPythonRequirements()

        from SAMMed2DSegmentLib.checkpoint import load_model, resolve_device
        from SAMMed2DSegmentLib.predictor import SamMed2DPredictor

        torchDevice = resolve_device(device)
        self.log(_("Loading {path} on {device}").format(path=checkpointPath, device=torchDevice))
        model, checkpointInfo = load_model(checkpointPath, device=torchDevice)
        self.model = model
        self.checkpointInfo = checkpointInfo
        self.predictor = SamMed2DPredictor(model)
        self.checkpointPath = checkpointPath
        self.device = str(torchDevice)
        return self.predictor


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
    """Self-test run inside the Slicer application (Reload and Test, SelfTests module, or ctest)."""

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_SAMMed2DSegmentLogicLoads()

    def test_SAMMed2DSegmentLogicLoads(self):
        """The engine library imports, the parameter node has its defaults, and bad input is refused."""
        self.delayDisplay("Starting the test")

        import SAMMed2DSegmentLib

        self.assertIsInstance(SAMMed2DSegmentLib.__version__, str)

        logic = SAMMed2DSegmentLogic()
        parameterNode = logic.getParameterNode()
        self.assertIn(parameterNode.axis, AXES)
        self.assertIn(parameterNode.device, DEVICES)
        parameterNode.axis = "coronal"
        self.assertEqual(logic.getParameterNode().axis, "coronal")
        with self.assertRaises(ValueError):
            parameterNode.axis = "oblique"

        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        parameterNode.inputVolume = volumeNode
        self.assertEqual(logic.getParameterNode().inputVolume.GetID(), volumeNode.GetID())

        self.assertTrue(os.path.isfile(logic.requirementsPath()))
        with self.assertRaises(ValueError):
            logic.loadModel(os.path.join(slicer.app.temporaryPath, "no-such-checkpoint.pth"))

        self.delayDisplay("Test passed")
