"""Export: label maps, Slicer .seg.nrrd (checked with slicerio and
slicer-core), and the export_labelmap entry point."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from slicerio.segmentation import terminology_entry_to_string

from segcore import anatomy, export
from segcore.errors import OutputExistsError, SegcoreError, UnsupportedImageError
from segcore.image import ijk_to_lps_matrix


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


OBLIQUE_FLIPPED = rotation((3, -1, 2), 0.7) @ np.diag([1.0, -1.0, 1.0])  # det = -1
SPACING = (0.78, 1.21, 2.5)
ORIGIN = (112.5, -87.25, -301.0)

PROSTATE = anatomy.structure("prostate")
BLADDER = anatomy.structure("bladder")
FEMUR_HEAD_LEFT = anatomy.structure("femoral_head_left")


def make_labelmap(direction=OBLIQUE_FLIPPED):
    """Prostate ball, bladder box, left femoral head box on an oblique, flipped, anisotropic grid."""
    shape = (18, 30, 34)  # k, j, i
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    array = np.zeros(shape, np.uint8)
    array[((i - 12) * 0.78) ** 2 + ((j - 14) * 1.21) ** 2 + ((k - 8) * 2.5) ** 2 <= 7.5**2] = PROSTATE.value
    array[10:16, 3:12, 20:30] = BLADDER.value
    array[2:6, 22:28, 25:31] = FEMUR_HEAD_LEFT.value
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    image.SetOrigin(ORIGIN)
    return image


def physical_centroid(image, value):
    """Mean LPS position of the voxels of `value`, through SimpleITK's own transform."""
    array = sitk.GetArrayViewFromImage(image)
    k, j, i = np.nonzero(array == value)
    return np.mean(
        [image.TransformIndexToPhysicalPoint((int(a), int(b), int(c))) for a, b, c in zip(i, j, k)], axis=0
    )


def assert_same_geometry(a, b, tol=1e-9):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


# ------------------------------------------------------------------- label maps


@pytest.mark.parametrize("name", ["case.nii.gz", "case.nrrd", "case.nii"])
def test_write_labelmap_round_trip(tmp_path, name):
    image = make_labelmap()
    path = export.write_labelmap(image, tmp_path / name)
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(back, image, tol=1e-5)  # NIfTI stores single precision
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_write_labelmap_uses_uint16_for_large_labels_and_checks_input(tmp_path):
    image = sitk.Cast(make_labelmap(), sitk.sitkInt32) * 100  # values up to 400
    back = sitk.ReadImage(str(export.write_labelmap(image, tmp_path / "big.nrrd")))
    assert back.GetPixelID() == sitk.sitkUInt16
    assert sitk.GetArrayViewFromImage(back).max() == 400
    with pytest.raises(SegcoreError, match=".nii.gz"):
        export.write_labelmap(image, tmp_path / "case.png")
    with pytest.raises(UnsupportedImageError):
        export.write_labelmap(sitk.Cast(make_labelmap(), sitk.sitkFloat32) * 0.5, tmp_path / "f.nrrd")
    with pytest.raises(OutputExistsError):
        export.write_labelmap(image, tmp_path / "big.nrrd")


# --------------------------------------------------------------------- seg.nrrd


def test_terminology_entry_strings():
    assert anatomy.terminology_entry(PROSTATE) == (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^41216001^Prostate~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    # Laterality is the type modifier (4th field), as in Slicer's terminology lists.
    assert anatomy.terminology_entry(FEMUR_HEAD_LEFT).split("~")[3] == "SCT^7771000^left"


def test_terminology_entry_parses_in_slicer():
    slicer = pytest.importorskip("slicer")
    entry = slicer.vtkSlicerTerminologyEntry()
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    assert logic.DeserializeTerminologyEntry(anatomy.terminology_entry(FEMUR_HEAD_LEFT), entry)
    assert entry.GetCategoryObject().GetCodeValue() == "123037004"
    assert entry.GetTypeObject().GetCodeValue() == "2812003"
    assert entry.GetTypeModifierObject().GetCodeValue() == "7771000"
    assert logic.SerializeTerminologyEntry(entry) == anatomy.terminology_entry(FEMUR_HEAD_LEFT)


STRUCTURES = [PROSTATE, BLADDER, FEMUR_HEAD_LEFT]


def test_seg_nrrd_read_with_slicerio(tmp_path):
    image = make_labelmap()
    path = export.write_seg_nrrd(image, STRUCTURES, tmp_path / "case.seg.nrrd")

    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"

    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps_matrix(image), atol=1e-12)
    # ...and that matrix is SimpleITK's own index -> physical mapping.
    for index in [(0, 0, 0), (33, 0, 0), (0, 29, 0), (0, 0, 17), (5, 7, 11)]:
        np.testing.assert_allclose(
            seg["ijkToLPS"] @ np.array([*index, 1.0]),
            [*image.TransformIndexToPhysicalPoint(index), 1.0],
            atol=1e-9,
        )
    np.testing.assert_array_equal(seg["voxels"], sitk.GetArrayFromImage(image).transpose(2, 1, 0))

    assert [s["name"] for s in seg["segments"]] == [s.name for s in STRUCTURES]
    for written, structure in zip(seg["segments"], STRUCTURES):
        assert written["labelValue"] == structure.value
        np.testing.assert_allclose(written["color"], np.array(structure.color) / 255.0, atol=1e-6)
        assert terminology_entry_to_string(written["terminology"]) == anatomy.terminology_entry(structure)
        assert written["colorAutoGenerated"] is False
    assert seg["segments"][2]["terminology"]["typeModifier"] == ["SCT", "7771000", "left"]


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE_FLIPPED], ids=["axial", "oblique-flipped"])
def test_read_seg_nrrd_gives_back_the_input(tmp_path, direction):
    image = make_labelmap(direction)
    path = export.write_seg_nrrd(image, STRUCTURES, tmp_path / "case.seg.nrrd")
    back, segments = export.read_seg_nrrd(path)
    assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert [(s.name, s.value) for s in segments] == [(s.name, s.value) for s in STRUCTURES]
    assert segments[0].terminology == anatomy.terminology_entry(PROSTATE)
    np.testing.assert_allclose(segments[1].color, np.array(BLADDER.color) / 255.0)


