"""The Slicer modules' console API (ProstateSegLib.logic) on real MRML (slicer-core) and the real CT.

`ProstateSegLogic` in ProstateSeg.py is this logic plus Slicer's parameter-node
base class (which needs the application); everything it does is here.
"""

import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, load_volume
from test_cli_segment import random_package

pytest.importorskip("slicer")
sys.path.insert(0, str(ROOT / "ProstateSeg"))

from ProstateSegLib.logic import ProstateSegmentationLogic
from segcore import mrml, packages
from segcore.errors import Cancelled, NotCTError, OutputExistsError, SegcoreError, UnsupportedImageError


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
