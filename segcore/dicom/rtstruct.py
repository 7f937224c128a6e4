"""RT Structure Sets: label maps out as contours, contours in as label maps.

Writing. Each structure is traced in every CT slice plane it occupies by
marching squares at level 0.5 on its binary mask (scikit-image), so contour
vertices sit half-way between an inside and an outside voxel centre: sub-voxel
outlines, not staircase pixel edges; the voxel centres inside a contour are
exactly the structure's voxels. Vertices on a straight run are dropped (the
shape is unchanged). Each contour is CLOSED_PLANAR, lies in one CT slice plane
and references the CT instance of that plane.

Islands and holes: every island and every hole is its own contour, and a hole's
contour lies inside its island's. Readers combine the contours of a plane by the
even-odd (XOR) rule: a point is inside when an odd number of contours surround
it. This is how Eclipse, RayStation, MIM and SlicerRT read and write holes, and
what plastimatch rasterises with ``--xor-contours``; unlike "keyhole" contours
(one outline with a cut into each hole) it needs no zero-width channels that
resampling and editing tools break. Nested islands inside holes work the same way.

Reading. Each ROI's contours are rasterised on a CT grid by the same even-odd
rule (a voxel is inside when its centre is); what cannot be used (fewer than 3
points, contours between slice planes or outside the CT, other geometric types)
is reported, not guessed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore.anatomy import Structure
from segcore.dicom.ct import Algorithm, CtSeries, copy_patient_and_study, new_uid, now_da_tm, read_header
from segcore.dicom.names import roi_names as default_roi_names
from segcore.errors import SegcoreError, UnsupportedImageError
from segcore.files import atomic_output

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# Referenced SOP Class of a study reference in the Structure Set module, as planning systems write it.
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

# A contour may sit this far (in slice spacings) from a slice plane: decimal strings round positions.
_PLANE_TOLERANCE = 0.05


# ------------------------------------------------------------------------------ tracing


def _without_straight_runs(points: np.ndarray) -> np.ndarray:
    """A closed polygon without the vertices that lie on a straight line between their neighbours."""
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    a, b = points - before, after - points
    keep = np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def trace_slices(mask: np.ndarray, offset=(0, 0, 0)) -> dict[int, list[np.ndarray]]:
    """Closed contours of a (k, j, i) boolean mask in each k plane, as (n, 2) arrays of (i, j) indices;
    `offset` is the (k, j, i) index of the mask's first voxel when it is a crop of a larger grid."""
    from skimage.measure import find_contours

    contours: dict[int, list[np.ndarray]] = {}
    for k in range(mask.shape[0]):
        plane = np.pad(mask[k], 1).astype(np.uint8)  # padded: every contour closes
        if not plane.any():
            continue
        traced = []
        for rows_cols in find_contours(plane, 0.5):
            ij = rows_cols[:-1, ::-1] + (offset[2] - 1, offset[1] - 1)  # drop the repeated last vertex
            if len(ij) >= 3:
                traced.append(_without_straight_runs(ij))
        if traced:
            contours[k + offset[0]] = traced
    return contours


def index_to_lps(ij: np.ndarray, k: int, image: sitk.Image) -> np.ndarray:
    """(n, 2) continuous (i, j) indices on plane k -> (n, 3) LPS points in mm."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    ijk = np.column_stack([ij, np.full(len(ij), float(k))]) * np.asarray(image.GetSpacing(), float)
    return ijk @ direction.T + np.asarray(image.GetOrigin(), float)


def lps_to_index(points: np.ndarray, image: sitk.Image) -> np.ndarray:
    """(n, 3) LPS points -> (n, 3) continuous (i, j, k) indices."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    return (points - np.asarray(image.GetOrigin(), float)) @ direction / np.asarray(image.GetSpacing(), float)


# ------------------------------------------------------------------------------ writing