def test_seg_nrrd_drops_unlisted_values_and_keeps_empty_segments(tmp_path):
    image = make_labelmap()
    path = export.write_seg_nrrd(image, [PROSTATE, anatomy.structure("rectum")], tmp_path / "c.seg.nrrd")
    back, segments = export.read_seg_nrrd(path)
    assert sorted(np.unique(sitk.GetArrayViewFromImage(back))) == [0, PROSTATE.value]
    assert [s.name for s in segments] == ["prostate", "rectum"]


def test_read_seg_nrrd_with_overlapping_layers(tmp_path):
    seg = slicerio.create_segmentation((6, 5, 4), np.diag([2.0, 3.0, 4.0, 1.0]))
    a = np.zeros((6, 5, 4), bool)
    a[1:4, 1:4, 1:3] = True
    b = np.zeros((6, 5, 4), bool)
    b[2:6, 2:5, 1:4] = True  # overlaps a
    slicerio.add_segment(seg, a, {"id": "a", "name": "a"})
    slicerio.add_segment(seg, b, {"id": "b", "name": "b"})
    assert seg["voxels"].ndim == 4
    slicerio.write_segmentation(str(tmp_path / "l.seg.nrrd"), seg)
    image, segments = export.read_seg_nrrd(tmp_path / "l.seg.nrrd")
    labels = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    assert [(s.name, s.value) for s in segments] == [("a", 1), ("b", 2)]
    np.testing.assert_array_equal(labels == 2, b)
    np.testing.assert_array_equal(labels == 1, a & ~b)
    assert image.GetSpacing() == (2.0, 3.0, 4.0)


def test_read_seg_nrrd_errors(tmp_path):
    from segcore.errors import InputNotFoundError, UnreadableImageError

    with pytest.raises(InputNotFoundError):
        export.read_seg_nrrd(tmp_path / "missing.seg.nrrd")
    (tmp_path / "junk.seg.nrrd").write_text("not a nrrd")
    with pytest.raises(UnreadableImageError):
        export.read_seg_nrrd(tmp_path / "junk.seg.nrrd")


@pytest.fixture(scope="module")
def slicer_scene():
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    seg_logic.SetMRMLApplicationLogic(app_logic)
    return slicer, scene


def test_slicer_reads_seg_nrrd_named_coloured_and_in_place(tmp_path, slicer_scene):
    slicer, scene = slicer_scene
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    image = make_labelmap()
    path = export.write_seg_nrrd(image, STRUCTURES, tmp_path / "case.seg.nrrd")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1

    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())] == [
        s.name for s in STRUCTURES
    ]
    for structure in STRUCTURES:
        segment = segmentation.GetSegment(structure.name)
        np.testing.assert_allclose(segment.GetColor(), np.array(structure.color) / 255.0, atol=1e-6)
        assert segment.GetLabelValue() == structure.value
        assert segment.GetTerminology() == anatomy.terminology_entry(structure)

        labelmap = segment.GetRepresentation("Binary labelmap")
        matrix = vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        extent = labelmap.GetExtent()
        dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
        voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])  # (k, j, i)
        k, j, i = np.nonzero(voxels == structure.value)
        ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)])
        centroid_ras = (ijk_to_ras @ ijk)[:3].mean(axis=1)
        # RAS is LPS with x and y negated.
        expected = physical_centroid(image, structure.value) * [-1, -1, 1]
        np.testing.assert_allclose(centroid_ras, expected, atol=1e-6)
        assert len(i) == int((sitk.GetArrayViewFromImage(image) == structure.value).sum())


# ------------------------------------------------------------------ entry point


