"""The DICOM CT series behind an image, and CT series written from an image.

An RT Structure Set or a DICOM SEG must name, for every contour or frame, the
CT instance whose plane it lies on. The image a label map lives on was read from
a series by SimpleITK, which sorts slices along the slice normal; rather than
trust any order, each instance's Image Position (Patient) is projected onto the
image's grid: it must fall on a voxel-slice origin, with the same row and column
directions. So any file names, any slice order and any orientation are matched
by geometry, and a series that does not match the grid is refused.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore.errors import GeometryError, InputNotFoundError, UnreadableImageError, UnsupportedImageError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

# How far (in voxels) an instance's position may sit from a voxel-slice origin: DICOM's decimal
# strings round positions to about 0.01 mm; anything further is another grid.
_IN_PLANE_TOLERANCE = 0.02
_SLICE_TOLERANCE = 0.05
_DIRECTION_TOLERANCE = 1e-4


@dataclass
class CtSeries:
    """The CT instances of one series, in the order of an image's k (slice) index."""

    files: list[Path]
    instances: list  # pydicom Datasets without pixel data; instances[k] lies on voxel slice k

    @property
    def first(self):
        return self.instances[0]

    @property
    def study_uid(self) -> str:
        return str(self.first.StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.first.FrameOfReferenceUID)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.instances]


def dicom_files(source) -> list[Path]:
    """The DICOM files of a series folder, or of the folder of one file of the series."""
    from segcore.image import is_dicom_file

    source = Path(source)
    if not source.exists():
        raise InputNotFoundError(f"{source} does not exist")
    folder = source if source.is_dir() else source.parent
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))
    if not files:
        raise UnreadableImageError(f"{source}: no DICOM files here")
    return files


def read_header(path):
    """A DICOM file's header (no pixel data); a damaged or truncated file is a one-line error."""
    import pydicom
    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as error:  # noqa: BLE001 - truncated files raise struct.error, length errors and more
        raise UnreadableImageError(f"{Path(path).name}: not a readable DICOM file ({error})") from None
    # Some scanners leave the SOP Class/Instance UID empty in the data set and give them only in the file
    # meta information; references to the instance need them.
    meta = getattr(header, "file_meta", None)
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not str(header.get(keyword, "") or "") and meta is not None and meta.get(meta_keyword):
            setattr(header, keyword, meta.get(meta_keyword))
    return header


def _grid_axes(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(image.GetDirection(), float).reshape(3, 3), np.asarray(image.GetSpacing(), float),
            np.asarray(image.GetOrigin(), float))


def slice_of(instance, image: sitk.Image) -> tuple[int | None, str]:
    """The voxel slice k an instance lies on, or None and why not."""
    direction, spacing, origin = _grid_axes(image)
    try:
        position = np.asarray([float(v) for v in instance.ImagePositionPatient])
        orientation = np.asarray([float(v) for v in instance.ImageOrientationPatient])
    except (AttributeError, TypeError, ValueError):
        return None, "it has no Image Position/Orientation (Patient)"
    if (abs(orientation[:3] - direction[:, 0]).max() > _DIRECTION_TOLERANCE
            or abs(orientation[3:] - direction[:, 1]).max() > _DIRECTION_TOLERANCE):
        return None, "its row/column directions differ from the image's"
    index = direction.T @ (position - origin) / spacing
    k = round(float(index[2]))
    if abs(index[:2]).max() > _IN_PLANE_TOLERANCE or abs(index[2] - k) > _SLICE_TOLERANCE:
        return None, f"its position {np.round(position, 2).tolist()} is not on a slice of the image's grid"
    if not 0 <= k < image.GetSize()[2]:
        return None, "it lies outside the image"
    if int(instance.Rows) != image.GetSize()[1] or int(instance.Columns) != image.GetSize()[0]:
        return None, f"it has {instance.Rows}x{instance.Columns} pixels, the image {image.GetSize()[1]}x{image.GetSize()[0]}"
    return k, ""


def match_series(image: sitk.Image, headers: Sequence[tuple[Path, object]], where: str) -> CtSeries:
    """The one CT series among `headers` ((path, dataset) pairs) whose instances tile the image's slices."""
    groups: dict[str, list[tuple[Path, object]]] = {}
    for path, ds in headers:
        if getattr(ds, "Modality", "") == "CT" or str(getattr(ds, "SOPClassUID", "")) == CT_IMAGE_STORAGE:
            groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((path, ds))
    if not groups:
        raise UnsupportedImageError(f"{where}: no CT images among the DICOM files")
    problems = []
    for series_uid, members in sorted(groups.items(), key=lambda item: -len(item[1])):
        if any(str(ds.SOPClassUID) == ENHANCED_CT_IMAGE_STORAGE for _, ds in members):
            problems.append("it is an Enhanced (multi-frame) CT, which is not supported yet")
            continue
        slots: list = [None] * image.GetSize()[2]
        problem = ""
        for path, ds in members:
            k, why = slice_of(ds, image)
            if k is None:
                problem = f"{path.name}: {why}"
                break
            if slots[k] is not None:
                problem = f"{path.name} and {slots[k][0].name} lie on the same slice"
                break
            slots[k] = (path, ds)
        missing = [k for k, slot in enumerate(slots) if slot is None]
        if not problem and missing:
            problem = f"{len(missing)} slice(s) have no CT instance (first: slice {missing[0]})"
        if not problem:
            return CtSeries([p for p, _ in slots], [ds for _, ds in slots])
        problems.append(problem)
    raise GeometryError(f"{where}: the DICOM CT series does not match the image's voxel grid ({problems[0]}). "
                        "Give the DICOM series the image was read from.")


