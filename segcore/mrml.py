"""The only bridge between segcore and Slicer's MRML: volume nodes in, segmentation nodes out.

Geometry: a volume node's IJK -> RAS matrix (plus a linear parent transform, if
any) becomes a SimpleITK image in LPS by negating the first two rows; the
voxels are the node's own, in the same (k, j, i) numpy order, so flipped,
permuted and oblique volumes convert exactly. Results go back onto the
volume's own grid: the segmentation node references the volume's geometry and
sits under the volume's transform, so it shows where the volume does.

Only MRML and logic classes are used here (no ``slicer.app``, ``slicer.modules``
or Qt), so this file runs in plain Python with the ``slicer-core`` wheel as well
as inside Slicer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from segcore import anatomy
from segcore.anatomy import terminology_entry
from segcore.errors import GeometryError, SegcoreError, UnsupportedImageError
from segcore.image import ijk_to_lps_matrix, image_from_ijk_to_lps
from segcore.result import Result

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Closed-surface smoothing Slicer uses by default; 0 keeps the voxel staircase.
DEFAULT_SMOOTHING = 0.5


# ----------------------------------------------------------------------- volume -> image


def _matrix(vtk_matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _node_label(node) -> str:
    return f"{node.GetClassName().replace('vtkMRML', '').replace('Node', ' node')} {node.GetName()!r}"


def ijk_to_world_ras(volume_node) -> np.ndarray:
    """The 4x4 matrix from the node's voxel indices to world RAS, through any linear parent transform."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = _matrix(ijk_to_ras)
    transform_node = volume_node.GetParentTransformNode()
    if transform_node is not None:
        if not transform_node.IsTransformToWorldLinear():
            raise UnsupportedImageError(
                f"{_node_label(volume_node)} is under the non-linear transform {transform_node.GetName()!r}. "
                "Harden the transform (Data module: right-click the volume, 'Harden transform') or remove it, "
                "then segment again.")
        to_world = vtk.vtkMatrix4x4()
        transform_node.GetMatrixTransformToWorld(to_world)
        matrix = _matrix(to_world) @ matrix
    return matrix


def volume_ijk_to_lps(volume_node) -> np.ndarray:
    """The node's own IJK -> LPS matrix, without any parent transform: the grid of the files it was read
    from (what a DICOM series' Image Position/Orientation (Patient) describe)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return RAS_TO_LPS @ _matrix(ijk_to_ras)


def _check_volume_node(volume_node, allow_labelmap: bool = False) -> None:
    if volume_node is None:
        raise SegcoreError("no volume selected: choose the CT volume to segment.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise UnsupportedImageError(f"{_node_label(volume_node)} is not a scalar volume: choose a CT volume.")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode") and not allow_labelmap:
        raise UnsupportedImageError(
            f"{_node_label(volume_node)} is a label map, not an image: choose the CT volume itself.")
    if volume_node.IsA("vtkMRMLTensorVolumeNode"):  # vector/colour and tensor volumes derive from it
        raise UnsupportedImageError(
            f"{_node_label(volume_node)} is a vector or colour volume: a grey-value CT volume is needed.")
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise UnsupportedImageError(f"{_node_label(volume_node)} holds no voxels: load the CT again.")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise UnsupportedImageError(
            f"{_node_label(volume_node)} has {image_data.GetNumberOfScalarComponents()} components per voxel: "
            "a grey-value CT volume is needed.")
    if 1 in image_data.GetDimensions():
        raise UnsupportedImageError(
            f"{_node_label(volume_node)} is a 2-D image (dimensions {image_data.GetDimensions()}): "
            "load the whole CT series as one volume.")


def _voxels_kji(volume_node) -> np.ndarray:
    image_data = volume_node.GetImageData()
    i, j, k = image_data.GetDimensions()
    return vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(k, j, i)


def volume_node_to_image(volume_node) -> sitk.Image:
    """A copy of a scalar volume node as a SimpleITK image in LPS world space.

    Any IJK -> RAS matrix converts exactly (flipped, permuted, oblique); a linear
    parent transform is applied, a non-linear one is refused with what to do.
    Label maps, vector volumes and single slices are refused as well.
    """
    _check_volume_node(volume_node)
    image = image_from_ijk_to_lps(_voxels_kji(volume_node), RAS_TO_LPS @ ijk_to_world_ras(volume_node),
                                  _node_label(volume_node))
    image.SetMetaData("mrml_node_name", volume_node.GetName())
    return image


def _check_on_grid(labelmap: sitk.Image, volume_node) -> None:
    """Raise unless `labelmap` lies on the volume node's grid (LPS world space, like `volume_node_to_image`)."""
    size = tuple(volume_node.GetImageData().GetDimensions())
    expected = RAS_TO_LPS @ ijk_to_world_ras(volume_node)
    if tuple(labelmap.GetSize()) != size or not np.allclose(ijk_to_lps_matrix(labelmap), expected, atol=1e-3):
        raise GeometryError(f"the result does not lie on the grid of {_node_label(volume_node)}: size "
                            f"{labelmap.GetSize()} vs {size}, IJK->LPS\n{ijk_to_lps_matrix(labelmap).round(3)}\nvs\n"
                            f"{expected.round(3)}")


