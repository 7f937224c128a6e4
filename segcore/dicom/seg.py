"""DICOM SEG (Segmentation Storage) of a label map on a CT series' grid, written and read with highdicom.

One binary segment per structure, coded with the catalogue's SNOMED CT category,
type and laterality (the codes a `.seg.nrrd` carries), its display colour and the
algorithm that made it; every frame references the CT instance of its plane.
Frames of a segment that hold nothing are left out (highdicom's default), as
dcmqi and Slicer read them. Reading maps segments to our labels by their SNOMED
CT type and laterality (else by name, through the synonym table).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore.anatomy import Structure
from segcore.dicom.ct import Algorithm, CtSeries, new_uid
from segcore.files import atomic_output


def _cielab(rgb) -> tuple[float, float, float]:
    """sRGB (0-255) -> CIELab (D65), what DICOM's Recommended Display CIELab Value holds."""
    from skimage.color import rgb2lab

    lab = rgb2lab(np.asarray(rgb, float).reshape(1, 1, 3) / 255.0)[0, 0]
    return float(lab[0]), float(lab[1]), float(lab[2])


def _description(number: int, structure: Structure, algorithm: Algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    category, kind = (hd.sr.CodedConcept(code, scheme, meaning) for scheme, code, meaning in
                      (structure.category, structure.type))
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.name,
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues[algorithm.generation],
        # DICOM: a manual segment names no algorithm
        algorithm_identification=None if algorithm.generation == "MANUAL" else hd.AlgorithmIdentificationSequence(
            name=algorithm.model[:64], family=codes.cid7162.ArtificialIntelligence,
            version=(algorithm.model_version or "unknown")[:64]),
        tracking_id=structure.name,
        tracking_uid=new_uid(),
        display_color=hd.color.CIELabColor(*_cielab(structure.color)),
    )
    if structure.modifier:
        scheme, code, meaning = structure.modifier
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(code, scheme, meaning)]
    return description


def segmentation(labelmap: sitk.Image, structures: Sequence[Structure], series: CtSeries,
                 algorithm: Algorithm | None = None):
    """A DICOM SEG (highdicom Segmentation) of `labelmap`, whose grid is the series' (`ct_series_for`)."""
    import highdicom as hd

    from segcore import __version__

    algorithm = algorithm or Algorithm()
    array = sitk.GetArrayViewFromImage(labelmap)
    segment_numbers = np.zeros(array.shape, dtype=np.uint8 if len(structures) < 256 else np.uint16)
    for number, s in enumerate(structures, start=1):
        segment_numbers[array == s.value] = number  # frames follow series.instances, i.e. the k order
    with _quiet_highdicom():
        return hd.seg.Segmentation(
            source_images=series.instances,
            pixel_array=segment_numbers,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_description(n, s, algorithm) for n, s in enumerate(structures, start=1)],
            series_instance_uid=new_uid(),
            series_number=902,
            sop_instance_uid=new_uid(),
            instance_number=1,
            manufacturer="ProstateSeg",
            manufacturer_model_name=algorithm.model[:64],
            software_versions=f"ProstateSeg {__version__}, model {algorithm.model_version or 'unknown'}"[:64],
            device_serial_number="none",
            content_label="PROSTATESEG",
            content_creator_name="ProstateSeg^Automatic",
            content_description=f"{algorithm.generation.capitalize()} segmentation: {algorithm.description}"[:64],
            series_description=f"ProstateSeg {algorithm.model}"[:64],
        )


class _quiet_highdicom:
    """highdicom logs at INFO for every routine step; keep that out of the user's terminal."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("highdicom")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def write_seg(labelmap: sitk.Image, structures: Sequence[Structure], series: CtSeries, path,
              algorithm: Algorithm | None = None, overwrite: bool = False) -> Path:
    """Write `labelmap`'s structures as a DICOM SEG referencing `series`."""
    dataset = segmentation(labelmap, structures, series, algorithm)
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------ reading