def ct_series_for(image: sitk.Image, source) -> CtSeries:
    """The CT series (a folder, or one file of it) that `image` was read from, matched slice by slice."""
    files = dicom_files(source)
    headers = []
    for path in files:
        try:
            headers.append((path, read_header(path)))
        except UnreadableImageError:
            continue  # a damaged stray file beside the series; the series itself is checked slice by slice
    return match_series(image, headers, str(source))


# ------------------------------------------------------------------------- writing


def new_uid(*entropy) -> str:
    """A new DICOM UID: random, or derived from `entropy` (the same inputs give the same UID)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(e) for e in entropy] if entropy else None))


def now_da_tm() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def write_ct_series(image: sitk.Image, folder, *, patient_name: str = "Phantom^Pelvis",
                    patient_id: str = "PHANTOM", patient_position: str = "HFS", seed: str | None = None,
                    study_uid: str | None = None, frame_of_reference_uid: str | None = None,
                    file_names=None) -> list[Path]:
    """Write a CT volume as a DICOM CT series, one file per voxel slice, in the image's own geometry.

    Patient position (HFS, FFS, HFP, FFP...) is recorded as given; the geometry
    is the image's (Image Position/Orientation (Patient) in its LPS space), so a
    feet-first or prone scan is an image whose direction says so. With `seed` the
    UIDs are reproducible. `file_names(k)` names slice k's file (default
    ``CT<k>.dcm``). Values are rounded to whole HU and stored as int16.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    direction, spacing, _ = _grid_axes(image)
    voxels = np.clip(np.rint(sitk.GetArrayViewFromImage(image)), -32768, 32767).astype(np.int16)
    entropy = [seed] if seed is not None else []
    study_uid = study_uid or new_uid(*entropy, "study")
    series_uid = new_uid(*entropy, "series")
    frame_uid = frame_of_reference_uid or new_uid(*entropy, "frame")
    date, time = now_da_tm()
    written = []
    for k in range(image.GetSize()[2]):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = new_uid(*entropy, "instance", k) if entropy else new_uid()
        ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = date, time, date, time
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.Manufacturer = "CT", "ProstateSeg phantom"
        ds.SeriesDescription = "synthetic pelvic CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
        ds.KVP = ""
        ds.SliceThickness = f"{spacing[2]:.6g}"
        ds.PatientPosition = patient_position
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "1", 1, 1, k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = image.GetSize()[1], image.GetSize()[0]
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]  # row spacing (between rows), column spacing
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = voxels[k].tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / (file_names(k) if file_names else f"CT{k:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


# ----------------------------------------------------------- objects derived from a CT series


@dataclass(frozen=True)
class Algorithm:
    """What made a segmentation, as DICOM objects record it: the model, and whether people took part
    (`generation`: AUTOMATIC, SEMIAUTOMATIC for a model's result edited by hand, MANUAL)."""

    model: str = "unknown model"
    model_version: str = ""
    generation: str = "AUTOMATIC"

    def __post_init__(self):
        if self.generation not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
            raise ValueError(f"generation must be AUTOMATIC, SEMIAUTOMATIC or MANUAL, not {self.generation!r}")

    @property
    def description(self) -> str:
        from segcore import __version__

        return f"ProstateSeg {__version__}, model {self.model} {self.model_version}".strip()


# Patient and study modules (and the character set their strings are in), copied into derived objects;
# the type 2 ones are written empty when the CT lacks them.
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_COPIED_OPTIONAL = ("SpecificCharacterSet", "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge",
                    "PatientWeight", "PatientSize", "StudyDescription", "PatientIdentityRemoved",
                    "DeidentificationMethod", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
                    "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName",
                    "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID")


def copy_patient_and_study(source, target) -> None:
    """The CT's patient and study modules onto a derived object (same patient, same study)."""
    import copy

    for keyword in _COPIED_TYPE2 + _COPIED_OPTIONAL:
        if keyword in source:
            setattr(target, keyword, copy.deepcopy(source[keyword].value))
        elif keyword in _COPIED_TYPE2:
            setattr(target, keyword, "")
    target.StudyInstanceUID = source.StudyInstanceUID