def _reference(sop_class: str, sop_instance: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
    return item


def _referenced_frame(series: CtSeries):
    from pydicom.dataset import Dataset

    series_item = Dataset()
    series_item.SeriesInstanceUID = series.series_uid
    series_item.ContourImageSequence = [_reference(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                                        for ds in series.instances]
    study_item = _reference(STUDY_COMPONENT_MANAGEMENT, series.study_uid)
    study_item.RTReferencedSeriesSequence = [series_item]
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study_item]
    return frame


def _decimal_strings(values: np.ndarray):
    """A DS element's encoded value, made at once: pydicom would build and check one object per number.
    0.001 mm is far below a voxel and keeps each value within DS's 16 characters."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    text = "\\".join(f"{v:.3f}" for v in values).encode("ascii")
    text += b" " * (len(text) % 2)  # DICOM values have even lengths
    return RawDataElement(Tag(0x30060050), "DS", len(text), text, 0, False, True)


def _contour_items(mask: np.ndarray, offset, image: sitk.Image, series: CtSeries) -> list:
    from pydicom.dataset import Dataset

    items = []
    for k, contours in sorted(trace_slices(mask, offset).items()):
        instance = series.instances[k]
        for ij in contours:
            item = Dataset()
            item.ContourImageSequence = [_reference(str(instance.SOPClassUID), str(instance.SOPInstanceUID))]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(ij)
            item.ContourNumber = len(items) + 1
            item[0x30060050] = _decimal_strings(index_to_lps(ij, k, image).ravel())  # Contour Data
            items.append(item)
    return items


def _roi_items(labelmap, structures, series, names, algorithm):
    from pydicom.dataset import Dataset
    from scipy import ndimage

    array = sitk.GetArrayViewFromImage(labelmap)
    boxes = ndimage.find_objects(array) if array.any() else []  # one pass for every label
    rois, contours, observations = [], [], []
    for number, s in enumerate(structures, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, series.frame_of_reference_uid
        roi.ROIName, roi.ROIGenerationAlgorithm = names[s.value], algorithm.generation
        roi.ROIGenerationDescription = algorithm.description[:64]
        rois.append(roi)
        contour = Dataset()
        contour.ROIDisplayColor = [int(c) for c in s.color]
        contour.ReferencedROINumber = number
        box = boxes[s.value - 1] if s.value <= len(boxes) else None
        if box is not None:  # an organ not found stays listed, without contours: the planner sees it is empty
            offset = tuple(b.start for b in box)
            contour.ContourSequence = _contour_items(array[box] == s.value, offset, labelmap, series)
        contours.append(contour)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        if s.type[1]:
            code = Dataset()
            code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning = s.type
            observation.RTROIIdentificationCodeSequence = [code]
        observations.append(observation)
    return rois, contours, observations


def structure_set(labelmap: sitk.Image, structures: Sequence[Structure], series: CtSeries,
                  names: Mapping[int, str] | None = None, algorithm: Algorithm | None = None):
    """An RT Structure Set (pydicom Dataset) of `labelmap`, whose grid is the series' (`ct_series_for`)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from segcore import __version__

    names = dict(names) if names is not None else default_roi_names(structures)
    algorithm = algorithm or Algorithm()
    ds = Dataset()
    copy_patient_and_study(series.first, ds)
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, new_uid()
    date, time = now_da_tm()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "RTSTRUCT", new_uid(), 901, 1
    ds.SeriesDescription = f"ProstateSeg {algorithm.model}"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName = "ProstateSeg", algorithm.model[:64]
    ds.SoftwareVersions = [__version__, algorithm.model_version or "unknown"]
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = getattr(series.first, "PositionReferenceIndicator", "")
    ds.StructureSetLabel, ds.StructureSetName = "ProstateSeg", algorithm.model[:64]
    ds.StructureSetDescription = f"{algorithm.generation.capitalize()} contours: {algorithm.description}"
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(series)]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = _roi_items(
        labelmap, structures, series, names, algorithm)
    if not all(name.isascii() for name in names.values()) and not ds.get("SpecificCharacterSet"):
        ds.SpecificCharacterSet = "ISO_IR 192"  # a clinic's ROI names in UTF-8, declared as such
    ds.ApprovalStatus = "UNAPPROVED"  # a proposal until a clinician approves it in the planning system
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_rtstruct(labelmap: sitk.Image, structures: Sequence[Structure], series: CtSeries, path,
                   names: Mapping[int, str] | None = None, algorithm: Algorithm | None = None,
                   overwrite: bool = False) -> Path:
    """Write `labelmap`'s structures as an RT Structure Set referencing `series`."""
    dataset = structure_set(labelmap, structures, series, names, algorithm)
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------ reading


@dataclass
class Contour:
    points: np.ndarray  # (n, 3) LPS mm
    image_uids: tuple[str, ...] = ()


@dataclass
class Roi:
    number: int
    name: str
    color: tuple[int, int, int] | None
    interpreted_type: str
    frame_of_reference_uid: str
    contours: list[Contour] = field(default_factory=list)


@dataclass
class StructureSetFile:
    """What an RT Structure Set holds, with the problems met while reading it."""

    path: Path
    sop_instance_uid: str
    label: str
    date_time: str
    frame_of_reference_uids: list[str]
    series_uids: list[str]
    rois: list[Roi]
    problems: list[str] = field(default_factory=list)


