"""The module panel behaviour the ProstateSeg extension's modules share (Qt; runs inside Slicer only).

A module's widget subclasses `SegmentationWidgetBase`, names its .ui file and
logic, and gets: model choice with install/remove, device choice (GPU only when
torch sees one), Segment/Cancel with a progress bar and status text, the
result's volume and confidence, Edit (Segment Editor), Refine (include and exclude points, each refining
the chosen segment at once, with Undo), Export to DICOM (RTSTRUCT / DICOM SEG), Save as training case, and
Improve the model (fine-tuning in a background process).
The .ui must hold the widgets named in `REQUIRED_WIDGETS`.
"""

import logging
import traceback
from collections import deque

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from ProstateSegLib import dependencies
from ProstateSegLib.refinepoints import RefinePoints
from segcore.errors import Cancelled, OutputExistsError, SegcoreError

logger = logging.getLogger(__name__)

REQUIRED_WIDGETS = (
    "inputVolumeSelector", "modelComboBox", "installModelButton", "removeModelButton", "deviceComboBox",
    "outputSegmentationSelector", "show3DCheckBox", "smoothingSliderWidget", "applyButton", "progressBar",
    "statusLabel", "resultLabel", "editButton", "datasetFolderPathLineEdit", "caseNameLineEdit",
    "saveCaseButton", "rtstructCheckBox", "dicomSegCheckBox", "dicomFolderPathLineEdit", "exportDicomButton",
    "fineTuneCollapsibleButton", "fineTuneFolderPathLineEdit", "fineTuneCasesLabel", "fineTuneIterationsSpinBox",
    "fineTuneButton", "fineTuneCancelButton", "fineTuneProgressBar", "fineTuneStatusLabel", "fineTuneTableWidget",
    "refineCollapsibleButton", "refineSegmentSelector", "includePlaceWidget", "excludePlaceWidget",
    "refineUndoButton", "refineClearButton", "refineStatusLabel",
)

DEVICES = (("Automatic (GPU if available)", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "cuda"))
FINETUNE_COLUMNS = ("Cases", "Structure", "Metric", "Base", "Tuned")
KILL_AFTER_MS = 5000  # Cancel terminates the fine-tuning process, and kills it when it is still there after this


class FineTuneRun:
    """A fine-tuning process started by the panel: the QProcess, its run folder, its output so far."""

    def __init__(self, process, runFolder, name):
        self.process = process
        self.runFolder = runFolder
        self.name = name
        self.lines = deque(maxlen=200)
        self.pending = b""
        self.cancelled = False


