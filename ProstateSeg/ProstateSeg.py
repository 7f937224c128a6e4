"""ProstateSeg: one-click prostate segmentation of planning CT (two-stage network, segcore)."""

import os
import tempfile
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

from ProstateSegLib.logic import ProstateSegmentationLogic
from ProstateSegLib.widgets import SegmentationWidgetBase

#
# ProstateSeg
#


class ProstateSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ProstateSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ProstateSeg developers"]
        self.parent.helpText = """
Segments the prostate in a planning CT in a few seconds: choose the CT, click <b>Segment prostate</b>.
A coarse network finds the prostate, a second one segments a 1 mm crop around it; the result is a
segmentation on the CT's own grid with a 3-D surface, its volume and a confidence. Correct it with
<b>Edit</b> (Segment Editor); save corrected cases for fine-tuning with <b>Save as training case</b>.
The bundled model was trained on synthetic phantoms only: check every result.
The extension's README explains models, the Python-console batch API and training.
"""
        self.parent.acknowledgementText = """
Methods: two-stage prostate segmentation in CT with MetricUNet (voxel-metric learning), HF-UNet and HMEDN,
and the multi-organ HMR-Net, as published by their authors (see the README's citations).
"""


#
# Parameters kept in the scene (restored when a scene is loaded)
#


@parameterNodeWrapper
class ProstateSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode  # None: a new segmentation per run
    model: str = ""  # "" means the default model
    device: str = "auto"
    show3D: bool = True
    smoothing: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# ProstateSegWidget
#


class ProstateSegWidget(SegmentationWidgetBase):
    uiFile = "UI/ProstateSeg.ui"
    applyText = "Segment prostate"

    def createLogic(self):
        return ProstateSegLogic()


#
# ProstateSegLogic
#


class ProstateSegLogic(ScriptedLoadableModuleLogic, ProstateSegmentationLogic):
    """The console API, e.g. ``ProstateSegLogic().segmentVolume(getNode("CT"))``: see the README."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        ProstateSegmentationLogic.__init__(self)

    def getParameterNode(self):
        return ProstateSegParameterNode(super().getParameterNode())


#
# ProstateSegTest
#


class ProstateSegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (ctest, or the module's Reload and Test): logic, widget, Cancel, bad input."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        from ProstateSegLib import dependencies

        dependencies.ensureDependencies(askConfirmation=False)

    def runTest(self):
        self.setUp()
        self.test_SegmentPhantom()
        self.setUp()
        self.test_EveryStage2Network()
        self.setUp()
        self.test_CancelLeavesSceneClean()
        self.setUp()
        self.test_BadInputIsRefused()
        self.setUp()
        self.test_WidgetSegmentsAndEdits()

    def loadPhantom(self, seed=9200):
        """A held-out phantom CT (not used in training) and its reference labels, loaded as Slicer would."""
        import SimpleITK as sitk

        from segcore.phantom import make_phantom

        case = make_phantom(seed, matrix=256, orientation="RAS")
        folder = tempfile.mkdtemp(prefix="ProstateSegTest-")
        path = os.path.join(folder, "phantom_ct.nrrd")
        sitk.WriteImage(case.ct, path)
        return slicer.util.loadVolume(path), case

    def segmentationNodes(self):
        return slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()

    def test_SegmentPhantom(self):
        import SimpleITK as sitk

        from segcore import metrics, mrml

        self.delayDisplay("Segmenting a phantom with the bundled model")
        volume, case = self.loadPhantom()
        segmentation = ProstateSegLogic().segmentVolume(volume, device="cpu")
        self.assertIsNotNone(segmentation)
        self.assertTrue(segmentation.GetSegmentation().ContainsRepresentation("Closed surface"))
        labels = mrml.segmentation_node_to_labelmap(segmentation, volume, ["prostate"])
        reference = sitk.GetArrayFromImage(case.labels) == 1
        dice = metrics.mask_metrics(sitk.GetArrayFromImage(labels) == 1, reference, labels.GetSpacing()[::-1]).dsc
        self.assertGreater(dice, 0.85)
        self.delayDisplay(f"Dice {dice:.3f}")

    def test_EveryStage2Network(self):
        import SimpleITK as sitk

        from segcore import anatomy, metrics, mrml

        volume, case = self.loadPhantom()
        logic = ProstateSegLogic()
        for model in ("prostate-metricunet-demo", "prostate-hfunet-demo", "prostate-hmedn-demo"):
            self.delayDisplay(f"Segmenting a phantom with {model}")
            segmentation = logic.segmentVolume(volume, model=model, device="cpu")
            names = [s.name for s in logic.lastResult.segments]
            # HMEDN segments bladder and rectum with the prostate; every segment is in the node.
            expected = ["prostate", "bladder", "rectum"] if "hmedn" in model else ["prostate"]
            self.assertEqual(names, expected)
            self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), len(expected))
            labels = sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(segmentation, volume, expected))
            reference = sitk.GetArrayFromImage(case.labels)
            for name in expected:
                value = anatomy.structure(name).value
                dice = metrics.mask_metrics(labels == value, reference == value, volume.GetSpacing()[::-1]).dsc
                self.assertGreater(dice, 0.7, f"{model} {name}")

    def test_CancelLeavesSceneClean(self):
        from segcore.errors import Cancelled

        volume, _ = self.loadPhantom()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = ProstateSegLogic()

        def cancelHalfway(fraction, message):
            if fraction > 0.3:
                logic.cancel()

        with self.assertRaises(Cancelled):
            logic.segmentVolume(volume, device="cpu", progress=cancelHalfway)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertEqual(self.segmentationNodes(), 0)

    def test_BadInputIsRefused(self):
        from segcore.errors import NotCTError, SegcoreError

        logic = ProstateSegLogic()
        with self.assertRaises(SegcoreError):
            logic.segmentVolume(None)
        volume, _ = self.loadPhantom()
        labelmap = slicer.modules.volumes.logic().CreateAndAddLabelVolume(volume, "labels")
        with self.assertRaises(SegcoreError):
            logic.segmentVolume(labelmap)
        array = slicer.util.arrayFromVolume(volume)
        array[:] = (array - array.min()) // 4  # MR-like: no air at -1000 HU, no bone
        slicer.util.arrayFromVolumeModified(volume)
        with self.assertRaises(NotCTError):
            logic.segmentVolume(volume, device="cpu")
        self.assertEqual(self.segmentationNodes(), 0)

    def test_WidgetSegmentsAndEdits(self):
        volume, _ = self.loadPhantom()
        slicer.util.selectModule("ProstateSeg")
        widget = slicer.modules.prostateseg.widgetRepresentation().self()
        widget._parameterNode.inputVolume = volume
        widget._parameterNode.device = "cpu"
        self.assertTrue(widget.ui.applyButton.enabled)
        widget.ui.applyButton.click()
        self.assertEqual(self.segmentationNodes(), 1)
        self.assertIn("prostate", widget.ui.resultLabel.text)
        self.assertEqual(widget.ui.applyButton.text, "Segment prostate")
        widget.ui.editButton.click()
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        self.assertEqual(editor.segmentationNode(), slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode"))
