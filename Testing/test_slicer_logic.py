"""The Slicer modules' console API (ProstateSegLib.logic) on real MRML (slicer-core) and the real CT.

`ProstateSegLogic` in ProstateSeg.py is this logic plus Slicer's parameter-node
base class (which needs the application); everything it does is here.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, load_volume
from test_cli_segment import random_package

pytest.importorskip("slicer")
sys.path.insert(0, str(ROOT / "ProstateSeg"))

from ProstateSegLib.logic import ProstateSegmentationLogic
from segcore import mrml, packages
from segcore.errors import (
    Cancelled,
    InputNotFoundError,
    NotCTError,
    OutputExistsError,
    SegcoreError,
    UnsupportedImageError,
)


@pytest.fixture(scope="module")
def logic():
    return ProstateSegmentationLogic()


def test_segment_volume_adds_one_segmentation(mrml_scene, logic, pelvis_ct_path):
    volume = load_volume(mrml_scene, pelvis_ct_path)
    messages = []
    node = logic.segmentVolume(volume, device="cpu", progress=lambda f, m: messages.append((f, m)))
    assert node is not None and node.GetScene() is mrml_scene
    assert logic.lastResult.segment("prostate").volume_cc > 3
    assert mrml_scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("stage 2" in m for _, m in messages)
    exported = mrml.segmentation_node_to_labelmap(node, volume, ["prostate"])
    assert np.array_equal(sitk.GetArrayViewFromImage(exported), sitk.GetArrayViewFromImage(logic.lastResult.labelmap))


def test_cancel_leaves_the_scene_as_it_was(mrml_scene, logic, pelvis_ct_path):
    volume = load_volume(mrml_scene, pelvis_ct_path)
    before = mrml_scene.GetNumberOfNodes()

    def cancel_in_stage2(fraction, message):
        if "stage 2" in message:
            logic.cancel()

    with pytest.raises(Cancelled):
        logic.segmentVolume(volume, device="cpu", progress=cancel_in_stage2)
    assert mrml_scene.GetNumberOfNodes() == before
    assert logic.lastResult is None
    # the next run is not cancelled by the old request
    assert logic.segmentVolume(volume, device="cpu") is not None


def test_bad_input_is_refused_and_nothing_is_added(mrml_scene, logic, pelvis_labels_path, small_phantom, tmp_path):
    before = mrml_scene.GetNumberOfNodes()
    with pytest.raises(SegcoreError, match="no volume selected"):
        logic.segmentVolume(None)
    labels = mrml_scene.volumes_logic.AddArchetypeVolume(str(pelvis_labels_path), "labels", 1)
    with pytest.raises(UnsupportedImageError, match="label map"):
        logic.segmentVolume(labels)
    mr_like = sitk.Cast(sitk.RescaleIntensity(small_phantom.ct, 0, 900), sitk.sitkInt16)
    sitk.WriteImage(mr_like, str(tmp_path / "t1.nrrd"))
    mr = load_volume(mrml_scene, tmp_path / "t1.nrrd", "T1")
    with pytest.raises(NotCTError):
        logic.segmentVolume(mr, device="cpu")
    added = mrml_scene.GetNumberOfNodes() - before
    assert added == 2 * 3  # the two loaded volumes with their display and storage nodes, nothing else
    assert mrml_scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_segment_files_matches_the_cli_layout(mrml_scene, logic, pelvis_ct_path, tmp_path):
    missing = tmp_path / "missing_ct.nii.gz"
    items = logic.segmentFiles([pelvis_ct_path, missing], tmp_path / "out", device="cpu",
                               formats=("seg.nrrd", "nii.gz"))
    assert [item.ok for item in items] == [True, False]
    assert "does not exist" in items[1].error
    assert sorted(p.name for p in items[0].outputs) == ["example_ct_seg.json", "example_ct_seg.nii.gz",
                                                         "example_ct_seg.seg.nrrd"]
    written = sitk.ReadImage(str(tmp_path / "out" / "example_ct_seg.nii.gz"))
    assert np.count_nonzero(sitk.GetArrayViewFromImage(written) == 1) > 0
    assert mrml_scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0  # files only


def test_save_training_case_is_read_by_training(mrml_scene, logic, pelvis_ct_path, tmp_path):
    from training.data import folder_sources

    volume = load_volume(mrml_scene, pelvis_ct_path)
    node = logic.segmentVolume(volume, device="cpu")
    ct_path, labels_path = logic.saveTrainingCase(volume, node, tmp_path / "dataset", "patient001")
    (source,) = folder_sources(tmp_path / "dataset")
    assert source.case_id == "patient001" and source.labels_path == str(labels_path)
    saved = sitk.ReadImage(str(labels_path))
    assert np.array_equal(sitk.GetArrayViewFromImage(saved), sitk.GetArrayViewFromImage(logic.lastResult.labelmap))
    assert np.array_equal(sitk.GetArrayViewFromImage(sitk.ReadImage(str(ct_path))),
                          sitk.GetArrayViewFromImage(sitk.ReadImage(str(pelvis_ct_path))))
    with pytest.raises(OutputExistsError, match="already exists"):
        logic.saveTrainingCase(volume, node, tmp_path / "dataset", "patient001")
    with pytest.raises(SegcoreError, match="invalid case name"):
        logic.saveTrainingCase(volume, node, tmp_path / "dataset", "../elsewhere")


def test_install_and_remove_models(monkeypatch, tmp_path):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    logic = ProstateSegmentationLogic()
    assert logic.modelNames()[0] == logic.defaultModel()  # the bundled model comes first
    archive = packages.zip_package(random_package(tmp_path / "pkg" / "prostate-random").path)
    name = logic.installModel(archive, packages.sha256_file(archive))
    assert name == "prostate-random" and name in logic.modelNames()
    assert (logic.modelsFolder() / name).is_dir()
    other = packages.zip_package(random_package(tmp_path / "pkg2" / "organs-random", name="organs-random",
                                                task="organs").path)
    with pytest.raises(SegcoreError, match="for the 'organs' task"):
        logic.installModel(other, packages.sha256_file(other))
    assert "organs-random" not in [p.name for p in logic.modelsFolder().iterdir()]
    logic.removeModel(name)
    assert name not in logic.modelNames()
    with pytest.raises(SegcoreError, match="bundled"):
        logic.removeModel(logic.defaultModel())


def test_a_model_that_fails_to_load_is_named_and_adds_nothing(mrml_scene, pelvis_ct_path, tmp_path):
    from segcore.errors import ModelPackageError

    package = random_package(tmp_path / "prostate-broken")
    (package.path / "stage2.safetensors").write_bytes(b"not weights")
    volume = load_volume(mrml_scene, pelvis_ct_path)
    before = mrml_scene.GetNumberOfNodes()
    with pytest.raises(ModelPackageError, match="prostate-broken"):
        ProstateSegmentationLogic().segmentVolume(volume, model=str(package.path), device="cpu")
    assert mrml_scene.GetNumberOfNodes() == before


# --------------------------------------------------------------------------- HMRNetOrgans' logic


def test_organ_logic_segments_the_chosen_organs_on_the_real_ct(mrml_scene, pelvis_ct_path, tmp_path):
    from ProstateSegLib.logic import OrganSegmentationLogic

    organs = OrganSegmentationLogic()
    assert organs.defaultModel() in organs.modelNames()
    assert organs.organNames()[:3] == ["prostate", "bladder", "rectum"]
    volume = load_volume(mrml_scene, pelvis_ct_path)
    node = organs.segmentVolume(volume, device="cpu", organs=["bladder", "femoral_head_left"])
    segmentation = node.GetSegmentation()
    names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments()))
    assert names == ["bladder", "femoral_head_left"]
    exported = mrml.segmentation_node_to_labelmap(node, volume)
    a, b = sitk.GetArrayViewFromImage(exported), sitk.GetArrayViewFromImage(organs.lastResult.labelmap)
    assert np.array_equal(a, b)
    assert organs.lastResult.segment("bladder").volume_cc > 100   # the real bladder holds ~480 cc
    # The same logic object then delivers every organ again when none are named.
    organs.segmentVolume(volume, device="cpu")
    assert {s.name for s in organs.lastResult.segments} >= {"bladder", "rectum", "prostate"}
    with pytest.raises(SegcoreError, match="offers no 'liver'"):
        organs.segmentVolume(volume, device="cpu", organs=["liver"])
    items = organs.segmentFiles([pelvis_ct_path], tmp_path / "out", device="cpu", organs=["rectum"])
    assert items[0].ok and {s.name for s in items[0].result.segments} == {"rectum"}


def test_prostate_logic_with_hmedn_adds_its_three_organs(mrml_scene, logic, tmp_path):
    """Choosing the HMEDN package by name in the ProstateSeg logic gives prostate, bladder and rectum."""
    from segcore.phantom import make_phantom

    case = make_phantom(9100, matrix=256, orientation="RAS")
    sitk.WriteImage(case.ct, str(tmp_path / "phantom_ct.nrrd"))
    volume = load_volume(mrml_scene, tmp_path / "phantom_ct.nrrd")
    node = logic.segmentVolume(volume, model="prostate-hmedn-demo", device="cpu")
    names = ["prostate", "bladder", "rectum"]
    assert [s.name for s in logic.lastResult.segments] == names
    assert node.GetSegmentation().GetNumberOfSegments() == 3
    exported = mrml.segmentation_node_to_labelmap(node, volume, names)
    assert np.array_equal(sitk.GetArrayViewFromImage(exported), sitk.GetArrayViewFromImage(logic.lastResult.labelmap))


# --------------------------------------------------------------------------- Export to DICOM


class IndexedDicomDatabase:
    """What the export asks of ``slicer.dicomDatabase`` (a ctkDICOMDatabase: CTK and Qt, not in
    slicer-core): ``fileForInstance(uid)``, the file of an imported instance, "" for one it does not hold.
    Built like the database's index, from the imported files' headers."""

    def __init__(self, files):
        import pydicom

        self.files = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for f in files}

    def fileForInstance(self, uid):
        return self.files.get(uid, "")


@pytest.fixture
def dicom_phantom(tmp_path):
    """A phantom CT written as a DICOM series, and its labels."""
    from segcore.dicom.ct import write_ct_series
    from segcore.phantom import make_phantom

    case = make_phantom(9301, matrix=96, orientation="LPS")
    files = write_ct_series(case.ct, tmp_path / "dicom" / "CT", seed="slicer-export")
    return case, files


def load_dicom_volume(scene, files, name="2: synthetic pelvic CT"):
    """Load a CT series as Slicer's DICOMScalarVolumePlugin does: the archetype reader on the series' files
    (sorted along the slice normal), then the attribute DICOM.instanceUIDs (the slices' SOP Instance UIDs,
    space-separated) on the node."""
    import pydicom

    headers = [(f, pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
    normal = np.cross(*np.reshape([float(v) for v in headers[0][1].ImageOrientationPatient], (2, 3)))
    headers.sort(key=lambda fh: float(np.dot(normal, [float(v) for v in fh[1].ImagePositionPatient])))
    volume = load_volume(scene, headers[0][0], name)
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(str(h.SOPInstanceUID) for _, h in headers))
    return volume


def phantom_segmentation(case, volume, names=("prostate", "bladder", "rectum", "femoral_head_left")):
    from segcore import anatomy

    structures = [anatomy.BY_NAME[n] for n in names]
    return mrml.labelmap_to_segmentation_node(case.labels, structures, volume, show_3d=False), structures


def assert_rtstruct_is_the_labels(path, case, structures):
    from segcore.dicom.names import tg263_name
    from segcore.dicom.rtstruct import rasterise, read_rtstruct

    read = read_rtstruct(path)
    assert [roi.name for roi in read.rois] == [tg263_name(s) for s in structures]
    labels = sitk.GetArrayViewFromImage(case.labels)
    for roi, structure in zip(read.rois, structures):
        mask, problems = rasterise(roi, case.ct)
        assert not problems
        assert np.array_equal(mask, labels == structure.value), structure.name
    return read


def test_export_dicom_finds_the_ct_through_the_dicom_database(mrml_scene, logic, dicom_phantom, monkeypatch,
                                                               tmp_path):
    import pydicom
    import slicer

    case, files = dicom_phantom
    volume = load_dicom_volume(mrml_scene, files)
    node, structures = phantom_segmentation(case, volume)
    other = node.GetSegmentation().AddEmptySegment("PTV_70", "PTV_70")
    assert other
    node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("rectum")).SetName("Rectum")
    monkeypatch.setattr(slicer, "dicomDatabase", IndexedDicomDatabase(files), raising=False)

    written = logic.exportDicom(node, volume, tmp_path / "out")
    assert [p.name for p in written] == ["2_synthetic_pelvic_CT_rtstruct.dcm", "2_synthetic_pelvic_CT_seg.dcm"]
    read = assert_rtstruct_is_the_labels(written[0], case, structures)  # "Rectum" is the rectum (TG-263 name)
    ct = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert read.series_uids == [str(ct[0].SeriesInstanceUID)]
    assert any("'PTV_70' left out" in note for note in logic.lastExportNotes)

    seg = pydicom.dcmread(written[1])
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == ct[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [s.name for s in structures]
    ct_uids = {str(ds.SOPInstanceUID) for ds in ct}
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence} <= ct_uids
    frame_sources = {str(src.ReferencedSOPInstanceUID) for frame in seg.PerFrameFunctionalGroupsSequence
                     for derivation in frame.DerivationImageSequence for src in derivation.SourceImageSequence}
    assert frame_sources and frame_sources <= ct_uids
    # not the module's result: a hand-made (here: imported) segmentation is MANUAL, naming no algorithm
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    assert "SegmentationAlgorithmIdentificationSequence" not in seg.SegmentSequence[0]

    # the database no longer holds the files it lists: said, nothing written
    files[5].unlink()
    with pytest.raises(InputNotFoundError, match=f"1 of the {len(files)} DICOM files .* not on disk any more"):
        logic.exportDicom(node, volume, tmp_path / "out2")
    monkeypatch.setattr(slicer, "dicomDatabase", IndexedDicomDatabase(files[:5]))
    with pytest.raises(InputNotFoundError, match="no longer in Slicer's DICOM database"):
        logic.exportDicom(node, volume, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_export_dicom_without_the_database_reads_the_volumes_dicom_file(mrml_scene, logic, dicom_phantom,
                                                                         tmp_path):
    """Plain MRML, or a CT read from a DICOM file with Add Data: the series is found beside that file. The
    scan runs feet to head (k along -z): Slicer loads its slices in the other order, and the export finds
    each slice's instance by geometry."""
    import slicer

    from segcore import anatomy
    from segcore.dicom.ct import write_ct_series
    from segcore.dicom.rtstruct import rasterise, read_rtstruct
    from segcore.phantom import make_phantom

    assert getattr(slicer, "dicomDatabase", None) is None
    case = make_phantom(9302, matrix=96, orientation="LPI")
    files = write_ct_series(case.ct, tmp_path / "dicom" / "CT", seed="slicer-export-lpi")
    volume = load_dicom_volume(mrml_scene, files)
    grid = mrml.volume_node_to_image(volume)
    assert grid.GetDirection()[8] == -case.ct.GetDirection()[8]  # the slices in the other order
    labels = sitk.Resample(case.labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(np.flip(sitk.GetArrayViewFromImage(labels), 0), sitk.GetArrayViewFromImage(case.labels))
    structures = [anatomy.BY_NAME["bladder"], anatomy.BY_NAME["prostate"]]
    node = mrml.labelmap_to_segmentation_node(labels, structures, volume, show_3d=False)
    (path,) = logic.exportDicom(node, volume, tmp_path / "out", formats=["rtstruct"],
                                roiNames={"prostate": "Prostate_AI"})
    read = read_rtstruct(path)
    assert [roi.name for roi in read.rois] == ["Prostate_AI", "Bladder"]
    for roi, value in zip(read.rois, (1, 2)):
        assert np.array_equal(rasterise(roi, case.ct)[0], sitk.GetArrayViewFromImage(case.labels) == value)

    # an existing output is not replaced silently, and stays as it was
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        logic.exportDicom(node, volume, tmp_path / "out", formats=["rtstruct", "dicom-seg"])
    assert path.read_bytes() == before and not (tmp_path / "out" / "2_synthetic_pelvic_CT_seg.dcm").exists()
    written = logic.exportDicom(node, volume, tmp_path / "out", formats=["rtstruct"], overwrite=True)
    assert written == [path] and read_rtstruct(path).sop_instance_uid != read.sop_instance_uid


def test_export_dicom_refuses_a_volume_not_from_dicom(mrml_scene, logic, small_phantom, tmp_path):
    sitk.WriteImage(small_phantom.ct, str(tmp_path / "ct.nrrd"))
    volume = load_volume(mrml_scene, tmp_path / "ct.nrrd")
    node, _ = phantom_segmentation(small_phantom, volume, ("prostate",))
    with pytest.raises(SegcoreError, match="was not loaded from DICOM .*Load the CT through the DICOM module"):
        logic.exportDicom(node, volume, tmp_path / "out")
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3.4 1.2.3.5")  # a DICOM volume saved as .nrrd, no database
    with pytest.raises(SegcoreError, match="came from DICOM, but its files cannot be found"):
        logic.exportDicom(node, volume, tmp_path / "out")
    with pytest.raises(SegcoreError, match="not nii.gz"):
        logic.exportDicom(node, volume, tmp_path / "out", formats=["rtstruct", "nii.gz"])
    assert not (tmp_path / "out").exists()


def test_export_dicom_names_the_model_of_an_unedited_result(mrml_scene, logic, dicom_phantom, tmp_path):
    import pydicom

    _, files = dicom_phantom
    volume = load_dicom_volume(mrml_scene, files)
    node = logic.segmentVolume(volume, device="cpu", show3D=False)
    assert node is not None
    result = logic.lastResult
    (path,) = logic.exportDicom(node, volume, tmp_path / "auto", formats=["dicom-seg"])
    seg = pydicom.dcmread(path)
    assert seg.SegmentSequence[0].SegmentAlgorithmName == result.model
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"

    # a corrected result is no longer the model's alone
    labels = mrml.segmentation_node_to_labelmap(node, volume, ["prostate"])
    array = sitk.GetArrayFromImage(labels)
    array[array.shape[0] // 2, :3, :3] = 1
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(labels)
    mrml.labelmap_to_segmentation_node(edited, [result.segments[0].structure], volume, node, show_3d=False)
    (path,) = logic.exportDicom(node, volume, tmp_path / "edited", formats=["dicom-seg"])
    description = pydicom.dcmread(path).SegmentSequence[0]
    assert description.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert description.SegmentAlgorithmName == result.model


# --------------------------------------------------------------------------- Improve the model (fine-tuning)


@pytest.fixture(scope="module")
def three_cases(tmp_path_factory):
    """Three small phantom training cases, as Save as training case leaves them."""
    from segcore.phantom import write_phantoms

    folder = tmp_path_factory.mktemp("finetune") / "cases"
    write_phantoms(folder, 3, seed=7200, matrix=128)
    return folder


def test_fine_tune_command_maps_the_options(monkeypatch, tmp_path):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    logic = ProstateSegmentationLogic()
    argv, cwd, run = logic.fineTuneCommand(tmp_path / "cases", iterations=5, stages="all", device="cpu",
                                           validation=tmp_path / "held", overwrite=True)
    name = f"{logic.defaultModel()}-ft"
    folder = tmp_path / "home" / "finetune" / name
    assert argv[:4] == [sys.executable, "-u", "-m", "training.finetune"]
    assert argv[4:] == ["--model", logic.defaultModel(), "--data", str(tmp_path / "cases"),
                        "--export", str(folder / "package"), "--output", str(folder / "run"), "--name", name,
                        "--install", "--iterations", "5", "--stages", "all", "--device", "cpu",
                        "--validation", str(tmp_path / "held"), "--overwrite"]
    assert run == folder / "run"
    assert (cwd / "segcore").is_dir() and (cwd / "training" / "finetune.py").is_file()
    argv, _, run = logic.fineTuneCommand("cases", model="prostate-hmedn-demo", name="mine", output=tmp_path / "r")
    assert "--overwrite" not in argv and "--iterations" not in argv and "--resume" not in argv
    assert argv[argv.index("--data") + 1] == str(Path("cases").resolve())  # the process runs elsewhere
    assert argv[argv.index("--name") + 1] == "mine" and run == tmp_path / "r"
    assert logic.fineTuneProgress("[ 42%] training: iteration 120/600") == (0.42, "training: iteration 120/600")
    assert logic.fineTuneProgress("  case 1/3 ready") is None


def test_training_case_count_says_what_it_found(logic, three_cases, tmp_path):
    from segcore.phantom import write_phantoms

    assert logic.trainingCaseCount(three_cases) == (3, "3 cases found.")
    write_phantoms(tmp_path / "one", 1, seed=7200, matrix=128)
    assert logic.trainingCaseCount(tmp_path / "one") == (1, "1 case found.")
    assert logic.trainingCaseCount("")[0] == 0 and "Choose the dataset folder" in logic.trainingCaseCount("")[1]
    count, text = logic.trainingCaseCount(tmp_path / "missing")
    assert count == 0 and text.endswith("does not exist.")
    (tmp_path / "one" / "case000_labels.nii.gz").rename(tmp_path / "one" / "elsewhere.nii.gz")
    count, text = logic.trainingCaseCount(tmp_path / "one")
    assert count == 0 and "has no label map beside it" in text


def test_fine_tune_installs_the_tuned_model_and_compares_it(monkeypatch, tmp_path, three_cases):
    import json

    from training.finetune import tuned_name

    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    logic = ProstateSegmentationLogic()
    reports = []
    summary = logic.fineTune(three_cases, model="prostate-metricunet-demo", iterations=2, device="cpu",
                             progress=lambda f, m: reports.append((f, m)))
    name = "prostate-metricunet-demo-ft"
    assert logic.tunedModelName("prostate-metricunet-demo") == tuned_name("prostate-metricunet-demo") == name
    assert summary["package"] == name and summary["installed"] == str(logic.modelsFolder() / name)
    assert name in logic.modelNames()
    manifest = json.loads((logic.modelsFolder() / name / "model.json").read_text())
    assert manifest["lineage"]["base"]["name"] == "prostate-metricunet-demo"

    run = logic.fineTuneFolder(name) / "run"
    held_out = json.loads((run / "split.json").read_text())["held_out"]
    assert len(held_out) == summary["held_out"]["cases"] == 2
    assert sorted((r["case"], r["model"]) for r in summary["rows"]) == sorted(
        (case, model) for case in held_out for model in ("base", "tuned"))
    assert set(summary["held_out"]["base"]) == set(summary["held_out"]["tuned"]) == {"prostate"}
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m == "training: iteration 2/2" for _, m in reports)

    table = logic.fineTuneTable(summary)
    assert table[0][:3] == ("mean of 2", "prostate", "DSC") and len(table) == 4 + 2
    tuned = summary["held_out"]["tuned"]["prostate"]["dsc"]["mean"]
    assert table[0][4] == f"{tuned:.3f}"
    assert {row[0] for row in table[4:]} == set(held_out)

    # Fine-tuning again under the same name must not replace the installed model silently, nor its run.
    with pytest.raises(SegcoreError, match="installed already.*overwrite=True"):
        logic.fineTune(three_cases, model="prostate-metricunet-demo", iterations=2)
    assert (run / "summary.json").is_file()


def test_fine_tune_refuses_too_few_cases_in_words(monkeypatch, tmp_path):
    from segcore.phantom import write_phantoms

    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    write_phantoms(tmp_path / "one", 1, seed=7200, matrix=128)
    logic = ProstateSegmentationLogic()
    with pytest.raises(SegcoreError) as refused:
        logic.fineTune(tmp_path / "one", iterations=2, device="cpu")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'one'} has 1 case(s); fine-tuning needs at least 3")
    assert "Traceback" not in message and "\n" not in message
    assert not logic.modelsFolder().exists() or not any(logic.modelsFolder().iterdir())


def test_cancel_stops_the_fine_tuning_process(monkeypatch, tmp_path, three_cases):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    logic = ProstateSegmentationLogic()

    def cancel_when_working(fraction, message):
        if message.startswith("base model"):
            logic.cancel()

    with pytest.raises(Cancelled):
        logic.fineTune(three_cases, iterations=2, device="cpu", progress=cancel_when_working)
    run = logic.fineTuneFolder(logic.tunedModelName()) / "run"
    assert (run / "split.json").is_file()                     # it had started ...
    assert not (run / "stage2").exists() and not (run / "summary.json").exists()   # ... and was stopped
    assert logic.tunedModelName() not in logic.modelNames()
    assert not (logic.modelsFolder() / logic.tunedModelName()).exists()
