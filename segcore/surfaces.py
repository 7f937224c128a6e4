"""Label map -> closed surface meshes (VTK), and STL / OBJ / VTP / PLY / VTK writers.

Coordinate convention
---------------------
Surfaces are built in the physical space of the label map as SimpleITK sees it,
which is LPS (x grows to the patient's Left, y to Posterior, z to Superior), and
they are written in LPS. Every file records that, the way 3D Slicer's own model
writer does (Slicer/Slicer ``Libs/MRML/Core/vtkMRMLModelStorageNode.cxx``), so that
Slicer loads our files in the right place:

- STL: the 80-byte binary header reads ``ProstateSeg output. SPACE=LPS``;
- OBJ: the first comment line reads ``# ProstateSeg output. SPACE=LPS``;
- VTP: a field-data string array named ``SPACE`` holding ``LPS``;
- PLY: a header comment ``SPACE=LPS``;
- VTK (legacy): the header line reads ``ProstateSeg output. SPACE=LPS``.

Slicer looks for the substring ``SPACE=LPS`` / ``SPACE=RAS`` in the STL and VTK
header, in the first OBJ comment and in each PLY comment, and for a ``SPACE``
array in VTP/VTU field data; a file with no marker is taken as LPS by current
Slicer. On reading, Slicer negates x and y to get to its internal RAS space.

Pipeline (the same steps as Slicer's labelmap -> closed surface conversion, so an
exported mesh looks like what the user saw in Slicer): per label, a padded
binary mask in voxel-index space -> ``vtkDiscreteFlyingEdges3D`` -> optional
``vtkWindowedSincPolyDataFilter`` -> optional ``vtkQuadricDecimation`` -> the
full IJK -> LPS matrix (spacing, direction and origin, so oblique and flipped
grids are right) -> normals -> outward orientation check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
from vtkmodules.vtkCommonCore import vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPolyData
from vtkmodules.vtkCommonTransforms import vtkTransform
from vtkmodules.vtkFiltersCore import (
    vtkMassProperties,
    vtkPolyDataNormals,
    vtkQuadricDecimation,
    vtkTriangleFilter,
    vtkWindowedSincPolyDataFilter,
)
from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D, vtkTransformPolyDataFilter
from vtkmodules.vtkIOGeometry import vtkSTLWriter
from vtkmodules.vtkIOLegacy import vtkPolyDataWriter
from vtkmodules.vtkIOPLY import vtkPLYWriter
from vtkmodules.vtkIOXML import vtkXMLPolyDataWriter

from segcore.errors import SegcoreError, UnsupportedImageError
from segcore.files import atomic_output
from segcore.image import ijk_to_lps_matrix

SURFACE_SUFFIXES = (".stl", ".obj", ".vtp", ".ply", ".vtk")
HEADER_TEXT = "ProstateSeg output."
COORDINATE_SYSTEMS = ("LPS", "RAS")

# Why vtkDiscreteFlyingEdges3D rather than vtkSurfaceNets3D: it is what Slicer's
# own labelmap -> closed surface rule runs by default (exported meshes match the 3D
# view), it exists in every VTK the project accepts (SurfaceNets3D needs >= 9.3),
# and with one mask per label each surface is closed on its own, which is what
# STL/3D-printing users and the volume check need.


@dataclass(frozen=True)
class SurfaceProperties:
    """Size of a closed surface, in physical units."""

    volume_mm3: float
    area_mm2: float


def labelmap_to_surfaces(
    labelmap: sitk.Image,
    labels=None,
    smoothing: float = 0.5,
    decimation: float = 0.0,
    normals: bool = True,
) -> dict[int, vtkPolyData]:
    """One closed, outward-oriented triangle mesh per label, in LPS millimetres.

    labels: the label values to mesh (default: every non-zero value present);
    values absent from the image are left out of the result.
    smoothing: Slicer's "smoothing factor", 0 (off) .. 1 (strong); the windowed-sinc
    pass band is 10**(-4 * smoothing), as in Slicer.
    decimation: target fraction of triangles to remove, 0 (off) .. < 1.
    """
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedImageError(
            f"surfaces need a 3-D scalar label map, got a {labelmap.GetDimension()}-D image with "
            f"{labelmap.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    if not 0.0 <= smoothing <= 1.0:
        raise SegcoreError(f"smoothing must be between 0 (off) and 1, got {smoothing}")
    if not 0.0 <= decimation < 1.0:
        raise SegcoreError(f"decimation must be between 0 (off) and 1 (exclusive), got {decimation}")

    voxels = sitk.GetArrayViewFromImage(labelmap)  # axes (k, j, i)
    if labels is None:
        present = np.unique(voxels)
        labels = [int(v) for v in present if v != 0]
    matrix = ijk_to_lps_matrix(labelmap)
    surfaces: dict[int, vtkPolyData] = {}
    for value in labels:
        mask = voxels == value
        if not mask.any():
            continue
        surfaces[int(value)] = _mask_to_surface(mask, matrix, smoothing, decimation, normals)
    return surfaces


def _mask_to_surface(mask, matrix, smoothing, decimation, normals) -> vtkPolyData:
    # Crop to the label's bounding box plus one empty voxel all round: faster than
    # meshing the whole grid, and the padding closes surfaces cut by the image edge.
    k_any, j_any, i_any = (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    k0, k1, j0, j1, i0, i1 = k_any[0], k_any[-1], j_any[0], j_any[-1], i_any[0], i_any[-1]
    padded = np.zeros((k1 - k0 + 3, j1 - j0 + 3, i1 - i0 + 3), dtype=np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1]

    image = vtkImageData()
    image.SetDimensions(padded.shape[2], padded.shape[1], padded.shape[0])
    # Points of this image are voxel indices (i, j, k) of the original grid.
    image.SetOrigin(float(i0 - 1), float(j0 - 1), float(k0 - 1))
    image.SetSpacing(1.0, 1.0, 1.0)
    image.GetPointData().SetScalars(numpy_to_vtk(padded.ravel(), deep=True))

    contour = vtkDiscreteFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, 1)
    contour.ComputeNormalsOff()  # computed later, after the geometry is final
    contour.ComputeGradientsOff()
    contour.ComputeScalarsOff()
    contour.Update()
    mesh = contour.GetOutput()

    # Smoothing runs in index space, as in Slicer, so anisotropic voxels are
    # smoothed over the same number of voxels in each direction.
    if smoothing > 0:
        smoother = vtkWindowedSincPolyDataFilter()
        smoother.SetInputData(mesh)
        smoother.SetNumberOfIterations(20)
        smoother.SetPassBand(10.0 ** (-4.0 * smoothing))
        smoother.BoundarySmoothingOff()
        smoother.FeatureEdgeSmoothingOff()
        smoother.NonManifoldSmoothingOn()
        smoother.NormalizeCoordinatesOn()
        smoother.Update()
        mesh = smoother.GetOutput()

    # Decimate after smoothing: on the raw staircase the quadric error metric
    # would spend the triangle budget preserving voxel steps.
    if decimation > 0:
        decimator = vtkQuadricDecimation()
        decimator.SetInputData(mesh)
        decimator.SetTargetReduction(decimation)
        decimator.VolumePreservationOn()
        decimator.Update()
        mesh = decimator.GetOutput()

    transform = vtkTransform()
    transform.SetMatrix(matrix.ravel().tolist())
    to_physical = vtkTransformPolyDataFilter()
    to_physical.SetInputData(mesh)
    to_physical.SetTransform(transform)
    to_physical.Update()
    mesh = to_physical.GetOutput()

    if normals:
        normal_filter = vtkPolyDataNormals()
        normal_filter.SetInputData(mesh)
        normal_filter.ConsistencyOn()  # discrete contouring can leave a few cells flipped
        normal_filter.AutoOrientNormalsOff()  # would turn cavity walls the wrong way; see below
        normal_filter.SplittingOff()  # keeps the mesh watertight (no duplicated points)
        normal_filter.ComputePointNormalsOn()
        normal_filter.ComputeCellNormalsOff()
        normal_filter.Update()
        mesh = normal_filter.GetOutput()

    # A direction matrix with negative determinant mirrors the mesh and turns its
    # triangles inside out; a consistently oriented closed mesh has a positive
    # signed volume exactly when it faces outward, cavities included.
    if signed_volume(mesh) < 0:
        mesh = _reverse_orientation(mesh)

    result = vtkPolyData()
    result.DeepCopy(mesh)
    return result


def _triangles(mesh: vtkPolyData) -> np.ndarray:
    polys = mesh.GetPolys()
    offsets = vtk_to_numpy(polys.GetOffsetsArray())
    if offsets.size > 1 and not np.all(np.diff(offsets) == 3):
        triangulate = vtkTriangleFilter()
        triangulate.SetInputData(mesh)
        triangulate.Update()
        polys = triangulate.GetOutput().GetPolys()
    return vtk_to_numpy(polys.GetConnectivityArray()).reshape(-1, 3)


def signed_volume(mesh: vtkPolyData) -> float:
    """Signed enclosed volume (mm^3): positive when the triangles face outward."""
    if mesh.GetNumberOfPoints() == 0 or mesh.GetNumberOfPolys() == 0:
        return 0.0
    points = vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    tri = _triangles(mesh)
    a, b, c = points[tri[:, 0]], points[tri[:, 1]], points[tri[:, 2]]
    # Relative to the centroid, for precision far from the origin.
    centre = points.mean(axis=0)
    a, b, c = a - centre, b - centre, c - centre
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def _reverse_orientation(mesh: vtkPolyData) -> vtkPolyData:
    flipped = vtkPolyData()
    flipped.DeepCopy(mesh)
    polys = flipped.GetPolys()
    connectivity = vtk_to_numpy(polys.GetConnectivityArray())
    tri = _triangles(flipped)
    if tri.size == connectivity.size:
        connectivity[:] = tri[:, ::-1].ravel()  # in place: the array shares VTK's memory
        polys.Modified()
    else:  # not all triangles: rebuild from the triangulated cells
        triangulate = vtkTriangleFilter()
        triangulate.SetInputData(flipped)
        triangulate.Update()
        flipped = _reverse_orientation(triangulate.GetOutput())
    point_normals = flipped.GetPointData().GetNormals()
    if point_normals is not None:
        values = vtk_to_numpy(point_normals)
        values *= -1
        point_normals.Modified()
    return flipped


def surface_properties(mesh: vtkPolyData) -> SurfaceProperties:
    """Enclosed volume (mm^3) and area (mm^2) of a closed triangle mesh (vtkMassProperties)."""
    if mesh.GetNumberOfPolys() == 0:
        return SurfaceProperties(0.0, 0.0)
    triangulate = vtkTriangleFilter()  # vtkMassProperties accepts triangles only
    triangulate.SetInputData(mesh)
    mass = vtkMassProperties()
    mass.SetInputConnection(triangulate.GetOutputPort())
    mass.Update()
    return SurfaceProperties(volume_mm3=float(mass.GetVolume()), area_mm2=float(mass.GetSurfaceArea()))


def write_surface(mesh: vtkPolyData, path, overwrite: bool = False, coordinate_system: str = "LPS") -> Path:
    """Write an LPS mesh to .stl, .obj, .vtp, .ply or .vtk, chosen by the file's suffix.

    The coordinate system is recorded in the file as Slicer does. With
    coordinate_system="RAS" the points (and normals) are mirrored to RAS first.
    Written through a temporary file; an existing file is kept unless overwrite.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SURFACE_SUFFIXES:
        raise SegcoreError(
            f"cannot write a surface to {path.name!r}: supported suffixes are {', '.join(SURFACE_SUFFIXES)}"
        )
    coordinate_system = coordinate_system.upper()
    if coordinate_system not in COORDINATE_SYSTEMS:
        raise SegcoreError(f"coordinate_system must be LPS or RAS, got {coordinate_system!r}")
    if mesh.GetNumberOfPoints() == 0:
        raise SegcoreError(f"refusing to write an empty surface to {path}")
    if coordinate_system == "RAS":
        mesh = _lps_ras_flip(mesh)
    marker = f"SPACE={coordinate_system}"

    with atomic_output(path, overwrite=overwrite) as tmp:
        if suffix == ".stl":
            _write_stl(mesh, tmp, marker)
        elif suffix == ".obj":
            _write_obj(mesh, tmp, marker)
        elif suffix == ".vtp":
            _write_vtp(mesh, tmp, coordinate_system)
        elif suffix == ".ply":
            _write_ply(mesh, tmp, marker)
        else:
            _write_legacy_vtk(mesh, tmp, marker)
        if not tmp.exists():
            raise SegcoreError(f"the VTK writer produced no file for {path}")
    return path


