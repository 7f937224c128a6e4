"""ProstateSeg: one-click prostate segmentation of planning CT (two-stage network, segcore)."""

import os
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
from ProstateSegLib.sampledata import registerSampleData
from ProstateSegLib.selftest import SelfTestMixin
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
<b>Edit</b> (Segment Editor), or with <b>Refine</b>: place green include and red exclude points, each one corrects
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
Methods: two-stage prostate segmentation in CT with MetricUNet (voxel-metric learning), HF-UNet and HMEDN,
and the multi-organ HMR-Net, as published by their authors (see the README's citations).
"""
        # The phantom in Sample Data (for the whole extension), once Slicer has started; it is made on first use.
        slicer.app.connect("startupCompleted()", registerSampleData)


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


class ProstateSegTest(SelfTestMixin, ScriptedLoadableModuleTest):
    """Runs in Slicer (ctest, or the module's Reload and Test): logic, every network, Cancel, bad input,
    widget, sample data. Cancel and bad input come from SelfTestMixin."""

    moduleName = "ProstateSeg"
    applyText = "Segment prostate"
    selfTests = ("test_SegmentPhantom", "test_EveryStage2Network", "test_CancelLeavesSceneClean",
                 "test_BadInputIsRefused", "test_WidgetSegmentsAndEdits", "test_ExportDicom", "test_SampleData",
                 "test_FineTune", "test_Refine")
    phantomSeed = 9200
    phantomMatrix = 256

    def createLogic(self):
        return ProstateSegLogic()

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

    def test_WidgetSegmentsAndEdits(self):
        volume, _ = self.loadPhantom()
        widget = self.moduleWidget(volume)
        self.applyAndEdit(widget, "prostate")

    def test_SampleData(self):
        """The phantom in Sample Data: listed under ProstateSeg with a thumbnail; its button makes the
        files once, loads the CT and the reference organs; the module segments that CT."""
        import SampleData
        import SimpleITK as sitk

        from ProstateSegLib import sampledata
        from segcore import metrics, mrml

        sampledata.registerSampleData()  # done at start-up; registering again adds nothing
        sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory(sampledata.CATEGORY)
        self.assertEqual([s.sampleName for s in sources], [sampledata.SAMPLE_NAME])
        self.assertTrue(os.path.isfile(sources[0].thumbnailFileName))

        self.delayDisplay("Loading the ProstateSeg phantom from Sample Data")
        slicer.util.selectModule("SampleData")
        sampleDataWidget = slicer.modules.SampleDataWidget
        # the panel lists what was registered when it was made: list the sources again
        SampleData.SampleDataWidget.setCategoriesFromSampleDataSources(
            sampleDataWidget.categoryLayout, slicer.modules.sampleDataSources, sampleDataWidget.logic)
        button = slicer.util.findChild(sampleDataWidget.parent, f"{sampledata.SAMPLE_NAME}PushButton")
        button.click()
        volume = slicer.util.getNode(sampledata.CT_NODE_NAME)
        reference = slicer.util.getNode(sampledata.REFERENCE_NODE_NAME)
        segments = reference.GetSegmentation()
        names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
        self.assertEqual(names, ["prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right",
                                 "seminal_vesicles"])

        ctPath = sampledata.cacheFolder() / sampledata.CT_FILE
        madeAt = ctPath.stat().st_mtime_ns
        slicer.mrmlScene.Clear()
        volume, reference = sampledata.loadPhantomSample()  # the files are reused, not made again
        self.assertEqual(ctPath.stat().st_mtime_ns, madeAt)

        segmentation = ProstateSegLogic().segmentVolume(volume, device="cpu")
        found = sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(segmentation, volume, ["prostate"]))
        expected = sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(reference, volume, ["prostate"]))
        dice = metrics.mask_metrics(found == 1, expected == 1, volume.GetSpacing()[::-1]).dsc
        self.assertGreater(dice, 0.85)
        self.delayDisplay(f"Sample phantom: prostate Dice {dice:.3f}")