def test_export_labelmap_writes_every_format(tmp_path):
    image = make_labelmap()
    structures = [PROSTATE, BLADDER, FEMUR_HEAD_LEFT, anatomy.structure("rectum")]  # rectum absent
    formats = ["seg.nrrd", "nii.gz", ".NRRD", "stl", "obj", "vtp"]
    paths = export.export_labelmap(image, structures, tmp_path / "out", "case01", formats=formats)
    names = sorted(p.name for p in paths)
    expected = ["case01.nii.gz", "case01.nrrd", "case01.seg.nrrd"] + [
        f"case01_{s.name}.{fmt}" for s in STRUCTURES for fmt in ("obj", "stl", "vtp")
    ]
    assert names == sorted(expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names

    from segcore import surfaces

    mesh_volume = surfaces.surface_properties(_read_vtp(tmp_path / "out" / "case01_bladder.vtp")).volume_mm3
    voxel_volume = (sitk.GetArrayViewFromImage(image) == BLADDER.value).sum() * np.prod(SPACING)
    assert 0.85 * voxel_volume < mesh_volume < 1.05 * voxel_volume  # smoothing rounds the box's corners
    back = sitk.ReadImage(str(tmp_path / "out" / "case01.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def _read_vtp(path):
    from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

    reader = vtkXMLPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    return reader.GetOutput()


def test_export_labelmap_defaults_to_the_catalogue(tmp_path):
    paths = export.export_labelmap(make_labelmap(), None, tmp_path, "c")
    assert sorted(p.name for p in paths) == ["c.nii.gz", "c.seg.nrrd"]
    _, segments = export.read_seg_nrrd(tmp_path / "c.seg.nrrd")
    assert [s.name for s in segments] == ["prostate", "bladder", "femoral_head_left"]


def test_export_labelmap_restricts_to_listed_structures(tmp_path):
    export.export_labelmap(make_labelmap(), [BLADDER], tmp_path, "c", formats=["nii.gz", "stl"])
    back = sitk.ReadImage(str(tmp_path / "c.nii.gz"))
    assert sorted(np.unique(sitk.GetArrayViewFromImage(back))) == [0, BLADDER.value]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.nii.gz", "c_bladder.stl"]


def test_export_labelmap_refuses_unknown_formats_listing_the_supported_ones(tmp_path):
    with pytest.raises(SegcoreError) as error:
        export.export_labelmap(make_labelmap(), STRUCTURES, tmp_path, "c", formats=["seg.nrrd", "dcm"])
    assert "'dcm'" in str(error.value)
    for fmt in export.SUPPORTED_FORMATS:
        assert fmt in str(error.value)
    assert not any(tmp_path.iterdir())


def test_export_labelmap_checks_every_target_before_writing(tmp_path):
    existing = tmp_path / "c_bladder.obj"
    existing.write_text("keep")
    with pytest.raises(OutputExistsError, match="c_bladder.obj"):
        export.export_labelmap(make_labelmap(), STRUCTURES, tmp_path, "c", formats=["seg.nrrd", "obj"])
    assert list(tmp_path.iterdir()) == [existing] and existing.read_text() == "keep"
    paths = export.export_labelmap(
        make_labelmap(), STRUCTURES, tmp_path, "c", formats=["obj"], overwrite=True
    )
    assert existing in paths and existing.read_text() != "keep"


def test_export_labelmap_rejects_bad_names_and_structures(tmp_path):
    with pytest.raises(SegcoreError):
        export.export_labelmap(make_labelmap(), STRUCTURES, tmp_path, "../escape")
    with pytest.raises(SegcoreError):
        export.export_labelmap(make_labelmap(), [PROSTATE, PROSTATE], tmp_path, "c")
    unknown = sitk.GetImageFromArray(np.full((3, 3, 3), 200, np.uint8))
    with pytest.raises(SegcoreError, match="200"):
        export.export_labelmap(unknown, None, tmp_path, "c")


def test_export_labelmap_that_fails_midway_leaves_no_partial_set(tmp_path, monkeypatch):
    from segcore import surfaces

    (tmp_path / "c.nii.gz").write_text("old")

    def full_disk(mesh, path, marker):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(surfaces, "_write_stl", full_disk)
    with pytest.raises(SegcoreError, match="No space left on device"):
        export.export_labelmap(make_labelmap(), STRUCTURES, tmp_path, "c", formats=["seg.nrrd", "nii.gz", "stl"],
                               overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["c.nii.gz"] and (tmp_path / "c.nii.gz").read_text() == "old"


def test_export_labelmap_skips_a_structure_too_small_for_a_surface(tmp_path, capfd):
    array = np.zeros((8, 8, 8), np.uint8)
    array[2:6, 2:6, 2:6] = BLADDER.value
    array[7, 7, 7] = PROSTATE.value  # one voxel: nothing left after decimation
    image = sitk.GetImageFromArray(array)
    paths = export.export_labelmap(image, [PROSTATE, BLADDER], tmp_path, "c", formats=["nii.gz", "stl"],
                                   decimation=0.9)
    assert sorted(p.name for p in paths) == ["c.nii.gz", "c_bladder.stl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.nii.gz", "c_bladder.stl"]
    assert capfd.readouterr().err == ""