def _referenced_series(ds) -> tuple[list[str], list[str]]:
    frames, series = [], []
    for frame in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
        frames.append(str(getattr(frame, "FrameOfReferenceUID", "")))
        for study in getattr(frame, "RTReferencedStudySequence", []):
            series += [str(getattr(s, "SeriesInstanceUID", "")) for s in getattr(study, "RTReferencedSeriesSequence", [])]
    return frames, series


def _read_contours(roi: Roi, item, problems: list[str]) -> None:
    for n, contour in enumerate(getattr(item, "ContourSequence", []), start=1):
        kind = str(getattr(contour, "ContourGeometricType", ""))
        data = list(getattr(contour, "ContourData", []) or [])
        where = f"ROI {roi.name!r}, contour {n}"
        if kind != "CLOSED_PLANAR":
            problems.append(f"{where}: {kind or 'no'} geometric type, only CLOSED_PLANAR contours are used")
            continue
        if len(data) % 3 or len(data) < 9:
            problems.append(f"{where}: {len(data) // 3} point(s); a closed contour needs at least 3")
            continue
        uids = tuple(str(getattr(r, "ReferencedSOPInstanceUID", "")) for r in getattr(contour, "ContourImageSequence", []))
        roi.contours.append(Contour(np.asarray(data, float).reshape(-1, 3), uids))


def read_rtstruct(path, dataset=None) -> StructureSetFile:
    """Read an RT Structure Set's ROIs and contours (from `dataset` when the file has been read already); a
    file of another kind is a one-line error."""
    path = Path(path)
    ds = dataset if dataset is not None else read_header(path)
    if str(getattr(ds, "SOPClassUID", "")) != RT_STRUCTURE_SET_STORAGE:
        raise UnsupportedImageError(f"{path.name} is a DICOM {getattr(ds, 'Modality', '?')} object, not an RT "
                                    "Structure Set (RTSTRUCT)")
    problems: list[str] = []
    try:
        frames, series = _referenced_series(ds)
        colors = {int(c.ReferencedROINumber): c for c in getattr(ds, "ROIContourSequence", [])}
        types = {int(o.ReferencedROINumber): str(getattr(o, "RTROIInterpretedType", ""))
                 for o in getattr(ds, "RTROIObservationsSequence", [])}
        rois = []
        for item in getattr(ds, "StructureSetROISequence", []):
            number = int(item.ROINumber)
            contour_item = colors.get(number)
            color = getattr(contour_item, "ROIDisplayColor", None) if contour_item is not None else None
            roi = Roi(number, str(getattr(item, "ROIName", "")).strip(),
                      tuple(int(c) for c in color) if color is not None and len(color) == 3 else None,
                      types.get(number, ""), str(getattr(item, "ReferencedFrameOfReferenceUID", "")))
            if contour_item is not None:
                _read_contours(roi, contour_item, problems)
            rois.append(roi)
    except (AttributeError, TypeError, ValueError, KeyError) as error:
        raise SegcoreError(f"{path.name}: a damaged RT Structure Set ({error})") from None
    when = f"{getattr(ds, 'StructureSetDate', '')}{getattr(ds, 'StructureSetTime', '')}"
    return StructureSetFile(path, str(ds.SOPInstanceUID), str(getattr(ds, "StructureSetLabel", "")), when,
                            frames, series, rois, problems)


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def rasterise(roi: Roi, image: sitk.Image) -> tuple[np.ndarray, list[str]]:
    """An ROI's contours as a (k, j, i) mask on `image`'s grid (even-odd rule), and what could not be used."""
    from skimage.draw import polygon

    size = image.GetSize()
    mask = np.zeros(size[::-1], dtype=bool)
    problems = []
    for n, contour in enumerate(roi.contours, start=1):
        index = lps_to_index(contour.points, image)
        k_values = index[:, 2]
        k = round(float(k_values.mean()))
        where = f"ROI {roi.name!r}, contour {n}"
        if np.ptp(k_values) > 2 * _PLANE_TOLERANCE or abs(k_values.mean() - k) > _PLANE_TOLERANCE:
            problems.append(f"{where}: not in a slice plane of the CT (at slice {k_values.mean():.2f})")
            continue
        if not 0 <= k < size[2]:
            problems.append(f"{where}: outside the CT (slice {k} of 0..{size[2] - 1})")
            continue
        rows, cols = polygon(index[:, 1], index[:, 0], shape=(size[1], size[0]))
        plane = np.zeros((size[1], size[0]), dtype=bool)
        plane[rows, cols] = True
        perimeter = float(np.linalg.norm(np.diff(index[:, :2], axis=0, append=index[:1, :2]), axis=1).sum())
        if abs(len(rows) - _shoelace(index[:, :2])) > 0.5 * perimeter + 2:
            problems.append(f"{where}: the contour crosses itself; filled by the even-odd rule")
        mask[k] ^= plane
    return mask, problems