DICOM_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _structure_of(description, table):
    """The catalogue structure a segment is: by its SNOMED CT type (and laterality), else by its label."""
    from segcore import anatomy

    kind = description.SegmentedPropertyTypeCodeSequence[0]
    modifiers = getattr(kind, "SegmentedPropertyTypeModifierCodeSequence", [])
    modifier = str(modifiers[0].CodeValue) if modifiers else None
    for s in anatomy.STRUCTURES:
        if s.type[1] == str(kind.CodeValue) and (s.modifier[1] if s.modifier else None) == modifier:
            return s, ""
    match = table.match(str(getattr(description, "SegmentLabel", "")))
    return match.structure, match.reason


def is_dicom_seg(path) -> bool:
    """Whether `path` is a DICOM SEG file."""
    from segcore.dicom.ct import read_header
    from segcore.image import is_dicom_file

    path = Path(path)
    return path.is_file() and is_dicom_file(path) and str(
        getattr(read_header(path), "SOPClassUID", "")) == DICOM_SEG_STORAGE


def seg_labelmap(path, image: sitk.Image, series: CtSeries, table) -> tuple[sitk.Image, list[str]]:
    """A DICOM SEG as a label map (project values) on `image`'s grid, whose instances are `series`; notes
    say what each segment became. Segments that overlap cannot be one label map: a one-line error."""
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    from segcore.errors import GeometryError, SegcoreError

    name = Path(path).name
    try:
        with _quiet_highdicom():
            seg = hd.seg.segread(str(path))
    except (InvalidDicomError, ValueError, AttributeError, KeyError, TypeError, OSError, EOFError) as error:
        raise SegcoreError(f"{name}: not a readable DICOM SEG ({str(error).splitlines()[0]})") from None
    if str(getattr(seg, "FrameOfReferenceUID", "")) != series.frame_of_reference_uid:
        raise GeometryError(f"{name} is in another frame of reference than the CT series: give the CT it "
                            "was made on")
    numbers, values, notes = [], [], []
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        structure, reason = _structure_of(description, table)
        label = str(getattr(description, "SegmentLabel", number))
        if structure is None:
            notes.append(f"segment {label!r} ignored: {reason}")
            continue
        if structure.value in values:
            raise SegcoreError(f"{name}: two segments are {structure.name} ({label!r} and an earlier one): "
                               "keep one of them")
        numbers.append(number)
        values.append(structure.value)
        notes.append(f"segment {label!r} -> {structure.value} {structure.name}")
    pixels = np.zeros((len(series.instances), *image.GetSize()[1::-1], max(1, len(numbers))), np.uint8)
    if numbers:
        try:
            pixels = seg.get_pixels_by_source_instance(
                series.sop_instance_uids, segment_numbers=numbers, assert_missing_frames_are_empty=True)
        except (ValueError, KeyError, RuntimeError) as error:
            raise GeometryError(f"{name} does not fit the CT series: {str(error).splitlines()[0]}") from None
    labels = _combined(pixels > 0, values, name)
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    return result, notes


def seg_file_labelmap(path, ct_source, map_file=None) -> tuple[sitk.Image, list[str]]:
    """A DICOM SEG as a label map on the grid of the CT series `ct_source` (a folder or one file of it)."""
    from segcore.dicom.ct import ct_series_for
    from segcore.dicom.names import SynonymTable
    from segcore.image import read_image

    image = read_image(ct_source, kind="ct")
    return seg_labelmap(path, image, ct_series_for(image, ct_source), SynonymTable(map_file))


def _combined(masks: np.ndarray, values: list[int], name: str) -> np.ndarray:
    """(k, j, i, segment) masks -> one label array; overlapping segments are refused, saying which."""
    from segcore.errors import SegcoreError

    counts = masks.sum(axis=-1)
    if (counts > 1).any():
        first = np.argwhere(counts > 1)[0]
        both = [values[n] for n in np.flatnonzero(masks[tuple(first)])]
        raise SegcoreError(f"{name}: segments overlap ({int((counts > 1).sum())} voxels, e.g. labels "
                           f"{both[0]} and {both[1]}); one label map cannot hold both: compare them one by one")
    labels = np.zeros(counts.shape, np.uint8)
    for index, value in enumerate(values):
        labels[masks[..., index]] = value
    return labels
