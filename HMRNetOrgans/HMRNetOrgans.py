"""HMRNetOrgans: one-click segmentation of the pelvic organs in planning CT (HMR-Net, segcore)."""

from typing import Annotated

import qt
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

from ProstateSegLib.logic import OrganSegmentationLogic
from ProstateSegLib.selftest import SelfTestMixin
from ProstateSegLib.widgets import SegmentationWidgetBase

#
# HMRNetOrgans
#


class HMRNetOrgans(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HMRNetOrgans"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ProstateSeg developers"]
        self.parent.helpText = """
Segments the pelvic organs in a planning CT: bladder, rectum, femoral heads, prostate and seminal vesicles.
Choose the CT, tick the organs, click <b>Segment organs</b>. On every axial slice the HMR-Net network detects
each organ and regresses its contour; the contours are joined from slice to slice into one segment per organ
on the CT's own grid, with 3-D surfaces, volumes and confidences. Correct them with <b>Edit</b> (Segment
Editor), or with <b>Refine</b>: place green include and red exclude points, each one corrects
the chosen segment at once (<b>Undo last refinement</b> takes it back); save corrected cases for
fine-tuning with <b>Save as training case</b>.
<b>Export to DICOM</b> (Outputs) writes the segmentation as an RT Structure Set and/or DICOM SEG
for a CT loaded through the DICOM module.
<b>Improve the model</b> fine-tunes the chosen model on those saved cases in a background process and
installs and selects the tuned model, with a table comparing it with the base on held-out cases.
The bundled model was trained on synthetic phantoms only: check every result.
The extension's README explains models, the Python-console batch API and training.
"""
        self.parent.acknowledgementText = """
Method: HMR-Net, holistic multitask regression of organ class, location and contour, as published by its
authors (see the README's citations).
"""


#
# Parameters kept in the scene (restored when a scene is loaded)
#


@parameterNodeWrapper
class HMRNetOrgansParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode  # None: a new segmentation per run
    model: str = ""  # "" means the default model
    device: str = "auto"
    organs: str = ""  # comma-separated organ names; "" means every organ the model offers
    show3D: bool = True
    smoothing: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# HMRNetOrgansWidget
#


class HMRNetOrgansWidget(SegmentationWidgetBase):
    uiFile = "UI/HMRNetOrgans.ui"
    applyText = "Segment organs"

    def createLogic(self):
        return HMRNetOrgansLogic()

    def setup(self):
        SegmentationWidgetBase.setup(self)
        self.ui.organsListWidget.connect("itemChanged(QListWidgetItem*)", self.onOrganToggled)

    def onModelChosen(self, index=None):
        SegmentationWidgetBase.onModelChosen(self, index)
        self.refreshOrgans()

    def refreshOrgans(self):
        """One checkable row per organ the chosen model offers, ticked as the parameter node says."""
        listWidget = self.ui.organsListWidget
        listWidget.blockSignals(True)
        try:
            listWidget.clear()
            model = self.ui.modelComboBox.currentData
            if not model:
                return
            try:
                names = self.logic.organNames(model)
            except Exception as error:  # noqa: BLE001  a damaged package: say so, keep the panel usable
                self.ui.statusLabel.text = str(error)
                return
            chosen = self._chosenOrgans()
            for name in names:
                item = qt.QListWidgetItem(name.replace("_", " "))
                item.setData(qt.Qt.UserRole, name)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if chosen is None or name in chosen else qt.Qt.Unchecked)
                listWidget.addItem(item)
        finally:
            listWidget.blockSignals(False)

    def _chosenOrgans(self):
        text = self._parameterNode.organs if self._parameterNode else ""
        return None if not text else {name for name in text.split(",") if name}

    def onOrganToggled(self, item=None):
        listWidget = self.ui.organsListWidget
        items = [listWidget.item(row) for row in range(listWidget.count)]
        checked = [i.data(qt.Qt.UserRole) for i in items if i.checkState() == qt.Qt.Checked]
        if self._parameterNode:
            self._parameterNode.organs = "" if len(checked) == len(items) else ",".join(checked)
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None):
        SegmentationWidgetBase._checkCanApply(self, caller, event)
        listWidget = self.ui.organsListWidget
        if not self._running and listWidget.count and not any(
                listWidget.item(row).checkState() == qt.Qt.Checked for row in range(listWidget.count)):
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = "Tick at least one organ"

    def segmentOptions(self):
        chosen = self._chosenOrgans()
        return {"organs": None if chosen is None else sorted(chosen)}