def _lps_ras_flip(mesh: vtkPolyData) -> vtkPolyData:
    # Negating x and y has determinant +1, so the triangle orientation stays outward.
    transform = vtkTransform()
    transform.Scale(-1.0, -1.0, 1.0)
    mirror = vtkTransformPolyDataFilter()
    mirror.SetInputData(mesh)
    mirror.SetTransform(transform)
    mirror.Update()
    return mirror.GetOutput()


def _check_writer(writer, path):
    # VTK writers report errors through return codes / error events, not exceptions.
    if writer.Write() != 1 or writer.GetErrorCode() != 0:
        raise SegcoreError(f"could not write {path} (VTK error code {writer.GetErrorCode()})")


def _write_stl(mesh, tmp: Path, marker: str):
    triangulate = vtkTriangleFilter()
    triangulate.SetInputData(mesh)
    writer = vtkSTLWriter()
    writer.SetInputConnection(triangulate.GetOutputPort())
    writer.SetFileName(str(tmp))
    writer.SetFileTypeToBinary()
    writer.SetHeader(f"{HEADER_TEXT} {marker}")
    _check_writer(writer, tmp)


def _write_obj(mesh, tmp: Path, marker: str):
    # Written directly: vtkOBJWriter cannot put the coordinate-system comment first,
    # and Slicer reads only the first comment block of an OBJ file.
    points = vtk_to_numpy(mesh.GetPoints().GetData())
    tri = _triangles(mesh) + 1  # OBJ indices start at 1
    normals = mesh.GetPointData().GetNormals()
    with open(tmp, "w", encoding="ascii", newline="\n") as handle:
        handle.write(f"# {HEADER_TEXT} {marker}\n")
        np.savetxt(handle, points, fmt="v %.9g %.9g %.9g")
        if normals is not None:
            np.savetxt(handle, vtk_to_numpy(normals), fmt="vn %.6g %.6g %.6g")
            np.savetxt(handle, np.repeat(tri, 2, axis=1), fmt="f %d//%d %d//%d %d//%d")
        else:
            np.savetxt(handle, tri, fmt="f %d %d %d")