# ----------------------------------------------------------------------- result -> node


def temporary_labelmap_node(scene, voxels_kji: np.ndarray, volume_node):
    """A temporary label map node holding `voxels_kji` on the volume node's own (local) grid."""
    from vtk.util.numpy_support import numpy_to_vtk

    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("prostateseg-tmp"))
    node.SetHideFromEditors(True)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    node.SetIJKToRASMatrix(ijk_to_ras)
    # Under the volume's transform, so that importing it into a segmentation under that same
    # transform moves no voxel.
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(voxels_kji.shape[::-1])
    flat = np.ascontiguousarray(voxels_kji, dtype=np.uint8).ravel()
    image_data.GetPointData().SetScalars(numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    node.SetAndObserveImageData(image_data)
    return node


def remove_nodes(scene, *nodes) -> None:
    """Remove nodes from the scene with their display and storage nodes (None and removed ones skipped)."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        for index in range(node.GetNumberOfDisplayNodes() if node.IsA("vtkMRMLDisplayableNode") else 0):
            display = node.GetNthDisplayNode(index)
            if display is not None:
                scene.RemoveNode(display)
        if node.IsA("vtkMRMLStorableNode") and node.GetStorageNode() is not None:
            scene.RemoveNode(node.GetStorageNode())
        scene.RemoveNode(node)


def _colour_table_ids(scene) -> set[str]:
    return {scene.GetNthNodeByClass(n, "vtkMRMLColorTableNode").GetID()
            for n in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))}


def _set_terminology(segment, structure: anatomy.Structure) -> None:
    segment.SetName(structure.name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*(c / 255.0 for c in structure.color))
    segment.SetColorAutoGenerated(False)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology_entry(structure))


def _set_label_values(segmentation, values: dict[str, int]) -> None:
    """Give segments their catalogue label values (what .seg.nrrd files and exports carry).

    In a shared labelmap a segment's label value also says which of the layer's
    voxels are its own, so the number cannot simply be changed: the layer's
    voxels are renumbered with it. A layer holding only segments being renumbered
    is renumbered in one pass (it stays one layer); a segment sharing its layer
    with others first gets a layer of its own."""

    def renumber(layer_ids, image):
        old = {i: segmentation.GetSegment(i).GetLabelValue() for i in layer_ids}
        if image is not None and image.GetPointData().GetScalars() is not None:
            voxels = vtk_to_numpy(image.GetPointData().GetScalars())  # a view: renumbered in place
            table = np.arange(max(256, int(voxels.max()) + 1, *(v + 1 for v in values.values())))
            for i in layer_ids:
                table[old[i]] = values[i]
            voxels[:] = table[voxels].astype(voxels.dtype)
            image.Modified()
        for i in layer_ids:
            segmentation.GetSegment(i).SetLabelValue(int(values[i]))

    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    pending = [i for i in values if segmentation.GetSegment(i).GetLabelValue() != values[i]]
    while pending:
        segment_id = pending[0]
        layer = list(segmentation.GetSegmentIDsForLayer(segmentation.GetLayerIndex(segment_id)))
        if set(layer) <= set(values):
            group = layer
        else:
            segmentation.SeparateSegmentLabelmap(segment_id)
            group = [segment_id]
        renumber(group, segmentation.GetSegment(segment_id).GetRepresentation(representation))
        pending = [i for i in pending if i not in group]


def _place_in_hierarchy(scene, node, volume_node) -> None:
    """Put `node` beside the volume in the subject hierarchy (under its study, when it has one)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    parent = hierarchy.GetItemParent(volume_item) if volume_item else hierarchy.GetSceneItemID()
    node_item = hierarchy.GetItemByDataNode(node)
    if node_item:
        hierarchy.SetItemParent(node_item, parent)
    else:  # the Slicer application adds an item for each new node; plain MRML does not
        hierarchy.CreateItem(parent, node)


def result_to_segmentation_node(result: Result, volume_node, segmentation_node=None, *,
                                name: str | None = None, show_3d: bool = True,
                                smoothing: float = DEFAULT_SMOOTHING):
    """Show a pipeline result as segments of a vtkMRMLSegmentationNode.

    Without `segmentation_node` a new node is made (named `name`, by default
    "<volume> segmentation"), referencing the volume's geometry, under the same
    transform and beside the volume in the subject hierarchy. Given a node, only
    its segments with the result's names are replaced (keeping their place);
    its other segments are left as they are. Each segment gets its name, colour,
    label value and SNOMED CT terminology; with `show_3d` a closed surface
    (smoothed by `smoothing`, 0-1) is made for the 3-D views.
    """
    return labelmap_to_segmentation_node(result.labelmap, [s.structure for s in result.segments], volume_node,
                                         segmentation_node, name=name, show_3d=show_3d, smoothing=smoothing)


def labelmap_to_segmentation_node(labelmap: sitk.Image, structures: Sequence[anatomy.Structure], volume_node,
                                  segmentation_node=None, *, name: str | None = None, show_3d: bool = True,
                                  smoothing: float = DEFAULT_SMOOTHING):
    """Show the `structures` of a label map on the volume's grid as segments, one per structure
    (its voxels are those of the label map with its value), as `result_to_segmentation_node` does
    for a pipeline result: e.g. reference labels."""
    structures = list(structures)
    _check_volume_node(volume_node)
    scene = volume_node.GetScene()
    _check_on_grid(labelmap, volume_node)
    labels = sitk.GetArrayViewFromImage(labelmap)

    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} segmentation")
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        if volume_node.GetParentTransformNode() is not None:
            segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    elif segmentation_node.GetScene() is not scene:
        raise SegcoreError(f"{_node_label(segmentation_node)} is not in the volume's scene.")
    segmentation = segmentation_node.GetSegmentation()

    labelmap_node = None
    try:
        # Label k of the temporary map fills the k-th segment ID, so existing segments keep their IDs.
        ids = vtk.vtkStringArray()
        voxels = np.zeros(labels.shape, np.uint8)
        for index, structure in enumerate(structures, start=1):
            segment_id = segmentation.GetSegmentIdBySegmentName(structure.name)
            if not segment_id:
                segment_id = segmentation.AddEmptySegment(structure.name, structure.name)
            ids.InsertNextValue(segment_id)
            voxels[labels == structure.value] = index
        if ids.GetNumberOfValues():
            labelmap_node = temporary_labelmap_node(scene, voxels, volume_node)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    labelmap_node, segmentation_node, ids):
                raise SegcoreError(f"Slicer could not import the result into {_node_label(segmentation_node)}.")
        for index, structure in enumerate(structures):
            _set_terminology(segmentation.GetSegment(ids.GetValue(index)), structure)
        _set_label_values(segmentation, {ids.GetValue(index): structure.value
                                         for index, structure in enumerate(structures)})
    except Exception:
        if created:
            remove_nodes(scene, segmentation_node)
        raise
    finally:
        remove_nodes(scene, labelmap_node)

    if created:
        _place_in_hierarchy(scene, segmentation_node, volume_node)
    if show_3d and structures:
        segmentation.SetConversionParameter("Smoothing factor", f"{float(smoothing):g}")
        segmentation_node.CreateClosedSurfaceRepresentation()
    return segmentation_node


