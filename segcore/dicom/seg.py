"""DICOM SEG (Segmentation Storage) of a label map on a CT series' grid, written with highdicom.

One binary segment per structure, coded with the catalogue's SNOMED CT category,
type and laterality (the codes a `.seg.nrrd` carries), its display colour and the
algorithm that made it; every frame references the CT instance of its plane.
Frames of a segment that hold nothing are left out (highdicom's default), as
dcmqi and Slicer read them.
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
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
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
            content_description=f"Automatic segmentation: {algorithm.description}"[:64],
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