def _write_vtp(mesh, tmp: Path, coordinate_system: str):
    data = vtkPolyData()
    data.ShallowCopy(mesh)
    field_data = data.GetFieldData()
    field_data.RemoveArray("SPACE")
    space = vtkStringArray()
    space.SetName("SPACE")
    space.InsertNextValue(coordinate_system)
    field_data.AddArray(space)
    writer = vtkXMLPolyDataWriter()
    writer.SetInputData(data)
    writer.SetFileName(str(tmp))
    writer.SetDataModeToAppended()
    writer.SetCompressorTypeToZLib()
    _check_writer(writer, tmp)


def _write_ply(mesh, tmp: Path, marker: str):
    triangulate = vtkTriangleFilter()
    triangulate.SetInputData(mesh)
    writer = vtkPLYWriter()
    writer.SetInputConnection(triangulate.GetOutputPort())
    writer.SetFileName(str(tmp))
    writer.SetFileTypeToBinary()
    writer.AddComment(marker)
    _check_writer(writer, tmp)


def _write_legacy_vtk(mesh, tmp: Path, marker: str):
    writer = vtkPolyDataWriter()
    writer.SetInputData(mesh)
    writer.SetFileName(str(tmp))
    writer.SetFileVersion(42)  # 5.1 is unreadable by older Slicer (VTK < 9) and most other tools
    writer.SetFileTypeToBinary()
    writer.SetHeader(f"{HEADER_TEXT} {marker}")
    _check_writer(writer, tmp)
