"""Label map -> surface meshes: physical placement, volume, orientation, writers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkIOGeometry import vtkOBJReader, vtkSTLReader
from vtkmodules.vtkIOLegacy import vtkPolyDataReader
from vtkmodules.vtkIOPLY import vtkPLYReader
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

from segcore import surfaces
from segcore.errors import OutputExistsError, SegcoreError, UnsupportedImageError


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# Oblique and mirrored (det = -1): the hard case for placement and orientation.
OBLIQUE_FLIPPED = rotation((1, 2, 3), 0.5) @ np.diag([1.0, 1.0, -1.0])
SPACING = (0.9, 1.3, 1.7)
IDENTITY = np.eye(3)
ORIGIN = (-31.5, 12.25, 140.0)


def make_image(array_kji, spacing=SPACING, direction=IDENTITY, origin=ORIGIN):
    image = sitk.GetImageFromArray(np.asarray(array_kji, dtype=np.uint8))
    image.SetSpacing(spacing)
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    image.SetOrigin(origin)
    return image


def sphere_image(direction, radius=11.0, centre_index=(19.6, 18.3, 20.4), shape=(40, 40, 40)):
    """A ball of `radius` mm; its physical centre comes from SimpleITK itself."""
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    offsets = [
        (i - centre_index[0]) * SPACING[0],
        (j - centre_index[1]) * SPACING[1],
        (k - centre_index[2]) * SPACING[2],
    ]
    mask = sum(o**2 for o in offsets) <= radius**2
    image = make_image(mask, direction=direction)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index))
    return image, mask, centre, radius


def points_of(mesh):
    return vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)


def triangles_of(mesh):
    return vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).reshape(-1, 3)


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE_FLIPPED], ids=["axial", "oblique-flipped"])
@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_sphere_lies_in_physical_space_with_its_voxel_volume(direction, smoothing):
    image, mask, centre, radius = sphere_image(direction)
    meshes = surfaces.labelmap_to_surfaces(image, smoothing=smoothing)
    assert list(meshes) == [1]
    points = points_of(meshes[1])
    voxel = max(SPACING)

    distances = np.linalg.norm(points - centre, axis=1)
    assert np.all(np.abs(distances - radius) < voxel)
    # The surface reaches out to centre +- radius along every LPS axis.
    assert np.all(np.abs(points.max(axis=0) - (centre + radius)) < voxel)
    assert np.all(np.abs(points.min(axis=0) - (centre - radius)) < voxel)

    voxel_volume = mask.sum() * np.prod(SPACING)
    props = surfaces.surface_properties(meshes[1])
    assert props.volume_mm3 == pytest.approx(voxel_volume, rel=0.05)
    assert props.area_mm2 == pytest.approx(4 * np.pi * radius**2, rel=0.15)


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([1.0, 1.0, -1.0]), np.diag([-1.0, 1.0, 1.0]), OBLIQUE_FLIPPED],
    ids=["identity", "flip-z", "flip-x", "oblique-flipped"],
)
def test_triangles_and_normals_face_outward(direction):
    assert np.linalg.det(direction) == pytest.approx(np.sign(np.linalg.det(direction)))
    image, _, centre, _ = sphere_image(direction)
    mesh = surfaces.labelmap_to_surfaces(image)[1]
    points = points_of(mesh)
    tri = triangles_of(mesh)

    assert surfaces.signed_volume(mesh) > 0
    # Winding: each triangle's geometric normal points away from the centre.
    a, b, c = points[tri[:, 0]], points[tri[:, 1]], points[tri[:, 2]]
    face_normals = np.cross(b - a, c - a)
    outward = np.einsum("ij,ij->i", face_normals, (a + b + c) / 3 - centre)
    assert np.all(outward > 0)
    # Point normals agree with the winding.
    normals = vtk_to_numpy(mesh.GetPointData().GetNormals())
    assert np.all(np.einsum("ij,ij->i", normals, points - centre) > 0)


def test_box_faces_sit_half_a_voxel_outside_the_outer_voxel_centres():
    array = np.zeros((14, 26, 24), np.uint8)
    array[3:10, 8:21, 5:15] = 2  # k 3..9, j 8..20, i 5..14
    image = make_image(array, direction=OBLIQUE_FLIPPED)
    mesh = surfaces.labelmap_to_surfaces(image, smoothing=0)[2]
    # Back to voxel indices with SimpleITK's own transform, not ours.
    index = np.array([image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points_of(mesh)])
    np.testing.assert_allclose(index.min(axis=0), [4.5, 7.5, 2.5], atol=1e-4)
    np.testing.assert_allclose(index.max(axis=0), [14.5, 20.5, 9.5], atol=1e-4)


def test_labels_touching_the_image_edge_give_closed_surfaces():
    array = np.zeros((10, 12, 14), np.uint8)
    array[:, :6, :] = 1  # cut by five faces of the grid
    image = make_image(array)
    mesh = surfaces.labelmap_to_surfaces(image, smoothing=0)[1]
    from vtkmodules.vtkFiltersCore import vtkFeatureEdges

    edges = vtkFeatureEdges()
    edges.SetInputData(mesh)
    edges.BoundaryEdgesOn()
    edges.FeatureEdgesOff()
    edges.ManifoldEdgesOff()
    edges.NonManifoldEdgesOff()
    edges.Update()
    assert edges.GetOutput().GetNumberOfCells() == 0
    assert surfaces.surface_properties(mesh).volume_mm3 == pytest.approx(
        array.sum() * np.prod(SPACING), rel=0.05
    )


def test_one_surface_per_label_and_label_selection():
    array = np.zeros((20, 20, 20), np.uint8)
    array[2:8, 2:8, 2:8] = 1
    array[10:18, 10:18, 10:18] = 3
    image = make_image(array)
    assert sorted(surfaces.labelmap_to_surfaces(image)) == [1, 3]
    assert sorted(surfaces.labelmap_to_surfaces(image, labels=[3, 5])) == [3]  # 5 is absent
    one = surfaces.labelmap_to_surfaces(image, labels=[1], smoothing=0)[1]
    assert points_of(one).max(axis=0)[0] < ORIGIN[0] + 8 * SPACING[0]  # label 3 not included


def test_decimation_cuts_triangles_but_keeps_the_volume():
    image, mask, _, _ = sphere_image(OBLIQUE_FLIPPED)
    full = surfaces.labelmap_to_surfaces(image)[1]
    reduced = surfaces.labelmap_to_surfaces(image, decimation=0.7)[1]
    assert reduced.GetNumberOfPolys() < 0.45 * full.GetNumberOfPolys()
    assert surfaces.signed_volume(reduced) > 0
    assert surfaces.surface_properties(reduced).volume_mm3 == pytest.approx(
        mask.sum() * np.prod(SPACING), rel=0.05
    )


def test_bad_parameters_are_refused():
    image, _, _, _ = sphere_image(np.eye(3))
    with pytest.raises(SegcoreError):
        surfaces.labelmap_to_surfaces(image, smoothing=2)
    with pytest.raises(SegcoreError):
        surfaces.labelmap_to_surfaces(image, decimation=1.0)
    with pytest.raises(UnsupportedImageError):
        surfaces.labelmap_to_surfaces(sitk.Image(10, 10, sitk.sitkUInt8))


# ------------------------------------------------------------------------ writers


@pytest.fixture(scope="module")
def sphere_mesh():
    image, _, _, _ = sphere_image(OBLIQUE_FLIPPED)
    return surfaces.labelmap_to_surfaces(image)[1]


def read_back(path):
    """Points, triangle count and the coordinate-system marker, via plain VTK readers."""
    suffix = path.suffix
    if suffix == ".stl":
        reader = vtkSTLReader()
    elif suffix == ".obj":
        reader = vtkOBJReader()
    elif suffix == ".vtp":
        reader = vtkXMLPolyDataReader()
    elif suffix == ".ply":
        reader = vtkPLYReader()
    else:
        reader = vtkPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    mesh = reader.GetOutput()
    if suffix in (".stl", ".vtk"):
        marker = reader.GetHeader()
    elif suffix == ".obj":
        marker = reader.GetComment()
    elif suffix == ".ply":
        comments = reader.GetComments()
        marker = " ".join(comments.GetValue(i) for i in range(comments.GetNumberOfValues()))
    else:
        space = mesh.GetFieldData().GetAbstractArray("SPACE")
        marker = "SPACE=" + space.GetValue(0) if space is not None else ""
    return points_of(mesh), mesh.GetNumberOfPolys(), marker


def sorted_rows(points):
    return points[np.lexsort(points.T[::-1])]


@pytest.mark.parametrize("suffix", [".stl", ".obj", ".vtp", ".ply", ".vtk"])
def test_writers_keep_points_and_record_lps(tmp_path, sphere_mesh, suffix):
    path = surfaces.write_surface(sphere_mesh, tmp_path / f"prostate{suffix}")
    assert path.is_file()
    points, n_triangles, marker = read_back(path)
    assert "SPACE=LPS" in marker
    assert n_triangles == sphere_mesh.GetNumberOfPolys()
    original = points_of(sphere_mesh)
    if suffix == ".stl":  # STL stores triangles only; the reader re-merges shared corners
        original = np.unique(original.astype(np.float32), axis=0).astype(np.float64)
        np.testing.assert_allclose(sorted_rows(np.unique(points, axis=0)), sorted_rows(original), atol=1e-4)
    else:
        np.testing.assert_allclose(points, original, atol=1e-4)
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_writer_can_record_ras_and_mirrors_the_points(tmp_path, sphere_mesh):
    path = surfaces.write_surface(sphere_mesh, tmp_path / "p.vtp", coordinate_system="RAS")
    points, _, marker = read_back(path)
    assert marker == "SPACE=RAS"
    np.testing.assert_allclose(points, points_of(sphere_mesh) * [-1, -1, 1], atol=1e-4)


def test_writer_refuses_existing_file_and_unknown_suffix(tmp_path, sphere_mesh):
    target = tmp_path / "p.stl"
    target.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        surfaces.write_surface(sphere_mesh, target)
    assert target.read_bytes() == b"keep me"
    surfaces.write_surface(sphere_mesh, target, overwrite=True)
    assert target.read_bytes() != b"keep me"
    with pytest.raises(SegcoreError, match=".stl"):
        surfaces.write_surface(sphere_mesh, tmp_path / "p.3ds")


# ------------------------------------------------- Slicer reads our files in place


@pytest.mark.parametrize("suffix", [".stl", ".obj", ".vtp", ".ply", ".vtk"])
@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_slicer_model_storage_node_places_the_mesh(tmp_path, sphere_mesh, suffix, system):
    slicer = pytest.importorskip("slicer")
    path = surfaces.write_surface(sphere_mesh, tmp_path / f"p{suffix}", coordinate_system=system)
    scene = slicer.vtkMRMLScene()
    model = scene.AddNewNodeByClass("vtkMRMLModelNode")
    storage = slicer.vtkMRMLModelStorageNode()
    scene.AddNode(storage)
    # Start from the opposite assumption: only the marker in the file can fix it.
    other = "RAS" if system == "LPS" else "LPS"
    storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.GetCoordinateSystemTypeFromString(other))
    storage.SetFileName(str(path))
    assert storage.ReadData(model) == 1
    assert slicer.vtkMRMLStorageNode.GetCoordinateSystemTypeAsString(storage.GetCoordinateSystem()) == system

    ras = points_of(model.GetPolyData())
    expected_ras = points_of(sphere_mesh) * [-1, -1, 1]  # Slicer's RAS = our LPS with x, y negated
    np.testing.assert_allclose(ras.min(axis=0), expected_ras.min(axis=0), atol=1e-4)
    np.testing.assert_allclose(ras.max(axis=0), expected_ras.max(axis=0), atol=1e-4)
    if suffix != ".stl":
        np.testing.assert_allclose(ras, expected_ras, atol=1e-4)
