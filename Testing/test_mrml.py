"""segcore.mrml against Slicer's real MRML (slicer-core): real CT in, segmentation nodes out."""

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import load_volume

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from segcore import anatomy, metrics, mrml
from segcore.errors import GeometryError, NotCTError, SegcoreError, UnsupportedImageError


def rotation(axis, degrees):
    return sitk.VersorTransform(tuple(axis), np.radians(degrees)).GetMatrix()


@pytest.fixture(scope="module")
def ct_variants(tmp_path_factory, pelvis_ct_path):
    """The real pelvic CT as stored (RAS on disk), and copies stored flipped/permuted and on an oblique grid."""
    folder = tmp_path_factory.mktemp("variants")
    original = sitk.ReadImage(str(pelvis_ct_path))
    permuted = sitk.Flip(sitk.PermuteAxes(original, [2, 0, 1]), [True, False, True])
    oblique_grid = sitk.Image(original.GetSize(), original.GetPixelID())
    oblique_grid.SetSpacing(original.GetSpacing())
    oblique_grid.SetDirection(np.asarray(rotation((1, 1, 0.3), 14)).ravel().tolist())
    oblique_grid.SetOrigin(original.GetOrigin())
    oblique = sitk.Resample(original, oblique_grid, sitk.Transform(), sitk.sitkLinear, -1024)
    files = {"stored": pelvis_ct_path}
    for name, image in (("permuted", permuted), ("oblique", oblique)):
        files[name] = folder / f"{name}_ct.nrrd"
        sitk.WriteImage(image, str(files[name]))
    return files


def vtk_image(array_kji):
    from vtk.util.numpy_support import numpy_to_vtk

    data = vtk.vtkImageData()
    data.SetDimensions(array_kji.shape[::-1])
    data.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(array_kji).ravel(), deep=True))
    return data


def assert_same_image(image, reference):
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))


@pytest.mark.parametrize("variant", ["stored", "permuted", "oblique"])
def test_volume_node_converts_exactly(mrml_scene, ct_variants, variant):
    node = load_volume(mrml_scene, ct_variants[variant])
    image = mrml.volume_node_to_image(node)
    assert_same_image(image, sitk.ReadImage(str(ct_variants[variant])))
    # and back: the same voxel index lands on the same RAS point in Slicer
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    index = (7, 40, 90)
    ras = ijk_to_ras.MultiplyPoint((*index, 1))[:3]
    lps = image.TransformIndexToPhysicalPoint(index)
    np.testing.assert_allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-4)


def test_linear_parent_transform_is_applied_and_nonlinear_refused(mrml_scene, pelvis_ct_path):
    node = load_volume(mrml_scene, pelvis_ct_path)
    plain = mrml.volume_node_to_image(node)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkMatrix4x4()
    turn = np.asarray(rotation((0, 0, 1), 30)).reshape(3, 3)
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, turn[r, c])
    matrix.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())

    moved = mrml.volume_node_to_image(node)
    index = (10, 20, 30)
    ras = np.r_[plain.TransformIndexToPhysicalPoint(index), 1.0] * [-1, -1, 1, 1]
    expected_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]) @ ras
    np.testing.assert_allclose(moved.TransformIndexToPhysicalPoint(index),
                               expected_ras[:3] * [-1, -1, 1], atol=1e-4)
    assert np.array_equal(sitk.GetArrayViewFromImage(moved), sitk.GetArrayViewFromImage(plain))

    grid = mrml_scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(UnsupportedImageError, match="non-linear transform 'warp'.*Harden"):
        mrml.volume_node_to_image(node)


