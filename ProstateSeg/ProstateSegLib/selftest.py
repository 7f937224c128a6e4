"""What the extension's module self-tests share (run inside Slicer: ctest, or a module's Reload and Test).

A module's test class derives from `SelfTestMixin` and Slicer's
``ScriptedLoadableModuleTest`` (in that order), sets `moduleName`, `applyText`
and `selfTests` and a phantom (`phantomSeed`, `phantomMatrix`), makes its logic
in `createLogic`, and keeps only its own tests. The shared ones: Cancel leaves
the scene as it was, bad input is refused with nothing added, and the panel
segments and opens the result in the Segment Editor.
"""

import os
import tempfile

import slicer


class SelfTestMixin:
    """Loading a phantom, Cancel, bad input and the panel's Segment / Edit, for any segmentation module."""

    moduleName = ""  # e.g. "ProstateSeg": the module selected by the panel test
    applyText = ""  # what the Segment button reads when idle
    selfTests = ()  # names of the test methods runTest runs, in order
    phantomSeed = 9200  # held-out phantoms (not used in training)
    phantomMatrix = 512

    def createLogic(self):
        raise NotImplementedError

    def setUp(self):
        slicer.mrmlScene.Clear()
        from ProstateSegLib import dependencies

        dependencies.ensureDependencies(askConfirmation=False)

    def runTest(self):
        for name in self.selfTests:
            self.setUp()
            getattr(self, name)()

    # ------------------------------------------------------------------ helpers

    def loadPhantom(self, seed=None):
        """A held-out phantom CT and its reference labels (segcore PhantomCase); the CT is loaded
        from a file, as Slicer loads any volume."""
        import SimpleITK as sitk

        from segcore.phantom import make_phantom

        case = make_phantom(self.phantomSeed if seed is None else seed, matrix=self.phantomMatrix, orientation="RAS")
        folder = tempfile.mkdtemp(prefix=f"{self.moduleName}Test-")
        path = os.path.join(folder, "phantom_ct.nrrd")
        sitk.WriteImage(case.ct, path)
        return slicer.util.loadVolume(path), case

    def segmentationNodes(self):
        return slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()

    def moduleWidget(self, volume):
        """The module's panel, shown, with `volume` as input on the CPU."""
        slicer.util.selectModule(self.moduleName)
        widget = getattr(slicer.modules, self.moduleName.lower()).widgetRepresentation().self()
        widget._parameterNode.inputVolume = volume
        widget._parameterNode.device = "cpu"
        return widget

    def applyAndEdit(self, widget, shownText):
        """Click Segment: one segmentation whose result text holds `shownText`; then Edit opens it in the
        Segment Editor."""
        self.assertTrue(widget.ui.applyButton.enabled)
        widget.ui.applyButton.click()
        self.assertEqual(self.segmentationNodes(), 1)
        self.assertIn(shownText, widget.ui.resultLabel.text)
        self.assertEqual(widget.ui.applyButton.text, self.applyText)
        widget.ui.editButton.click()
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        self.assertEqual(editor.segmentationNode(), slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode"))

    def moduleBadInput(self, logic, volume):
        """A module's own refused inputs for `test_BadInputIsRefused` (a CT `volume` is loaded)."""

    # -------------------------------------------------------------------- tests

    def test_CancelLeavesSceneClean(self):
        from segcore.errors import Cancelled

        volume, _ = self.loadPhantom()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = self.createLogic()

        def cancelHalfway(fraction, message):
            if fraction > 0.3:
                logic.cancel()

        with self.assertRaises(Cancelled):
            logic.segmentVolume(volume, device="cpu", progress=cancelHalfway)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertEqual(self.segmentationNodes(), 0)

    def test_BadInputIsRefused(self):
        from segcore.errors import NotCTError, SegcoreError

        logic = self.createLogic()
        with self.assertRaises(SegcoreError):
            logic.segmentVolume(None)
        volume, _ = self.loadPhantom()
        self.moduleBadInput(logic, volume)
        labelmap = slicer.modules.volumes.logic().CreateAndAddLabelVolume(volume, "labels")
        with self.assertRaises(SegcoreError):
            logic.segmentVolume(labelmap)
        array = slicer.util.arrayFromVolume(volume)
        array[:] = (array - array.min()) // 4  # MR-like: no air at -1000 HU, no bone
        slicer.util.arrayFromVolumeModified(volume)
        with self.assertRaises(NotCTError):
            logic.segmentVolume(volume, device="cpu")
        self.assertEqual(self.segmentationNodes(), 0)
