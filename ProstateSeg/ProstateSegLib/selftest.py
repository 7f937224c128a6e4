"""What the extension's module self-tests share (run inside Slicer: ctest, or a module's Reload and Test).

A module's test class derives from `SelfTestMixin` and Slicer's
``ScriptedLoadableModuleTest`` (in that order), sets `moduleName`, `applyText`
and `selfTests` and a phantom (`phantomSeed`, `phantomMatrix`), makes its logic
in `createLogic`, and keeps only its own tests. The shared ones: Cancel leaves
the scene as it was, bad input is refused with nothing added, the panel
segments and opens the result in the Segment Editor, a CT loaded through the
DICOM database exports RTSTRUCT and DICOM SEG (logic and panel), Improve the
model fine-tunes the module's default model on saved cases (logic and panel), and
Refine corrects a segment with include and exclude points (logic and panel).
"""

import os
import tempfile
import time

import slicer


class SelfTestMixin:
    """Loading a phantom, Cancel, bad input, the panel's Segment / Edit and Export to DICOM, for any
    segmentation module."""

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

    def loadDicomPhantom(self, folder, matrix=128):
        """A phantom CT written as a DICOM series in `folder`, imported into the DICOM database and loaded
        by the DICOM module (as a user does); returns the volume node, the case and the CT files. Call it
        inside ``DICOMUtils.TemporaryDICOMDatabase()``: the export looks the files up in that database."""
        import pydicom
        from DICOMLib import DICOMUtils

        from segcore.dicom.ct import write_ct_series
        from segcore.phantom import make_phantom

        case = make_phantom(self.phantomSeed, matrix=matrix, orientation="LPS")  # stored as DICOM reads it
        files = write_ct_series(case.ct, os.path.join(folder, "CT"), seed=f"{self.moduleName}-selftest")
        DICOMUtils.importDicom(os.path.join(folder, "CT"), slicer.dicomDatabase)
        seriesUID = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        (nodeID,) = DICOMUtils.loadSeriesByUID([seriesUID])
        return slicer.mrmlScene.GetNodeByID(nodeID), case, files

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

    def waitUntil(self, condition, seconds=120, what="the panel to finish"):
        """Keep Slicer's event loop running until `condition()` holds."""
        deadline = time.monotonic() + seconds
        while not condition():
            self.assertLess(time.monotonic(), deadline, f"waited {seconds} s for {what}")
            slicer.app.processEvents()
            time.sleep(0.02)

    def damagedProstate(self, volume, case):
        """A segmentation of the phantom's prostate, bladder and rectum with half the prostate cut away (a
        result to correct), the prostate's segment ID, the true prostate, and the world RAS position of a
        voxel in the middle of the cut-away half (where a user would click Include)."""
        import numpy as np
        import SimpleITK as sitk
        import vtk

        from segcore import anatomy, mrml

        labels = sitk.GetArrayFromImage(case.labels)
        truth = labels == 1
        damaged = np.where(labels <= 3, labels, 0).astype(np.uint8)
        middle = int(np.median(np.nonzero(truth)[2]))
        cut = truth.copy()
        cut[:, :, :middle] = False
        damaged[cut] = 0
        image = sitk.GetImageFromArray(damaged)
        image.CopyInformation(case.labels)
        structures = [anatomy.BY_NAME[name] for name in ("prostate", "bladder", "rectum")]
        segmentation = mrml.labelmap_to_segmentation_node(image, structures, volume, show_3d=False)
        missing = np.argwhere(cut)
        k, j, i = missing[np.argmin(((missing - missing.mean(axis=0)) ** 2).sum(axis=1))]
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        click = tuple(ijkToRas.MultiplyPoint([float(i), float(j), float(k), 1.0])[:3])
        prostateId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("prostate")
        return segmentation, prostateId, truth, click

    def moduleBadInput(self, logic, volume):
        """A module's own refused inputs for `test_BadInputIsRefused` (a CT `volume` is loaded)."""

    def waitForFineTune(self, widget, seconds=900):
        """Keep Slicer's event loop running until the panel's fine-tuning process has finished."""
        deadline = time.monotonic() + seconds
        while widget._fineTune is not None:
            self.assertLess(time.monotonic(), deadline, "the fine-tuning process did not finish")
            slicer.app.processEvents()
            time.sleep(0.05)

    def fineTuneWithLogic(self, cases, folder):
        """The console's fineTune: a refused dataset, then a short run whose tuned model is installed."""
        import json

        from segcore.errors import SegcoreError
        from segcore.phantom import write_phantoms

        logic = self.createLogic()
        write_phantoms(os.path.join(folder, "one"), 1, seed=7200, matrix=128)
        with self.assertRaises(SegcoreError) as refused:
            logic.fineTune(os.path.join(folder, "one"), device="cpu", iterations=2)
        self.assertIn("fine-tuning needs at least", str(refused.exception))
        self.assertNotIn("Traceback", str(refused.exception))

        self.delayDisplay(f"Fine-tuning {logic.defaultModel()} for 2 iterations (console)")
        summary = logic.fineTune(cases, device="cpu", iterations=2, name="selftest-ft")
        self.assertEqual(summary["package"], "selftest-ft")
        self.assertIn("selftest-ft", logic.modelNames())
        manifest = json.loads((logic.modelsFolder() / "selftest-ft" / "model.json").read_text())
        self.assertEqual(manifest["lineage"]["base"]["name"], logic.defaultModel())
        self.assertEqual({row["model"] for row in summary["rows"]}, {"base", "tuned"})

    def fineTuneInPanel(self, cases):
        """The panel's Improve the model: the folder of Save as training case, the case count, Fine-tune in a
        background process, then the tuned model installed and selected and the table shown."""
        volume, _ = self.loadPhantom()
        widget = self.moduleWidget(volume)
        widget.refreshModels()
        widget.ui.datasetFolderPathLineEdit.currentPath = cases
        self.assertTrue(os.path.samefile(widget.ui.fineTuneFolderPathLineEdit.currentPath, cases))
        self.assertEqual(widget.ui.fineTuneCasesLabel.text, "3 cases found.")
        widget.ui.fineTuneIterationsSpinBox.value = 2
        self.delayDisplay("Fine-tuning in the panel (background process)")
        widget.ui.fineTuneButton.click()
        self.assertTrue(widget.ui.fineTuneCancelButton.enabled)
        self.assertFalse(widget.ui.fineTuneButton.enabled)
        self.waitForFineTune(widget)
        tuned = widget.logic.tunedModelName(widget.logic.defaultModel())
        self.assertEqual(widget.ui.modelComboBox.currentData, tuned, widget.ui.fineTuneStatusLabel.text)
        self.assertTrue(widget.ui.fineTuneTableWidget.visible)
        self.assertGreaterEqual(widget.ui.fineTuneTableWidget.rowCount, 4)

        self.delayDisplay("Cancel stops the process; nothing is installed")
        widget.ui.fineTuneIterationsSpinBox.value = 600
        widget.logic.removeModel(tuned)
        widget.refreshModels()
        widget.ui.fineTuneButton.click()
        widget.ui.fineTuneCancelButton.click()
        self.waitForFineTune(widget, seconds=30)
        self.assertIn("Cancelled", widget.ui.fineTuneStatusLabel.text)
        self.assertNotIn(tuned, widget.logic.modelNames())

    # -------------------------------------------------------------------- tests

    def test_FineTune(self):
        """Improve the model on three phantom cases, with its own model folder (PROSTATESEG_HOME)."""
        from segcore.phantom import write_phantoms

        folder = tempfile.mkdtemp(prefix=f"{self.moduleName}FineTuneTest-")
        cases = os.path.join(folder, "cases")
        write_phantoms(cases, 3, seed=7200, matrix=128)
        home = os.environ.get("PROSTATESEG_HOME")
        os.environ["PROSTATESEG_HOME"] = os.path.join(folder, "home")
        try:
            self.fineTuneWithLogic(cases, folder)
            self.fineTuneInPanel(cases)
        finally:
            if home is None:
                os.environ.pop("PROSTATESEG_HOME", None)
            else:
                os.environ["PROSTATESEG_HOME"] = home
            widget = getattr(slicer.modules, self.moduleName.lower()).widgetRepresentation().self()
            widget.refreshModels()

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

    def test_ExportDicom(self):
        """A CT loaded through the DICOM database: its segmentation exports as RTSTRUCT and DICOM SEG that
        reference the CT's instances (console logic, then the panel's Export to DICOM); a CT read from a
        NRRD file is refused with what to do."""
        import pydicom
        import SimpleITK as sitk
        from DICOMLib import DICOMUtils

        from segcore import anatomy, mrml
        from segcore.dicom.rtstruct import rasterise, read_rtstruct
        from segcore.errors import SegcoreError

        folder = tempfile.mkdtemp(prefix=f"{self.moduleName}DicomTest-")
        structures = [anatomy.BY_NAME[name] for name in ("prostate", "bladder", "rectum")]
        logic = self.createLogic()
        with DICOMUtils.TemporaryDICOMDatabase():
            self.delayDisplay("Loading a phantom CT through the DICOM database")
            volume, case, files = self.loadDicomPhantom(folder)
            self.assertTrue(volume.GetAttribute("DICOM.instanceUIDs"))
            segmentation = mrml.labelmap_to_segmentation_node(case.labels, structures, volume, show_3d=False)

            self.delayDisplay("Exporting RTSTRUCT and DICOM SEG")
            rtstruct, seg = logic.exportDicom(segmentation, volume, os.path.join(folder, "out"))
            read = read_rtstruct(rtstruct)
            labels = sitk.GetArrayFromImage(case.labels)
            for roi, structure in zip(read.rois, structures):
                mask, problems = rasterise(roi, case.ct)
                self.assertEqual(problems, [])
                self.assertTrue((mask == (labels == structure.value)).all(), structure.name)
            ctUIDs = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
            referenced = {str(i.ReferencedSOPInstanceUID)
                          for i in pydicom.dcmread(seg).ReferencedSeriesSequence[0].ReferencedInstanceSequence}
            self.assertTrue(referenced and referenced <= ctUIDs)

            self.delayDisplay("Export to DICOM in the panel")
            widget = self.moduleWidget(volume)
            widget._parameterNode.outputSegmentation = segmentation
            widget.ui.rtstructCheckBox.checked = True
            widget.ui.dicomSegCheckBox.checked = False
            widget.ui.dicomFolderPathLineEdit.currentPath = os.path.join(folder, "panel")
            self.assertTrue(widget.ui.exportDicomButton.enabled)
            widget.ui.exportDicomButton.click()
            self.assertEqual(sorted(os.listdir(os.path.join(folder, "panel"))), [os.path.basename(str(rtstruct))])
            self.assertIn("Exported", widget.ui.statusLabel.text)
            widget._parameterNode.outputSegmentation = None

        self.delayDisplay("A CT read from a NRRD file is refused")
        path = os.path.join(folder, "ct.nrrd")
        sitk.WriteImage(case.ct, path)
        notDicom = slicer.util.loadVolume(path)
        drawn = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        drawn.SetReferenceImageGeometryParameterFromVolumeNode(notDicom)
        drawn.GetSegmentation().AddEmptySegment("prostate", "prostate")
        with self.assertRaises(SegcoreError) as refused:
            logic.exportDicom(drawn, notDicom, os.path.join(folder, "refused"))
        self.assertIn("Load the CT through the DICOM module", str(refused.exception))
        self.assertFalse(os.path.exists(os.path.join(folder, "refused")))

    def test_Refine(self):
        """Refine on a phantom prostate with half cut away: the console's refineSegment (an include point in
        RAS grows it towards the truth, the bladder is untouched, bad input is refused, undoRefine restores
        it), then the panel's Refine section: a point placed in the green Include list refines at once, a
        point outside the image is refused in the section's status and removed, Undo and Clear points."""
        import SimpleITK as sitk

        from segcore import metrics, mrml
        from segcore.errors import SegcoreError

        volume, case = self.loadPhantom()
        segmentation, prostateId, truth, click = self.damagedProstate(volume, case)
        spacing = volume.GetSpacing()[::-1]

        def segment(name):
            return sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(segmentation, volume, [name])) != 0

        def dice(mask):
            return metrics.mask_metrics(mask, truth, spacing).dsc

        self.delayDisplay("Refine (console): one include point in the missing half")
        logic = self.createLogic()
        before, bladder = segment("prostate"), segment("bladder")
        result = logic.refineSegment(segmentation, prostateId, volume, include=[click], device="cpu")
        self.assertGreater(result.details["added_voxels"], 0)
        self.assertGreater(dice(segment("prostate")), dice(before) + 0.03)
        self.assertTrue((segment("bladder") == bladder).all())
        with self.assertRaises(SegcoreError) as refused:
            logic.refineSegment(segmentation, prostateId, volume, include=[(0.0, 0.0, 5000.0)], device="cpu")
        self.assertIn("lies outside the image", str(refused.exception))
        self.assertEqual(logic.undoRefine(), prostateId)
        self.assertTrue((segment("prostate") == before).all())

        self.delayDisplay("Refine in the panel: place an include point")
        widget = self.moduleWidget(volume)
        widget.ui.refineCollapsibleButton.collapsed = False
        widget.ui.refineSegmentSelector.setCurrentNode(segmentation)
        widget.ui.refineSegmentSelector.setCurrentSegmentID(prostateId)
        include = widget.ui.includePlaceWidget.currentNode()
        exclude = widget.ui.excludePlaceWidget.currentNode()
        self.assertIsNotNone(include)
        self.assertIsNotNone(exclude)
        self.assertGreater(include.GetDisplayNode().GetSelectedColor()[1], 0.5)  # green
        self.assertGreater(exclude.GetDisplayNode().GetSelectedColor()[0], 0.5)  # red
        widget.ui.includePlaceWidget.setPlaceModeEnabled(True)  # the Include button, pressed
        self.assertTrue(widget.ui.includePlaceWidget.placeModeEnabled)
        widget.ui.refineStatusLabel.text = ""
        include.AddControlPoint(click)  # what a click in a slice view does now
        self.waitUntil(lambda: widget.ui.refineStatusLabel.text, what="the refinement")
        widget.ui.includePlaceWidget.setPlaceModeEnabled(False)
        self.assertIn("Refined prostate", widget.ui.refineStatusLabel.text)
        grown = segment("prostate")
        self.assertGreater(dice(grown), dice(before) + 0.03)
        self.assertTrue(widget.ui.refineUndoButton.enabled)

        self.delayDisplay("A point outside the image is refused and removed")
        widget.ui.refineStatusLabel.text = ""
        exclude.AddControlPoint((0.0, 0.0, 5000.0))
        self.waitUntil(lambda: widget.ui.refineStatusLabel.text, what="the refusal")
        self.assertIn("Not refined", widget.ui.refineStatusLabel.text)
        self.assertIn("lies outside the image", widget.ui.refineStatusLabel.text)
        self.assertEqual(exclude.GetNumberOfControlPoints(), 0)
        self.assertTrue((segment("prostate") == grown).all())

        self.delayDisplay("Undo last refinement, then Clear points")
        widget.ui.refineUndoButton.click()
        self.assertTrue((segment("prostate") == before).all())
        self.assertEqual(include.GetNumberOfControlPoints(), 0)
        widget.ui.refineStatusLabel.text = ""
        include.AddControlPoint(click)
        self.waitUntil(lambda: widget.ui.refineStatusLabel.text, what="the refinement")
        self.assertEqual(include.GetNumberOfControlPoints(), 1)
        self.assertTrue(widget.ui.refineClearButton.enabled)
        widget.ui.refineClearButton.click()
        self.assertEqual(include.GetNumberOfControlPoints(), 0)
        self.assertFalse((segment("prostate") == before).all())  # the segment stays as refined