def test_unsuitable_nodes_are_refused_clearly(mrml_scene, pelvis_labels_path, small_phantom):
    with pytest.raises(SegcoreError, match="no volume selected"):
        mrml.volume_node_to_image(None)
    labels = mrml_scene.volumes_logic.AddArchetypeVolume(str(pelvis_labels_path), "labels", 1)  # 1: as label map
    assert labels.IsA("vtkMRMLLabelMapVolumeNode")
    with pytest.raises(UnsupportedImageError, match="is a label map"):
        mrml.volume_node_to_image(labels)

    vector = mrml_scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    data = vtk.vtkImageData()
    data.SetDimensions(8, 8, 8)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(data)
    with pytest.raises(UnsupportedImageError, match="vector or colour"):
        mrml.volume_node_to_image(vector)

    flat = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "one slice")
    flat.SetAndObserveImageData(vtk_image(np.zeros((1, 64, 64), np.int16)))
    with pytest.raises(UnsupportedImageError, match="2-D image"):
        mrml.volume_node_to_image(flat)

    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(UnsupportedImageError, match="holds no voxels"):
        mrml.volume_node_to_image(empty)


@pytest.fixture(scope="module")
def segmenter():
    from segcore.prostate import ProstateSegmenter

    return ProstateSegmenter(device="cpu")


@pytest.fixture(scope="module")
def cli_outputs(tmp_path_factory, ct_variants):
    """`prostateseg segment` on the stored and the permuted file: label maps as the CLI writes them."""
    from segcore.cli import main

    out = tmp_path_factory.mktemp("cli")
    assert main(["-q", "segment", str(ct_variants["stored"]), str(ct_variants["permuted"]), "-o", str(out),
                 "--formats", "nii.gz", "--device", "cpu"]) == 0
    return {"stored": sitk.ReadImage(str(out / "example_ct_seg.nii.gz")),
            "permuted": sitk.ReadImage(str(out / "permuted_ct_seg.nii.gz"))}


@pytest.mark.parametrize("variant", ["stored", "permuted"])
def test_segmentation_node_matches_the_cli_voxel_for_voxel(mrml_scene, segmenter, ct_variants, cli_outputs,
                                                           variant):
    node = load_volume(mrml_scene, ct_variants[variant])
    before = node.GetImageData().GetScalarComponentAsDouble(60, 50, 100, 0), node.GetMTime()
    result = segmenter(mrml.volume_node_to_image(node))
    assert result.found
    segmentation_node = mrml.result_to_segmentation_node(result, node)

    exported = mrml.segmentation_node_to_labelmap(segmentation_node, node, ["prostate"])
    assert_same_image(exported, sitk.Cast(cli_outputs[variant], exported.GetPixelID()))
    # the stored and the permuted file put the prostate in the same physical place (the pipeline's
    # resampling sees the two grids' float origins differ in the last bits, so not to the voxel)
    on_stored_grid = sitk.Resample(exported, cli_outputs["stored"], sitk.Transform(), sitk.sitkNearestNeighbor)
    agreement = metrics.mask_metrics(sitk.GetArrayViewFromImage(on_stored_grid) == 1,
                                     sitk.GetArrayViewFromImage(cli_outputs["stored"]) == 1, exported.GetSpacing()[::-1])
    assert agreement.dsc > 0.97, agreement
    centres = [metrics.centroids(image)[1] for image in (exported, cli_outputs["stored"])]
    assert np.linalg.norm(np.subtract(*centres)) < 1.0
    # the input volume is untouched
    assert (node.GetImageData().GetScalarComponentAsDouble(60, 50, 100, 0), node.GetMTime()) == before


@pytest.fixture
def segmented(mrml_scene, segmenter, pelvis_ct_path):
    node = load_volume(mrml_scene, pelvis_ct_path)
    return node, segmenter(mrml.volume_node_to_image(node))