# ------------------------------------------------------------------ segments -> label map


def label_values(names: Sequence[str]) -> list[int]:
    """Label values for segments by name: the catalogue's value for a known structure (prostate 1,
    bladder 2, ...), and values after the catalogue's (18, 19, ...) for other names, in order, so that a
    user's own segment never takes the value of a structure the models know."""
    next_free = max(anatomy.BY_VALUE) + 1
    values = []
    for name in names:
        known = anatomy.BY_NAME.get(name)
        if known is not None:
            values.append(known.value)
        else:
            values.append(next_free)
            next_free += 1
    return values


def segmentation_node_to_labelmap(segmentation_node, volume_node, names: Sequence[str] | None = None) -> sitk.Image:
    """The named segments as one label map on the volume's grid (LPS world space, like `volume_node_to_image`).

    Values follow `label_values` (prostate 1, bladder 2, ...; other names 18, 19, ...).
    `names=None` takes every segment. Where segments overlap, the later one in
    `names` wins.
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise SegcoreError("no segmentation selected: choose the segmentation to read.")
    _check_volume_node(volume_node)
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    if names is None:
        names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
    ids = []
    for segment_name in names:
        segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
        if not segment_id:
            present = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
            raise SegcoreError(f"{_node_label(segmentation_node)} has no segment named {segment_name!r}; "
                               f"it has: {', '.join(present) or 'no segments'}.")
        ids.append(segment_id)

    if len(set(names)) != len(names):
        raise SegcoreError(f"segment names repeat in {list(names)}: give each segment once.")
    values = label_values(names)
    labels = np.zeros(volume_node.GetImageData().GetDimensions()[::-1], np.uint16)
    colour_tables_before = _colour_table_ids(scene)
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("prostateseg-tmp"))
    try:
        for segment_id, value in zip(ids, values):
            single = vtk.vtkStringArray()
            single.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentation_node, single, labelmap_node, volume_node):
                raise SegcoreError(f"Slicer could not export segment {segmentation.GetSegment(segment_id).GetName()!r}.")
            labels[_voxels_kji(labelmap_node) != 0] = value
    finally:
        remove_nodes(scene, labelmap_node)
        for node_id in _colour_table_ids(scene) - colour_tables_before:  # made by the export for its label map
            scene.RemoveNode(scene.GetNodeByID(node_id))
    if labels.max(initial=0) <= np.iinfo(np.uint8).max:
        labels = labels.astype(np.uint8)
    return image_from_ijk_to_lps(labels, RAS_TO_LPS @ ijk_to_world_ras(volume_node), _node_label(volume_node))
