"""In-Slicer test of the Python-console API: segmentFiles on phantom files, saveTrainingCase round trip."""

import json
import tempfile
import unittest
from pathlib import Path

import slicer


class ProstateSegConsoleTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()
        from ProstateSegLib import dependencies

        dependencies.ensureDependencies(askConfirmation=False)
        self.folder = Path(tempfile.mkdtemp(prefix="ProstateSegConsoleTest-"))

    def test_SegmentFilesWritesOutputsAndReportsBadInputs(self):
        from ProstateSeg import ProstateSegLogic
        from segcore.phantom import write_phantoms

        write_phantoms(self.folder / "cases", 2, seed=9200, matrix=192)
        (self.folder / "cases" / "notes_ct.nii.gz").write_text("not an image")
        items = ProstateSegLogic().segmentFiles(
            [self.folder / "cases" / "case000_ct.nii.gz", self.folder / "cases" / "case001_ct.nii.gz",
             self.folder / "cases" / "notes_ct.nii.gz", self.folder / "missing.nii.gz"],
            self.folder / "out", device="cpu")
        self.assertEqual([item.ok for item in items], [True, True, False, False])
        for stem in ("case000_ct_seg", "case001_ct_seg"):
            self.assertTrue((self.folder / "out" / f"{stem}.seg.nrrd").is_file())
            report = json.loads((self.folder / "out" / f"{stem}.json").read_text())
            self.assertTrue(report["found"])
        self.assertEqual(slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems(), 0)

    def test_SaveTrainingCaseRoundTrip(self):
        import SimpleITK as sitk

        from ProstateSeg import ProstateSegLogic
        from segcore.errors import OutputExistsError
        from segcore.phantom import write_phantoms

        ct_path = write_phantoms(self.folder / "cases", 1, seed=9201, matrix=192)[0]
        volume = slicer.util.loadVolume(str(ct_path))
        logic = ProstateSegLogic()
        segmentation = logic.segmentVolume(volume, device="cpu")
        ct_out, labels_out = logic.saveTrainingCase(volume, segmentation, self.folder / "dataset", "patient001")
        saved_ct, original = sitk.ReadImage(str(ct_out)), sitk.ReadImage(str(ct_path))
        self.assertTrue((sitk.GetArrayFromImage(saved_ct) == sitk.GetArrayFromImage(original)).all())
        self.assertEqual(sitk.ReadImage(str(labels_out)).GetSize(), original.GetSize())
        self.assertGreater(int(sitk.GetArrayFromImage(sitk.ReadImage(str(labels_out))).max()), 0)
        with self.assertRaises(OutputExistsError):  # an existing case is never overwritten silently
            logic.saveTrainingCase(volume, segmentation, self.folder / "dataset", "patient001")