def test_new_segmentation_node_is_complete(mrml_scene, segmented, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    node, result = segmented
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "planning CT")
    hierarchy.CreateItem(study, node)  # what Slicer's subject hierarchy plugins do for a loaded volume

    segmentation_node = mrml.result_to_segmentation_node(result, node)
    assert segmentation_node.GetName() == "ct segmentation"
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation_node)) == study
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("prostate"))
    assert segment.GetLabelValue() == 1
    np.testing.assert_allclose(segment.GetColor(), np.array(anatomy.structure("prostate").color) / 255)
    entry = slicer.vtkSlicerTerminologyEntry()
    tag = vtk.reference("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(str(tag), entry)
    assert (entry.GetCategoryObject().GetCodeValue(), entry.GetTypeObject().GetCodeValue()) == ("123037004", "41216001")
    # geometry and 3-D surface
    assert segmentation.ContainsRepresentation("Closed surface")
    surface = segmentation_node.GetClosedSurfaceInternalRepresentation(segmentation.GetNthSegmentID(0))
    assert surface.GetNumberOfPoints() > 100
    bounds = np.array(surface.GetBounds()).reshape(3, 2)  # RAS
    centre_lps = np.array(result.details["center_lps_mm"])
    assert np.all(np.abs(bounds.mean(axis=1) - centre_lps * [-1, -1, 1]) < 20)

    # the node's own storage node writes a .seg.nrrd that slicerio reads back with names and terminology
    storage = segmentation_node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "prostate.seg.nrrd"))
    assert storage.WriteData(segmentation_node)
    written = slicerio.read_segmentation(str(tmp_path / "prostate.seg.nrrd"))
    (saved,) = written["segments"]
    assert saved["name"] == "prostate" and saved["labelValue"] == 1
    assert saved["terminology"]["type"] == ["SCT", "41216001", "Prostate"]
    from segcore.export import read_seg_nrrd

    read_back, _ = read_seg_nrrd(tmp_path / "prostate.seg.nrrd")
    on_ct_grid = sitk.Resample(read_back, result.labelmap, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(sitk.GetArrayViewFromImage(on_ct_grid) > 0,
                          sitk.GetArrayViewFromImage(result.labelmap) > 0)


def test_existing_segmentation_keeps_its_other_segments(mrml_scene, segmented):
    node, result = segmented
    existing = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my contours")
    existing.SetReferenceImageGeometryParameterFromVolumeNode(node)
    size = node.GetImageData().GetDimensions()
    mine = np.zeros(size[::-1], np.uint8)
    mine[40:60, 30:50, 50:70] = 1
    old_prostate = np.zeros(size[::-1], np.uint8)
    old_prostate[5:10, 5:10, 5:10] = 1
    for name, array in (("my bladder", mine), ("prostate", old_prostate)):
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(existing.GetSegmentation().AddEmptySegment(name, name))
        labelmap = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        labelmap.CopyOrientation(node)
        labelmap.SetAndObserveImageData(vtk_image(array))
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, existing, ids)
        mrml_scene.RemoveNode(labelmap)
    ids_before = [existing.GetSegmentation().GetNthSegmentID(n) for n in range(2)]

    def segment_array(name):
        return sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(existing, node, [name])) > 0

    returned = mrml.result_to_segmentation_node(result, node, existing, show_3d=False)
    assert returned is existing
    segmentation = existing.GetSegmentation()
    assert [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())] == ids_before
    assert np.array_equal(segment_array("my bladder"), mine > 0)
    assert np.array_equal(segment_array("prostate"), sitk.GetArrayViewFromImage(result.labelmap) == 1)

    count = mrml_scene.GetNumberOfNodes()
    both = mrml.segmentation_node_to_labelmap(existing, node, ["my bladder", "prostate"])
    assert mrml_scene.GetNumberOfNodes() == count  # exporting leaves nothing behind in the scene
    values = sitk.GetArrayViewFromImage(both)
    assert np.array_equal(values == 18, mine > 0)  # a user's own segment gets a value after the catalogue's
    assert np.array_equal(values == 1, sitk.GetArrayViewFromImage(result.labelmap) == 1)
    with pytest.raises(SegcoreError, match="no segment named 'rectum'.*my bladder, prostate"):
        mrml.segmentation_node_to_labelmap(existing, node, ["rectum"])