class SegmentationWidgetBase(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel of a segmentation module; subclasses set `uiFile`, `applyText` and `createLogic`."""

    uiFile = ""
    applyText = "Segment"

    def createLogic(self):
        raise NotImplementedError

    def segmentOptions(self):
        """Extra keyword arguments for the logic's segmentVolume (a module with more choices adds them)."""
        return {}

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._lastSegmentation = None
        self._fineTune = None  # the FineTuneRun in progress
        self._followedFolder = ""  # the Save-as-training-case folder the fine-tune folder follows
        self._refinePoints = None  # the Refine section's RefinePoints
        self._refineChosen = (None, "")  # (segmentation node ID, segment ID) the points were placed for

    # ------------------------------------------------------------ set-up

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(self.uiFile))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.createLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChosen)
        self.ui.installModelButton.connect("clicked(bool)", self.onInstallModel)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.editButton.connect("clicked(bool)", self.onEditButton)
        self.ui.saveCaseButton.connect("clicked(bool)", self.onSaveCase)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicom)
        self.ui.progressBar.hide()
        self.ui.editButton.enabled = False
        self.ui.saveCaseButton.enabled = False
        self.ui.exportDicomButton.enabled = False
        self.setupFineTune()
        self.setupRefine()

        self.offerRequirements()
        self.refreshModels()
        self.refreshDevices()
        self.initializeParameterNode()

    def offerRequirements(self):
        """Model packages are checked against their JSON Schema, which needs a package Slicer does not ship:
        offer to install the small requirements now, so that every model can be listed."""
        if not dependencies.missingRequirements():
            return
        try:
            dependencies.ensureRequirements(askConfirmation=not slicer.app.testingEnabled())
        except Exception as error:  # noqa: BLE001  declined, offline or pip failed: Segment offers again
            logger.warning(f"ProstateSeg's Python packages were not installed now: {error}")

    def cleanup(self):
        self.removeObservers()
        if self._refinePoints is not None:
            self._refinePoints.cleanup()
        run, self._fineTune = self._fineTune, None
        if run is not None:  # the panel goes away (Slicer closes): so does its fine-tuning process
            run.process.kill()
            run.process.waitForFinished(KILL_AFTER_MS)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self._lastSegmentation = None
        self._refinePoints.forgetNodes()  # they go with the scene
        self.logic.clearRefineHistory()
        self._updateRefineButtons()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        if not self.ui.refineCollapsibleButton.collapsed:  # the place buttons get new point lists
            self.refinePlaceNodes()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._selectComboData(self.ui.modelComboBox, self._parameterNode.model)
            self._selectComboData(self.ui.deviceComboBox, self._parameterNode.device)
            # what the combo boxes show is what runs, also when a saved choice is not offered here
            self.onModelChosen()
            self.onDeviceChosen()
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None):
        if self._running:
            return
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self.ui.modelComboBox.count)
        self.ui.applyButton.text = self.applyText
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = ("Segment the selected CT" if ready
                                       else "Select a CT volume (and install a model if none is listed)")
        self.ui.exportDicomButton.enabled = bool(self._parameterNode and self._parameterNode.inputVolume
                                                 and self._currentSegmentation() is not None)

    # ------------------------------------------------------- models, device

    @staticmethod
    def _selectComboData(comboBox, value):
        index = comboBox.findData(value) if value else -1
        if index >= 0:
            comboBox.currentIndex = index

    def refreshModels(self, select=None):
        comboBox = self.ui.modelComboBox
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        if dependencies.missingRequirements():
            # Packages are checked against their JSON Schema, which needs a Python package Slicer does not
            # ship: until the first Segment installs it, offer the default model unchecked.
            default = self.logic.defaultModel()
            comboBox.addItem(f"{default} (checked on first use)", default)
            self.ui.statusLabel.text = "The first Segment installs the Python packages ProstateSeg needs."
        else:
            try:
                entries = self.logic.modelEntries()
            except SegcoreError as error:
                entries = []
                self.ui.statusLabel.text = str(error)
            for entry in entries:
                comboBox.addItem(f"{entry.name} ({entry.version}, {entry.where})", entry.name)
        comboBox.blockSignals(wasBlocked)
        wanted = select or (self._parameterNode.model if self._parameterNode else "") or self.logic.defaultModel()
        self._selectComboData(comboBox, wanted)
        self.onModelChosen()

    def refreshDevices(self):
        comboBox = self.ui.deviceComboBox
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        try:
            gpu = dependencies.cudaAvailable()
        except Exception:  # a damaged torch must not break the panel; Segment reports it
            logger.exception("ProstateSeg: could not check for a CUDA GPU")
            gpu = False
        for text, value in DEVICES:
            if value != "cuda" or gpu:
                comboBox.addItem(text, value)
        comboBox.blockSignals(wasBlocked)
        self._selectComboData(comboBox, self._parameterNode.device if self._parameterNode else "auto")

    def onModelChosen(self, index=None):
        name = self.ui.modelComboBox.currentData
        entry = next((e for e in self.logic.modelEntries() if e.name == name), None)
        self.ui.removeModelButton.enabled = bool(entry and entry.where == "user")
        self.ui.modelComboBox.toolTip = str(entry.path) if entry else "No model installed"
        if self._parameterNode and name:
            self._parameterNode.model = name
        if self._parameterNode:
            self._checkCanApply()

    def onDeviceChosen(self, index=None):
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.currentData or "auto"

    def onInstallModel(self):
        fromFile = slicer.util.confirmYesNoDisplay(
            "Install a model package from a .zip file on this computer?\n\n"
            "Yes: choose a file.  No: give an https URL.", windowTitle="Install model")
        if fromFile:
            source = qt.QFileDialog.getOpenFileName(self.parent, "Model package", "", "Model packages (*.zip)")
        else:
            source = qt.QInputDialog.getText(self.parent, "Install model", "https URL of the model package (.zip):")
        if not source:
            return
        sha256 = qt.QInputDialog.getText(
            self.parent, "Install model", "sha256 of the archive, as published with the model:")
        if not sha256:
            return
        with slicer.util.tryWithErrorDisplay("Installing the model failed.", waitCursor=True):
            try:
                name = self.logic.installModel(source, sha256)
            except SegcoreError as error:
                slicer.util.errorDisplay(str(error), windowTitle="Install model")
                return
            self.refreshModels(select=name)
            self.ui.statusLabel.text = f"Installed model {name} in {self.logic.modelsFolder()}."

    def onRemoveModel(self):
        name = self.ui.modelComboBox.currentData
        if not name or not slicer.util.confirmOkCancelDisplay(
                f"Delete the installed model {name!r} from {self.logic.modelsFolder()}?",
                windowTitle="Remove model"):
            return
        try:
            self.logic.removeModel(name)
        except SegcoreError as error:
            slicer.util.errorDisplay(str(error), windowTitle="Remove model")
            return
        self.refreshModels()
        self.ui.statusLabel.text = f"Removed model {name}."

    # -------------------------------------------------------------- running

    def _setRunning(self, running):
        self._running = running
        self.ui.applyButton.text = "Cancel" if running else self.applyText
        self.ui.applyButton.toolTip = "Stop the segmentation; nothing is added to the scene" if running else ""
        for name in ("inputVolumeSelector", "modelComboBox", "deviceComboBox", "outputSegmentationSelector",
                     "installModelButton", "removeModelButton", "editButton", "saveCaseButton", "exportDicomButton"):
            getattr(self.ui, name).enabled = not running
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(running)
        if not running:
            self.onModelChosen()
            self.ui.editButton.enabled = self.ui.saveCaseButton.enabled = self._currentSegmentation() is not None
            self.ui.exportDicomButton.enabled = self.ui.editButton.enabled and bool(self._parameterNode.inputVolume)

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = round(100 * fraction)
        self.ui.statusLabel.text = message[:1].upper() + message[1:]
        slicer.app.processEvents()  # keeps the panel alive and lets Cancel be clicked

    def _showError(self, text, **kwargs):
        if slicer.app.testingEnabled():  # a modal box would block a self-test; its assertions report it
            logger.error(text)
            return
        slicer.util.errorDisplay(text, windowTitle="ProstateSeg", **kwargs)

    def onApplyButton(self):
        if self._running:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        parameters = self._parameterNode
        self.ui.resultLabel.text = ""
        if not self.installDependencies():
            return
        show3D = bool(parameters.show3D)
        self._setRunning(True)
        try:
            segmentation = self.logic.segmentVolume(
                parameters.inputVolume, model=parameters.model or None, device=parameters.device or "auto",
                segmentationNode=parameters.outputSegmentation, show3D=show3D,
                smoothing=parameters.smoothing, progress=self.onProgress, **self.segmentOptions())
            self.showResult(segmentation, show3D)
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled: nothing was added to the scene."
        except SegcoreError as error:
            self.ui.statusLabel.text = "Not segmented."
            self._showError(str(error))
        except Exception as error:  # noqa: BLE001  a bug or a library failure: say so, details for the report
            logger.error(traceback.format_exc())
            self.ui.statusLabel.text = "Failed."
            self._showError(f"Segmentation failed: {error}", detailedText=traceback.format_exc())
        finally:
            self._setRunning(False)

    def installDependencies(self):
        """Install the Python packages still missing (asking first); False, with the reason shown, when that
        failed or was declined."""
        try:
            torchWasThere = dependencies.torchInstalled()
            requirementsWereThere = not dependencies.missingRequirements()
            dependencies.ensureDependencies(askConfirmation=not slicer.app.testingEnabled())
        except SegcoreError as error:
            self._showError(str(error))
            return False
        except Exception as error:  # noqa: BLE001  pip or the PyTorch installer failed (offline, ...)
            logger.error(traceback.format_exc())
            self._showError(f"Installing the Python packages ProstateSeg needs failed: {error}",
                            detailedText=traceback.format_exc())
            return False
        if not torchWasThere:
            self.refreshDevices()  # a GPU can be offered now that torch is there
        if not requirementsWereThere:
            self.refreshModels()  # every package can be checked now
        return True

    def showResult(self, segmentation, show3D=True):
        result = self.logic.lastResult
        if segmentation is not None:
            self._lastSegmentation = segmentation
            if segmentation.GetDisplayNode() is None:
                segmentation.CreateDefaultDisplayNodes()
            segmentation.GetDisplayNode().SetVisibility3D(show3D)
        lines = [f"{s.name.replace('_', ' ')}: {s.volume_cc:.1f} cc" for s in result.segments]
        lines.append(f"confidence {result.confidence:.2f} ({result.timings.get('total', 0):.1f} s, model {result.model})")
        lines += result.messages
        self.ui.resultLabel.text = "\n".join(lines)
        self.ui.statusLabel.text = "Done." if result.found else "Nothing found."
        if segmentation is not None:  # Refine works on the new result
            self.ui.refineSegmentSelector.setCurrentNode(segmentation)

    def _currentSegmentation(self):
        chosen = self._parameterNode.outputSegmentation if self._parameterNode else None
        node = chosen or self._lastSegmentation
        return node if node is not None and node.GetScene() is slicer.mrmlScene else None

    # ------------------------------------------------------ edit and save

    def onEditButton(self):
        segmentation = self._currentSegmentation()
        if segmentation is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(self._parameterNode.inputVolume)

    def onSaveCase(self):
        segmentation = self._currentSegmentation()
        folder = self.ui.datasetFolderPathLineEdit.currentPath
        name = self.ui.caseNameLineEdit.text.strip()
        if segmentation is None or not folder or not name:
            slicer.util.errorDisplay("Choose a dataset folder and a case name, and segment (or select) a "
                                     "segmentation first.", windowTitle="Save as training case")
            return
        volume = self._parameterNode.inputVolume
        try:
            try:
                paths = self.logic.saveTrainingCase(volume, segmentation, folder, name)
            except OutputExistsError as error:
                if not slicer.util.confirmOkCancelDisplay(f"{error}\n\nReplace it?", windowTitle="Save as training case"):
                    return
                paths = self.logic.saveTrainingCase(volume, segmentation, folder, name, overwrite=True)
        except SegcoreError as error:
            slicer.util.errorDisplay(str(error), windowTitle="Save as training case")
            return
        self.ui.statusLabel.text = "Saved " + " and ".join(p.name for p in paths) + f" in {folder}."
        self.refreshCaseCount()

    # ------------------------------------------------------- export to DICOM

    def dicomFormats(self):
        """The DICOM formats ticked in the Outputs section, as the logic's exportDicom takes them."""
        return [fmt for fmt, box in (("rtstruct", self.ui.rtstructCheckBox), ("dicom-seg", self.ui.dicomSegCheckBox))
                if box.checked]

    def onExportDicom(self):
        """Export the current segmentation as RTSTRUCT and/or DICOM SEG of the input CT (loaded from DICOM)."""
        segmentation = self._currentSegmentation()
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        folder = self.ui.dicomFolderPathLineEdit.currentPath
        formats = self.dicomFormats()
        if segmentation is None or volume is None or not folder or not formats:
            self._showError("Choose the CT, segment it (or select a segmentation in Outputs), tick RTSTRUCT "
                            "and/or DICOM SEG and choose an output folder, then Export to DICOM.")
            return
        self.ui.dicomFolderPathLineEdit.addCurrentPathToHistory()
        try:
            with slicer.util.WaitCursor():
                try:
                    paths = self.logic.exportDicom(segmentation, volume, folder, formats=formats)
                except OutputExistsError as error:
                    if slicer.app.testingEnabled() or not slicer.util.confirmOkCancelDisplay(
                            f"{error}\n\nReplace?", windowTitle="Export to DICOM"):
                        self.ui.statusLabel.text = "Not exported: the files are already there."
                        return
                    paths = self.logic.exportDicom(segmentation, volume, folder, formats=formats, overwrite=True)
        except SegcoreError as error:
            self.ui.statusLabel.text = "Not exported."
            self._showError(str(error))
            return
        except Exception as error:  # noqa: BLE001  a bug or a library failure: say so, details for the report
            logger.error(traceback.format_exc())
            self.ui.statusLabel.text = "Export failed."
            self._showError(f"Export to DICOM failed: {error}", detailedText=traceback.format_exc())
            return
        lines = ["Exported " + " and ".join(p.name for p in paths) + f" to {folder}."]
        lines += [note[:1].upper() + note[1:] + "." for note in self.logic.lastExportNotes]
        self.ui.statusLabel.text = "\n".join(lines)

    # --------------------------------------------------------------- refine

    def setupRefine(self):
        """The Refine section: a segment, Include and Exclude place buttons (green and red points); each
        placed point refines the segment at once (after the click is handled); Undo and Clear points."""
        ui = self.ui
        self._refinePoints = RefinePoints(
            self.logic, slicer.mrmlScene, target=self.refineTarget, options=self.refineOptions,
            refined=self.onRefined, failed=self.onRefineFailed,
            schedule=lambda run: qt.QTimer.singleShot(0, lambda: self._runRefine(run)))
        for placeWidget in (ui.includePlaceWidget, ui.excludePlaceWidget):
            placeWidget.setMRMLScene(slicer.mrmlScene)
            placeWidget.buttonsVisible = False  # the place button only
            placeWidget.placeButton().show()
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        ui.refineSegmentSelector.setMRMLScene(slicer.mrmlScene)
        ui.refineSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onRefineSegmentChanged)
        ui.refineSegmentSelector.connect("currentSegmentChanged(QString)", self.onRefineSegmentChanged)
        ui.refineCollapsibleButton.connect("contentsCollapsed(bool)", self.onRefineSectionToggled)
        ui.refineUndoButton.connect("clicked(bool)", self.onUndoRefine)
        ui.refineClearButton.connect("clicked(bool)", self.onClearRefinePoints)
        self._updateRefineButtons()

    def refineTarget(self):
        """(segmentation node, segment ID, volume node) the Refine section works on."""
        selector = self.ui.refineSegmentSelector
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        return selector.currentNode(), selector.currentSegmentID(), volume

    def refineOptions(self):
        return {"device": (self._parameterNode.device if self._parameterNode else "") or "auto"}

    def refinePlaceNodes(self):
        """Give the Include and Exclude buttons their point lists (made when not in the scene)."""
        include, exclude = self._refinePoints.nodes()
        if self.ui.includePlaceWidget.currentNode() is not include:
            self.ui.includePlaceWidget.setCurrentNode(include)
        if self.ui.excludePlaceWidget.currentNode() is not exclude:
            self.ui.excludePlaceWidget.setCurrentNode(exclude)

    def onRefineSectionToggled(self, collapsed):
        if collapsed:
            return
        self.refinePlaceNodes()
        if self.ui.refineSegmentSelector.currentNode() is None and self._currentSegmentation() is not None:
            self.ui.refineSegmentSelector.setCurrentNode(self._currentSegmentation())
        self._updateRefineButtons()

    def onRefineSegmentChanged(self, *args):
        """Points belong to one segment: another segment starts without points."""
        segmentation, segmentId, _ = self.refineTarget()
        chosen = (segmentation.GetID() if segmentation is not None else None, segmentId)
        changed, self._refineChosen = chosen != self._refineChosen, chosen
        if changed and self._refinePoints.pointCount():
            self._refinePoints.clear()
            self.ui.refineStatusLabel.text = "Another segment: the points were cleared."
        self._updateRefineButtons()

    def _updateRefineButtons(self):
        self.ui.refineUndoButton.enabled = self.logic.canUndoRefine()
        self.ui.refineClearButton.enabled = self._refinePoints.pointCount() > 0

    def _saveSegmentEditorUndoState(self):
        """When the Segment Editor edits this segmentation, save its state there too, so that its Undo also
        takes the refinement back."""
        editorWidget = getattr(slicer.modules, "SegmentEditorWidget", None)
        editor = getattr(editorWidget, "editor", None)
        segmentation = self.ui.refineSegmentSelector.currentNode()
        if editor is not None and segmentation is not None and editor.segmentationNode() is segmentation:
            editor.saveStateForUndo()

    def _runRefine(self, run):
        """Run a refinement `RefinePoints` scheduled; a refused point is reported by onRefineFailed, a failure
        of another kind here."""
        try:
            if not self.installDependencies():
                self._refinePoints.clear()
                return
            self.refinePlaceNodes()
            self._saveSegmentEditorUndoState()
            with slicer.util.WaitCursor():
                run()
        except Exception as error:  # noqa: BLE001  a bug or a library failure: say so, the traceback to the log
            logger.error(traceback.format_exc())
            self.ui.refineStatusLabel.text = f"Refinement failed: {error} (details in the Python console and log)."
        finally:
            self._updateRefineButtons()

    def onRefined(self, result):
        details = result.details
        segment = self.ui.refineSegmentSelector.currentNode().GetSegmentation().GetSegment(
            self.ui.refineSegmentSelector.currentSegmentID())
        self.ui.refineStatusLabel.text = (
            f"Refined {segment.GetName() if segment else 'the segment'} with {details['include']} include and "
            f"{details['exclude']} exclude points: {details['added_voxels']} voxels added, "
            f"{details['removed_voxels']} removed ({result.timings.get('total', 0):.1f} s).")

    def onRefineFailed(self, message):
        """A refused point: it was removed again; say why, in the section (no dialog: the next click may fix it)."""
        logger.warning("Refine: %s", message)
        self.ui.refineStatusLabel.text = f"Not refined: {message[:1].upper() + message[1:]} The point was removed."

    def onUndoRefine(self):
        try:
            segmentId = self._refinePoints.undo()
        except SegcoreError as error:
            self.ui.refineStatusLabel.text = f"Not undone: {error}"
        else:
            self.ui.refineStatusLabel.text = ("Undid the last refinement." if segmentId is not None
                                              else "Nothing to undo.")
        self._updateRefineButtons()

    def onClearRefinePoints(self):
        self._refinePoints.clear()
        self.ui.refineStatusLabel.text = "Points cleared; the segment stays as refined."
        self._updateRefineButtons()

    # ------------------------------------------------------ improve the model

    def setupFineTune(self):
        ui = self.ui
        ui.datasetFolderPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetFolderChanged)
        ui.fineTuneFolderPathLineEdit.connect("currentPathChanged(QString)", self.refreshCaseCount)
        ui.fineTuneCollapsibleButton.connect("contentsCollapsed(bool)", self.onFineTuneSectionToggled)
        ui.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        ui.fineTuneCancelButton.connect("clicked(bool)", self.onCancelFineTune)
        table = ui.fineTuneTableWidget
        table.setColumnCount(len(FINETUNE_COLUMNS))
        table.setHorizontalHeaderLabels(list(FINETUNE_COLUMNS))
        table.hide()
        self.onDatasetFolderChanged(ui.datasetFolderPathLineEdit.currentPath)
        self._setFineTuning(False)

    def onDatasetFolderChanged(self, path=None):
        """The fine-tune folder follows the Save-as-training-case folder until the user picks another."""
        current = self.ui.fineTuneFolderPathLineEdit.currentPath
        if path and current in ("", self._followedFolder):
            self.ui.fineTuneFolderPathLineEdit.currentPath = path
        self._followedFolder = path or ""

    def onFineTuneSectionToggled(self, collapsed):
        if not collapsed:
            self.refreshCaseCount()

    def refreshCaseCount(self, path=None):
        count, text = self.logic.trainingCaseCount(self.ui.fineTuneFolderPathLineEdit.currentPath)
        self.ui.fineTuneCasesLabel.text = text
        self.ui.fineTuneButton.enabled = count > 0 and self._fineTune is None
        return count

    def _setFineTuning(self, running):
        for name in ("fineTuneFolderPathLineEdit", "fineTuneIterationsSpinBox"):
            getattr(self.ui, name).enabled = not running
        self.ui.fineTuneCancelButton.enabled = running
        self.ui.fineTuneProgressBar.value = 0
        self.ui.fineTuneProgressBar.setVisible(running)
        self.refreshCaseCount()

    def onFineTune(self):
        """Fine-tune the chosen model on the dataset folder's cases in a background process."""
        folder = self.ui.fineTuneFolderPathLineEdit.currentPath
        model = self.ui.modelComboBox.currentData
        if not folder or not model or not self.installDependencies():
            return
        name = self.logic.tunedModelName(model)
        overwrite = (self.logic.modelsFolder() / name).exists()
        if overwrite and (slicer.app.testingEnabled() or not slicer.util.confirmOkCancelDisplay(
                f"A tuned model called {name!r} is installed already. Fine-tune again and replace it?",
                windowTitle="Improve the model")):
            self.ui.fineTuneStatusLabel.text = f"Not started: {name} is installed already."
            return
        device = (self._parameterNode.device if self._parameterNode else "") or "auto"
        try:
            argv, workingDirectory, runFolder = self.logic.prepareFineTune(
                folder, model, iterations=self.ui.fineTuneIterationsSpinBox.value, device=device,
                overwrite=overwrite)
        except (SegcoreError, OSError) as error:
            self._showError(str(error))
            return
        self.ui.fineTuneTableWidget.hide()
        self._startFineTune(argv, workingDirectory, runFolder, name)

    def _startFineTune(self, argv, workingDirectory, runFolder, name):
        process = qt.QProcess()
        process.setWorkingDirectory(str(workingDirectory))
        process.setProcessChannelMode(qt.QProcess.MergedChannels)
        process.connect("readyReadStandardOutput()", self.onFineTuneOutput)
        process.connect("finished(int,QProcess::ExitStatus)", self.onFineTuneFinished)
        process.connect("errorOccurred(QProcess::ProcessError)", self.onFineTuneError)
        self._fineTune = FineTuneRun(process, runFolder, name)
        self._setFineTuning(True)
        self.ui.fineTuneStatusLabel.text = "Starting the fine-tuning process..."
        logger.info("fine-tune: %s (in %s)", " ".join(argv), workingDirectory)
        process.start(argv[0], argv[1:])

    def onFineTuneOutput(self):
        run = self._fineTune
        if run is None:
            return
        *complete, run.pending = (run.pending + run.process.readAllStandardOutput().data()).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace").rstrip()
            run.lines.append(line)
            progress = self.logic.fineTuneProgress(line)
            if progress:
                self.ui.fineTuneProgressBar.value = round(100 * progress[0])
                self.ui.fineTuneStatusLabel.text = progress[1][:1].upper() + progress[1][1:]
            elif line:
                logger.info("fine-tune: %s", line)

    def onCancelFineTune(self):
        run = self._fineTune
        if run is None:
            return
        run.cancelled = True
        self.ui.fineTuneStatusLabel.text = "Cancelling..."
        process = run.process
        process.terminate()
        qt.QTimer.singleShot(KILL_AFTER_MS, lambda: self._killIfRunning(process))

    @staticmethod
    def _killIfRunning(process):
        if process.state() != qt.QProcess.NotRunning:
            process.kill()

    def onFineTuneError(self, error):
        """The process could not be started (no `finished` follows); other errors end in `finished`."""
        run = self._fineTune
        if run is None or error != qt.QProcess.FailedToStart:
            return
        self._fineTune = None
        self._setFineTuning(False)
        self.ui.fineTuneStatusLabel.text = "Not started."
        self._showError(f"The fine-tuning process could not be started: {run.process.errorString()}")

    def onFineTuneFinished(self, exitCode, exitStatus):
        run = self._fineTune
        if run is None:
            return
        self.onFineTuneOutput()
        if run.pending:
            run.lines.append(run.pending.decode("utf-8", "replace").rstrip())
        self._fineTune = None
        self._setFineTuning(False)
        if run.cancelled:
            self.refreshModels()
            self.ui.fineTuneStatusLabel.text = (f"Cancelled before {run.name} was installed. The run folder "
                                                f"{run.runFolder} is kept until the next Fine-tune.")
            return
        code = exitCode if exitStatus == qt.QProcess.NormalExit else -1
        try:
            summary = self.logic.fineTuneOutcome(code, run.lines, run.runFolder)
        except (SegcoreError, OSError, ValueError) as error:
            self.ui.fineTuneStatusLabel.text = "Fine-tuning failed."
            self._showError(str(error))
            return
        self.showFineTuneResult(summary, run.runFolder)

    def showFineTuneResult(self, summary, runFolder):
        """Select the installed tuned model and show the base-versus-tuned table."""
        self.refreshModels(select=summary["package"])
        rows = self.logic.fineTuneTable(summary)
        table = self.ui.fineTuneTableWidget
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        table.show()
        self.ui.fineTuneStatusLabel.text = (
            f"Installed and selected {summary['package']} {summary['version']} (from {summary['base']}, "
            f"{summary['seconds']:.0f} s). Base against tuned on the held-out cases below; the run's files "
            f"are in {runFolder}.")