#
# HMRNetOrgansLogic
#


class HMRNetOrgansLogic(ScriptedLoadableModuleLogic, OrganSegmentationLogic):
    """The console API, e.g. ``HMRNetOrgansLogic().segmentVolume(getNode("CT"), organs=["bladder"])``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        OrganSegmentationLogic.__init__(self)

    def getParameterNode(self):
        return HMRNetOrgansParameterNode(super().getParameterNode())


#
# HMRNetOrgansTest
#


class HMRNetOrgansTest(SelfTestMixin, ScriptedLoadableModuleTest):
    """Runs in Slicer (ctest, or the module's Reload and Test): logic, organ choice, Cancel, bad input, widget.
    Cancel and bad input come from SelfTestMixin."""

    moduleName = "HMRNetOrgans"
    applyText = "Segment organs"
    selfTests = ("test_SegmentPhantom", "test_ChosenOrgansOnly", "test_CancelLeavesSceneClean",
                 "test_BadInputIsRefused", "test_WidgetSegmentsAndEdits", "test_ExportDicom",
                 "test_FineTune", "test_Refine")
    phantomSeed = 9210
    phantomMatrix = 512

    def createLogic(self):
        return HMRNetOrgansLogic()

    def moduleBadInput(self, logic, volume):
        from segcore.errors import SegcoreError

        with self.assertRaises(SegcoreError):
            logic.segmentVolume(volume, device="cpu", organs=["liver"])

    def test_SegmentPhantom(self):
        import SimpleITK as sitk

        from segcore import anatomy, metrics, mrml

        self.delayDisplay("Segmenting the pelvic organs of a phantom with the bundled model")
        volume, case = self.loadPhantom()
        segmentation = HMRNetOrgansLogic().segmentVolume(volume, device="cpu")
        self.assertIsNotNone(segmentation)
        self.assertTrue(segmentation.GetSegmentation().ContainsRepresentation("Closed surface"))
        labels = sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(segmentation, volume))
        reference = sitk.GetArrayFromImage(case.labels)
        spacing = case.labels.GetSpacing()[::-1]
        for name in ("bladder", "femoral_head_left", "femoral_head_right"):
            value = anatomy.structure(name).value
            dice = metrics.mask_metrics(labels == value, reference == value, spacing).dsc
            self.assertGreater(dice, 0.75, name)
            self.delayDisplay(f"{name}: Dice {dice:.3f}")

    def test_ChosenOrgansOnly(self):
        volume, _ = self.loadPhantom()
        segmentation = HMRNetOrgansLogic().segmentVolume(volume, device="cpu", organs=["bladder", "rectum"])
        segments = segmentation.GetSegmentation()
        names = sorted(segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments()))
        self.assertEqual(names, ["bladder", "rectum"])

    def test_WidgetSegmentsAndEdits(self):
        volume, _ = self.loadPhantom()
        widget = self.moduleWidget(volume)
        organs = widget.ui.organsListWidget
        self.assertGreater(organs.count, 0)
        for row in range(organs.count):  # tick the bladder only
            item = organs.item(row)
            item.setCheckState(qt.Qt.Checked if item.data(qt.Qt.UserRole) == "bladder" else qt.Qt.Unchecked)
        self.assertEqual(widget._parameterNode.organs, "bladder")
        self.applyAndEdit(widget, "bladder")
        self.assertNotIn("rectum:", widget.ui.resultLabel.text)