def test_failures_leave_no_partial_nodes(mrml_scene, segmented, small_phantom):
    node, result = segmented
    count = mrml_scene.GetNumberOfNodes()
    wrong_grid = type(result)(small_phantom.labels, result.segments, 1.0, "test")
    with pytest.raises(GeometryError, match="does not lie on the grid"):
        mrml.result_to_segmentation_node(wrong_grid, node)
    assert mrml_scene.GetNumberOfNodes() == count


def test_mr_volume_is_refused_by_the_pipeline(mrml_scene, segmenter, tmp_path, small_phantom):
    mr_like = sitk.Cast(sitk.RescaleIntensity(small_phantom.ct, 0, 800), sitk.sitkInt16)
    sitk.WriteImage(mr_like, str(tmp_path / "mr.nrrd"))
    node = load_volume(mrml_scene, tmp_path / "mr.nrrd", "MR")
    with pytest.raises(NotCTError):
        segmenter(mrml.volume_node_to_image(node))


def test_volume_under_a_linear_transform_gets_its_segmentation_there(mrml_scene, segmenter, pelvis_ct_path):
    node = load_volume(mrml_scene, pelvis_ct_path)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "table shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(1, 3, -40.0)
    matrix.SetElement(2, 3, 15.0)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())

    result = segmenter(mrml.volume_node_to_image(node))
    segmentation_node = mrml.result_to_segmentation_node(result, node, show_3d=False)
    assert segmentation_node.GetTransformNodeID() == transform.GetID()
    exported = mrml.segmentation_node_to_labelmap(segmentation_node, node, ["prostate"])
    assert_same_image(exported, sitk.Cast(result.labelmap, exported.GetPixelID()))
    # a pure translation moves the anatomy, not the voxels: the same label map as without the transform
    node.SetAndObserveTransformNodeID(None)
    plain = segmenter(mrml.volume_node_to_image(node))
    assert np.array_equal(sitk.GetArrayViewFromImage(plain.labelmap), sitk.GetArrayViewFromImage(result.labelmap))


def test_several_segments_keep_their_own_voxels_and_label_values(mrml_scene, small_phantom, tmp_path):
    """Organs with non-consecutive catalogue values (bladder 2, femoral head 4): each segment holds exactly
    its organ's voxels, carries its catalogue label value, and so does the .seg.nrrd its storage node writes.
    (Setting a label value in a shared labelmap used to hand the segment another organ's voxels.)"""
    slicerio = pytest.importorskip("slicerio")
    from segcore.result import Result, SegmentResult

    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(small_phantom.ct, str(path))
    volume = load_volume(mrml_scene, path)
    labels = sitk.GetArrayFromImage(small_phantom.labels)
    wanted = np.where(np.isin(labels, [2, 4]), labels, 0).astype(np.uint8)
    labelmap = sitk.GetImageFromArray(wanted)
    labelmap.CopyInformation(small_phantom.ct)
    for order in ([2, 4], [4, 2]):
        result = Result(labelmap, [SegmentResult(anatomy.structure(v), 1.0, 1.0) for v in order], 1.0, "test")
        node = mrml.result_to_segmentation_node(result, volume, show_3d=False)
        back = sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(node, volume))
        assert np.array_equal(back, wanted), order
        segmentation = node.GetSegmentation()
        for value in order:
            name = anatomy.structure(value).name
            assert segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name)).GetLabelValue() == value
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "organs.seg.nrrd"))
    assert storage.WriteData(node)
    written = slicerio.read_segmentation(str(tmp_path / "organs.seg.nrrd"))
    assert {s["name"]: s["labelValue"] for s in written["segments"]} == {"femoral_head_left": 4, "bladder": 2}
    from segcore.export import read_seg_nrrd

    read_back, _ = read_seg_nrrd(tmp_path / "organs.seg.nrrd")
    on_grid = sitk.Resample(read_back, labelmap, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(sitk.GetArrayViewFromImage(on_grid), wanted)
