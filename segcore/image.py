"""Reading and writing images, orientation and resampling, always in physical space.

Everything here works on `SimpleITK.Image`: physical coordinates are ITK's LPS
millimetres, and an image's grid is its size, spacing, origin and direction.

- `read_image` reads NIfTI, NRRD/NHDR, MHA/MHD, a DICOM series folder or a
  single DICOM file, checks that the result is a sane 3-D scalar volume (and,
  for CT, that it holds Hounsfield units) and raises a `SegcoreError` otherwise:
  incomplete or damaged files (NIfTI data shorter than its header says, a gzip
  stream cut short or failing its CRC), NaN voxels, a physical extent no scanner
  has, DICOM series that mix stacks, scouts or damaged files. Library messages
  (ITK, GDCM, MetaIO) are kept off stderr while reading; our errors say it.
- `centred_grid` / `axis_aligned_grid` make every grid we resample onto, and
  refuse (GeometryError) one too large before anything is allocated.
- `canonicalize` permutes and flips the voxel axes (no interpolation) so that
  i, j, k run as close as possible to L, P, S; `restore_orientation` undoes it
  exactly, voxel for voxel.
- `resample_to_spacing` / `resample_like` move images between grids: linear or
  B-spline for CT, label-aware linear interpolation for label maps.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import struct
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore.errors import (
    GeometryError,
    InputNotFoundError,
    NotCTError,
    UnreadableImageError,
    UnsupportedImageError,
)
from segcore.files import atomic_output

log = logging.getLogger("segcore")

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
AIR_HU = -1024.0
# Sanity limits: outside them a header is almost certainly wrong (e.g. metres or
# microns instead of millimetres), and processing would give nonsense.
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0
MIN_VOXELS_PER_AXIS, MAX_VOXELS_PER_AXIS = 4, 8192
MAX_VOXELS = 2_000_000_000
# Physical extent (LPS box) of an input: no scanner bore is 1 m wide, and a whole-body CT is under 2.5 m
# long. A larger box means a header in other units (e.g. 20 mm voxels that are really 0.8 mm), and
# resampling it would take minutes and gigabytes.
MAX_EXTENT_MM = (1000.0, 1000.0, 2500.0)
# Every grid we resample onto (stage grids, crops) stays within these.
MAX_GRID_VOXELS = 300_000_000
MAX_GRID_EXTENT_MM = 3000.0
_COMPLEX_PIXEL_IDS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in VOLUME_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# --------------------------------------------------------------------------- reading


def read_image(path: str | Path, kind: str = "ct") -> sitk.Image:
    """Read a 3-D image and check it.

    kind: "ct" (Hounsfield units checked), "labels" (integer label map, cast to
    an unsigned type) or "any" (geometry checks only).
    """
    if kind not in ("ct", "labels", "any"):
        raise ValueError(f"kind must be 'ct', 'labels' or 'any', not {kind!r}")
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or folder. Check the path (and the current folder).")
    if kind == "ct" and path.is_file() and _is_slicer_segmentation(path):
        raise UnsupportedImageError(_slicer_segmentation_message(path))
    if path.is_dir():
        image = _read_dicom_folder(path)
    elif is_dicom_file(path):
        image = _read_dicom_file(path)
    else:
        image = _read_volume_file(path)
    return _checked(image, str(path), kind)


def read_dicom_series(files, where: str, kind: str = "ct") -> sitk.Image:
    """Read the DICOM files of one series (from any folders, given in slice order) and check it as
    `read_image` does; `where` names it in messages."""
    return _checked(_read_dicom_series([str(f) for f in files], where), where, kind)


def _checked(image: sitk.Image, where: str, kind: str) -> sitk.Image:
    check_volume(image, where)
    if kind == "ct":
        check_not_tiny(image, where)
        check_finite(image, where)
        check_not_blank(image, where)
        check_ct_like(image, where)
    elif kind == "labels":
        image = as_labelmap(image, where)
    return image


@contextmanager
def quiet_libraries():
    """Keep ITK, GDCM, MetaIO and pydicom from printing on stderr while we read: we check what they
    complain about ourselves and say it in our own words. Yields a list that receives what they printed
    (one string), for our messages and the debug log."""
    printed: list[str] = []
    warning_display = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryFile() as sink:
            warnings.simplefilter("ignore")
            try:  # the C++ libraries write to file descriptor 2 themselves
                saved = os.dup(2)
            except OSError:
                saved = None
            if saved is not None:
                os.dup2(sink.fileno(), 2)
            try:
                yield printed
            finally:
                if saved is not None:
                    os.dup2(saved, 2)
                    os.close(saved)
                    sink.seek(0)
                    text = sink.read().decode("utf-8", "replace").strip()
                    if text:
                        printed.append(text)
                        log.debug("library output while reading: %s", text)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warning_display)


# What NRRD (teem) and MetaImage readers say when a file holds less data than its header promises.
_INCOMPLETE_SIGNS = ("bytes but received", "fread got only", "not read completely", "unexpected end of file",
                     "premature end", "truncated")


def _read_volume_file(path: Path) -> sitk.Image:
    with quiet_libraries() as printed:
        try:
            image = sitk.ReadImage(str(path))
            error = None
        except RuntimeError as exc:
            image, error = None, exc
    if error is None or path.name.lower().endswith((".nii", ".nii.gz")):
        _check_file_data(path)  # also explains why ITK failed on a truncated or damaged gzip stream
    if error is None:
        return image
    said = " ".join([str(error), *printed]).lower()
    if any(sign in said for sign in _INCOMPLETE_SIGNS):
        raise UnreadableImageError(
            f"{path}: the file is incomplete: it holds less image data than its header promises "
            "(an interrupted copy, download or export). Copy or export it again.") from None
    if is_volume_file(path):
        what = "it is damaged or not what its name says"
    else:
        what = "its format is not one we read (NIfTI, NRRD, MHA/MHD or DICOM)"
    raise UnreadableImageError(f"{path}: cannot read this image: {what}. ({_first_line(error)})") from None


# NIfTI data types whose voxels can be NaN: {datatype code: numpy type}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_layout(head: bytes):
    """(data offset, data bytes, float numpy dtype or None) from a NIfTI-1 or -2 header, or None."""
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or min(dims[1:dims[0] + 1]) < 1 or bitpix <= 0 or bitpix % 8:
        return None  # a header we cannot size: ITK's own checks are all we have
    count = int(np.prod([int(d) for d in dims[1:dims[0] + 1]], dtype=np.int64))
    dtype = np.dtype(order + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
    return max(offset, 348), count * bitpix // 8, dtype


def _nifti_chunks(path: Path, chunk_bytes: int = 1 << 22):
    """The bytes of a NIfTI file (decompressed when gzip-compressed) in chunks, read to the end."""
    with open(path, "rb") as stream:
        compressed = stream.read(2) == b"\x1f\x8b"
    if compressed:
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(chunk_bytes):
                    yield chunk
        except (EOFError, OSError, zlib.error) as exc:  # truncated stream, CRC or length mismatch
            raise UnreadableImageError(
                f"{path}: the compressed file is incomplete or damaged ({_first_line(exc)}): an interrupted "
                "copy, download or export. Copy or export it again.") from None
    else:
        with open(path, "rb") as stream:
            while chunk := stream.read(chunk_bytes):
                yield chunk


def _check_file_data(path: Path) -> None:
    """What ITK's NIfTI reader lets pass: too little data (missing voxels read as 0) and NaN voxels
    (read as 0). Both are refused; NRRD and MetaImage readers refuse short data themselves."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    chunks = _nifti_chunks(path)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 540:
            break
    layout = _nifti_layout(head)
    if layout is None:
        for _ in chunks:  # still read a compressed stream to its end: it checks the CRC
            pass
        return
    offset, data_bytes, float_type = layout
    total, nonfinite, pending = 0, 0, b""
    for chunk in itertools.chain([head], chunks):
        start = max(0, offset - total)
        stop = max(0, min(len(chunk), offset + data_bytes - total))
        total += len(chunk)
        if float_type is not None and stop > start:
            pending += chunk[start:stop]
            usable = len(pending) - len(pending) % float_type.itemsize
            values = np.frombuffer(pending[:usable], dtype=float_type)
            nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
            pending = pending[usable:]
    if total < offset + data_bytes:
        raise UnreadableImageError(
            f"{path}: the file is incomplete: it holds {max(0, total - offset)} of the {data_bytes} bytes of "
            f"image data its header promises ({100 * max(0, total - offset) / data_bytes:.0f}%), so voxels "
            "are missing (an interrupted copy, download or export). Copy or export it again.")
    if nonfinite:
        raise UnreadableImageError(_nan_message(str(path), nonfinite))


def _nan_message(where: str, count: int) -> str:
    return (f"{where}: {count} voxel(s) hold NaN or infinity (not a number) instead of Hounsfield units: "
            "the image is damaged or marks missing data that way. Replace them (e.g. with -1024 HU, air) "
            "or export the CT again.")


def _is_slicer_segmentation(path: Path) -> bool:
    if path.name.lower().endswith(".seg.nrrd"):
        return True
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        return False
    try:
        with open(path, "rb") as f:
            header = f.read(65536).split(b"\n\n", 1)[0]
    except OSError:
        return False
    return b"Segment0_ID:=" in header or b"Segmentation_MasterRepresentation:=" in header


def _slicer_segmentation_message(path) -> str:
    return (f"{path}: a Slicer segmentation (.seg.nrrd: segments, not intensities), not a CT. "
            "Give the CT volume it was made on.")


def _read_dicom_folder(folder: Path) -> sitk.Image:
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise UnreadableImageError(f"{folder}: the folder is empty. Give a DICOM series folder or an image file.")
    with quiet_libraries():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    if not series_ids:
        volumes = sorted(p.name for p in entries if p.is_file() and is_volume_file(p))
        hint = f" It holds image files ({', '.join(volumes[:3])}...): give one of them instead." if volumes else ""
        damaged = _damaged_dicom_files(entries, set())
        if damaged and not volumes:
            hint = f" Damaged DICOM files: {', '.join(damaged[:3])}."
        raise UnreadableImageError(f"{folder}: no DICOM series in this folder.{hint}")
    candidates = []
    for sid, files in series.items():
        info = _dicom_header(files[0])
        candidates.append((sid, files, info.get("0008|0060", "").strip(), info.get("0008|103e", "").strip()))
    ct = [c for c in candidates if c[2] == "CT"]
    if not ct:
        found = ", ".join(sorted({c[2] or "unknown" for c in candidates}))
        raise NotCTError(f"{folder}: no CT series here (modalities found: {found}). Give the planning CT series.")
    sid, files, _, description = max(ct, key=lambda c: len(c[1]))
    if len(candidates) > 1:
        log.info(
            "%s: %d series found; using the CT series %s (%d slices%s)",
            folder, len(candidates), sid, len(files), f", '{description}'" if description else "",
        )
    listed = {Path(f).resolve() for files_ in series.values() for f in files_}
    return _read_dicom_series(files, str(folder), _damaged_dicom_files(entries, listed))


def _damaged_dicom_files(entries, listed) -> list[str]:
    """Names of the DICOM files (by their 'DICM' mark) in a folder that GDCM left out of every series and
    that are not whole DICOM objects of another kind (an RT Structure Set beside its CT is not damaged)."""
    damaged = []
    for entry in sorted(entries):
        if entry.is_file() and entry.resolve() not in listed and is_dicom_file(entry):
            try:
                _dicom_header(str(entry))
            except UnreadableImageError:
                if not _is_non_image_object(entry):
                    damaged.append(entry.name)
    return damaged


# DICOM objects that hold no CT image but often sit in the CT's folder: structure sets, plans, reports...
_NON_IMAGE_MODALITIES = {"RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "SEG", "SR", "KO", "PR", "REG", "DOC"}


def _is_non_image_object(path: Path) -> bool:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return False  # unreadable: damaged, as reported
    return str(getattr(header, "Modality", "")) in _NON_IMAGE_MODALITIES


def _read_dicom_file(path: Path) -> sitk.Image:
    """A single DICOM file: the whole series it belongs to if its folder holds it, else the file."""
    folder = str(path.parent)
    with quiet_libraries():
        series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid)
                  for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)]
    for files in series:
        if len(files) > 1 and any(Path(f).resolve() == path.resolve() for f in files):
            log.info("%s is one slice of a series of %d: reading the whole series", path.name, len(files))
            return _read_dicom_series(files, str(path))
    with quiet_libraries():
        try:
            return sitk.ReadImage(str(path))
        except RuntimeError as exc:
            error = _first_line(exc)
    raise UnreadableImageError(f"{path}: cannot read this DICOM file: it is damaged ({error}).")


def _dicom_header(file_name: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file_name))
    with quiet_libraries():
        try:
            reader.ReadImageInformation()
            error = None
        except RuntimeError as exc:
            error = _first_line(exc)
    if error:
        raise UnreadableImageError(f"{file_name}: damaged DICOM file ({error}).")
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}


# Per-slice tags we check: position, orientation, study, frame of reference, image type, instance number.
_SLICE_TAGS = ("0020|0032", "0020|0037", "0020|000d", "0020|0052", "0008|0008", "0020|0013")


def _read_dicom_series(files, where: str, damaged=()) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # keep each slice's header: positions are checked below
    with quiet_libraries():
        try:
            image, error = reader.Execute(), None
        except RuntimeError as exc:
            image, error = None, exc
    if error is not None:
        _find_bad_slice(files, where)
        raise UnreadableImageError(f"{where}: cannot read the DICOM series ({_first_line(error)}).") from None
    headers = [{key: reader.GetMetaData(n, key).strip() for key in _SLICE_TAGS
                if reader.HasMetaDataKey(n, key)} for n in range(len(files))]
    _check_one_stack(headers, files, where)
    _check_slice_positions(headers, where, damaged)
    _check_not_interleaved(image, where)
    return image


def _check_not_interleaved(image: sitk.Image, where: str) -> None:
    """Refuse a volume whose odd and even slices are two different scans (two stacks merged by position,
    with nothing in their headers to tell them apart). In any real scan a slice is closer to its
    neighbour than to the slice after next; in two interleaved scans it is the other way round."""
    array = sitk.GetArrayViewFromImage(image)
    if array.shape[0] < 6:
        return
    step = max(1, min(array.shape[1:]) // 64)
    sample = np.asarray(array[:, ::step, ::step], dtype=np.float32)
    next_ = float(np.mean(np.abs(sample[1:] - sample[:-1])))
    after_next = float(np.mean(np.abs(sample[2:] - sample[:-2])))
    if next_ > 2.0 * after_next + 1.0:
        raise GeometryError(
            f"{where}: every other slice looks like another scan (neighbouring slices differ more than slices "
            "two apart): two stacks were merged into one series. Put each series in its own folder "
            "(or give each its own SeriesInstanceUID).")


def _localizer_message(where: str, name: str) -> str:
    return (f"{where}: {name} is a scout (localizer) image, not a slice of the CT volume. Remove it from "
            "the folder (or export the CT series alone).")


def _find_bad_slice(files, where: str) -> None:
    """After the series reader failed: name the damaged file or the odd one out (a scout, another size)."""
    shapes = {}
    for name in files:
        header = _dicom_header(name)  # names a damaged file
        if "LOCALIZER" in header.get("0008|0008", "").upper():
            raise GeometryError(_localizer_message(where, Path(name).name))
        shapes.setdefault((header.get("0028|0010"), header.get("0028|0011")), []).append(Path(name).name)
        with quiet_libraries():
            try:
                sitk.ReadImage(str(name))
                error = None
            except RuntimeError as exc:
                error = _first_line(exc)
        if error:
            raise UnreadableImageError(f"{where}: the DICOM file {Path(name).name} is damaged ({error}). "
                                       "Export the series again (or remove that file).")
    if len(shapes) > 1:
        odd = min(shapes.values(), key=len)
        raise GeometryError(f"{where}: the slices differ in size ({', '.join(odd[:3])} differ from the rest): "
                            "the folder mixes images of several series. Export the CT series alone.")


def _check_one_stack(headers, files, where: str) -> None:
    """Refuse slices that are not one stack of one scan: scouts, and stacks of other studies, frames of
    reference or orientations merged into one series (e.g. files with no or the same SeriesInstanceUID)."""
    for header, name in zip(headers, files):
        if "LOCALIZER" in header.get("0008|0008", "").upper():
            raise GeometryError(_localizer_message(where, Path(name).name))
    for tag, what in (("0020|000d", "studies (StudyInstanceUID)"), ("0020|0052", "frames of reference"),
                      ("0020|0037", "orientations"), ("0020|0013", None)):
        groups: dict[str, list[str]] = {}
        for n, (header, name) in enumerate(zip(headers, files)):
            if header.get(tag):
                value = header[tag] if tag != "0020|0037" else _rounded(header[tag])
                groups.setdefault(value, []).append((n, Path(name).name))
        if what is None:  # instance numbers: each slice of one stack has its own
            repeated = [[name for _, name in slices] for slices in groups.values() if len(slices) > 1]
            if repeated and _numbering_stacks_overlap(headers, groups):
                raise GeometryError(
                    f"{where}: several slices carry the same instance number ({', '.join(repeated[0][:2])}): "
                    "the series holds two or more stacks merged into one. Put each series in its own folder "
                    "(or give each its own SeriesInstanceUID).")
        elif len(groups) > 1:
            examples = ", ".join(slices[0][1] for slices in groups.values())
            raise GeometryError(
                f"{where}: the slices come from {len(groups)} different {what} (e.g. {examples}), merged into "
                "one series (no or the same SeriesInstanceUID). Put each series in its own folder.")


def _numbering_stacks_overlap(headers, groups) -> bool:
    """Whether the slices that repeat instance numbers lie among the others (two interleaved stacks)
    rather than after them (one series acquired in parts, numbering restarted for each)."""
    try:
        row_col = [float(v) for v in headers[0]["0020|0037"].split("\\")]
        normal = np.cross(row_col[:3], row_col[3:])
        along = [float(np.dot([float(v) for v in header["0020|0032"].split("\\")], normal)) for header in headers]
    except (KeyError, ValueError):
        return True  # no positions to tell: repeated numbers are all we know
    stacks: list[list[float]] = []
    for slices in groups.values():
        for occurrence, (n, _) in enumerate(slices):
            if occurrence == len(stacks):
                stacks.append([])
            stacks[occurrence].append(along[n])
    first, second = stacks[0], stacks[1]
    return max(min(first), min(second)) < min(max(first), max(second))


def _rounded(values: str) -> str:
    try:
        return ",".join(f"{float(v):.3f}" for v in values.split("\\"))
    except ValueError:
        return values


def _check_slice_positions(headers, where: str, damaged=()) -> None:
    """Refuse series whose slices are not evenly spaced along one normal (gaps,
    duplicates, gantry tilt): one spacing per axis cannot describe them."""
    if len(headers) < 3:
        return
    positions, normal = [], None
    for header in headers:
        try:
            positions.append([float(v) for v in header["0020|0032"].split("\\")])
            if normal is None:
                row_col = [float(v) for v in header["0020|0037"].split("\\")]
                normal = np.cross(row_col[:3], row_col[3:])
        except (KeyError, ValueError):
            return  # no position tags (e.g. secondary capture): trust the reader
    along = np.sort(np.asarray(positions) @ normal)
    steps = np.diff(along)
    median = float(np.median(steps))
    if median <= 0 or np.any(np.abs(steps - median) > 0.1 * median + 1e-3):
        if damaged:
            raise UnreadableImageError(
                f"{where}: damaged DICOM file(s) {', '.join(damaged[:3])} cannot be read, and the series has a "
                "gap where they belong. Export the series again (or replace those files).")
        raise GeometryError(
            f"{where}: the slices are not evenly spaced (steps from {steps.min():.2f} to {steps.max():.2f} mm): "
            "the series has gaps, duplicates or several stacks. Export a complete, single-stack CT series."
        )
    in_plane = np.asarray(positions) - np.outer(np.asarray(positions) @ normal, normal)
    if np.ptp(in_plane, axis=0).max() > 0.1 * median + 1e-3:
        raise GeometryError(
            f"{where}: the slices are shifted against each other (gantry tilt?). "
            "Resample the series to a regular grid first (e.g. Slicer's 'Acquisition Transform Correction')."
        )
    if damaged:
        log.warning("%s: damaged DICOM file(s) left out (not part of the series read): %s",
                    where, ", ".join(damaged[:5]))


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# --------------------------------------------------------------------------- checks


def check_volume(image: sitk.Image, where: str = "image") -> None:
    """Raise unless `image` is a sane 3-D scalar volume."""
    dim = image.GetDimension()
    if image.GetPixelID() in _COMPLEX_PIXEL_IDS:
        raise UnsupportedImageError(
            f"{where}: a complex-valued image (e.g. raw MR or Fourier data); a CT holds real Hounsfield units. "
            "Give the CT volume itself."
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedImageError(
            f"{where}: a vector/colour image ({image.GetNumberOfComponentsPerPixel()} components per voxel); "
            "a grey-value CT volume is needed."
        )
    if dim == 2:
        raise UnsupportedImageError(
            f"{where}: a 2-D image (one slice). Give the whole CT: a DICOM series folder or a 3-D volume file."
        )
    if dim != 3:
        raise UnsupportedImageError(
            f"{where}: a {dim}-D image (e.g. a time series). Extract one 3-D CT volume from it first."
        )
    size, spacing = image.GetSize(), image.GetSpacing()
    if min(size) < MIN_VOXELS_PER_AXIS or max(size) > MAX_VOXELS_PER_AXIS or int(np.prod(size)) > MAX_VOXELS:
        raise GeometryError(
            f"{where}: size {size} voxels is not a CT volume we can process "
            f"(each axis {MIN_VOXELS_PER_AXIS}-{MAX_VOXELS_PER_AXIS} voxels)."
        )
    if min(spacing) < MIN_SPACING_MM or max(spacing) > MAX_SPACING_MM:
        raise GeometryError(
            f"{where}: voxel spacing {tuple(round(s, 4) for s in spacing)} mm is implausible for CT "
            f"(expected {MIN_SPACING_MM}-{MAX_SPACING_MM} mm): the header is probably in other units. Fix the header."
        )
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise GeometryError(f"{where}: the direction matrix is not orthonormal (sheared or damaged header).")
    check_extent(image, where)


def check_extent(image: sitk.Image, where: str = "image") -> None:
    """Refuse an image whose physical box (LPS) is larger than any scanner's: a header in other units."""
    if not np.all(np.isfinite(image.GetOrigin())):
        raise GeometryError(f"{where}: the origin {image.GetOrigin()} is not a number (damaged header).")
    low, high = physical_bounds(image)
    extent = high - low
    if np.any(extent > np.asarray(MAX_EXTENT_MM)):
        raise GeometryError(
            f"{where}: the image covers {' x '.join(f'{v:.0f}' for v in extent)} mm (left-right x "
            f"front-back x head-foot; size {image.GetSize()} voxels of "
            f"{' x '.join(f'{v:g}' for v in image.GetSpacing())} mm), larger than any CT "
            f"(at most {' x '.join(f'{v:.0f}' for v in MAX_EXTENT_MM)} mm): the voxel spacing in the header "
            "is probably wrong (other units?). Fix the header's spacing."
        )


def check_finite(image: sitk.Image, where: str = "image") -> None:
    """Refuse NaN or infinite voxels (only floating-point images can hold them)."""
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind in "fc":
        count = int(array.size - np.count_nonzero(np.isfinite(array)))
        if count:
            raise UnreadableImageError(_nan_message(where, count))


def left_handed_note(image: sitk.Image) -> str | None:
    """A note when the voxel grid is left-handed (direction determinant -1), else None.

    Warned about, not refused: such grids are legitimate and common (NIfTI in FSL's radiological order,
    slices stored from head to feet), and the pipelines handle them exactly. But a header whose
    direction was flipped without reordering the voxels (an editing or conversion mistake) gives one
    too, and then the anatomy is mirrored: the segmentation may look confident yet lie on the wrong
    side. Only the person who knows where the file came from can tell the two apart.
    """
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if np.linalg.det(direction) > 0:
        return None
    return ("the image's voxel grid is left-handed (its direction matrix is mirrored, determinant -1): "
            "fine if the file came so from the scanner or converter, but if its header was edited or "
            "flipped the anatomy is mirrored; check left and right on the result.")


def check_not_blank(image: sitk.Image, where: str = "image") -> None:
    """A volume with one value everywhere is what ITK returns for some truncated
    files; no scan looks like that."""
    low, high = np.percentile(_sample(image), [0.1, 99.9])
    if low == high:
        raise UnreadableImageError(
            f"{where}: (nearly) every voxel holds the same value ({low:g}): the file is empty or damaged "
            "(e.g. an interrupted copy). Export or copy it again."
        )


def check_ct_like(image: sitk.Image, where: str = "image") -> None:
    """Raise NotCTError unless the intensities look like CT in Hounsfield units.

    A pelvic CT always shows air (about -1000 HU) around the body or in the
    bowel, and soft tissue near 0 HU; MR and CT stored without its rescale
    slope/intercept have neither.
    """
    values = _sample(image)
    low, median, high = np.percentile(values, [0.1, 50, 99.9])
    if low > -400 or not (-1100 <= median <= 1500) or high > 30000:
        _refuse_what_is_not_ct(image, values, where)
        raise NotCTError(
            f"{where}: intensities {low:.0f} to {high:.0f} (median {median:.0f}) do not look like CT in "
            "Hounsfield units (air about -1000, soft tissue 0-80). Is this MR, or CT saved without its "
            "rescale slope/intercept? ProstateSeg needs CT in HU."
        )


# Smaller than this along an axis (mm) or in voxels, an image is no CT of a pelvis.
MIN_CT_EXTENT_MM, MIN_CT_VOXELS = 40.0, 16


def _refuse_what_is_not_ct(image: sitk.Image, values: np.ndarray, where: str) -> None:
    """For an image that fails the HU check: say what it is when we can tell (too small, a label map)."""
    if np.all(np.mod(values, 1) == 0) and values.min() >= 0 and values.max() <= 1000:
        labels = np.unique(values)
        if labels.size <= 64:
            raise NotCTError(
                f"{where}: every voxel holds one of {labels.size} whole numbers "
                f"({', '.join(f'{v:g}' for v in labels[:8])}{'...' if labels.size > 8 else ''}): a label map "
                "(a segmentation), not a CT in Hounsfield units. Give the CT volume it was made on."
            )
    check_not_tiny(image, where, MIN_CT_VOXELS, MIN_CT_EXTENT_MM)


def check_not_tiny(image: sitk.Image, where: str = "image", min_voxels: int = 8, min_extent_mm: float = 0.0) -> None:
    """Refuse (NotCTError) an image too small along an axis to show a pelvis."""
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    if extent.min() < min_extent_mm or min(image.GetSize()) < min_voxels:
        raise NotCTError(
            f"{where}: {' x '.join(str(n) for n in image.GetSize())} voxels "
            f"({' x '.join(f'{v:.0f}' for v in extent)} mm) is too small to be a CT of the pelvis: "
            "give the whole CT volume."
        )


def _sample(image: sitk.Image, max_values: int = 2_000_000) -> np.ndarray:
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, int(np.ceil((array.size / max_values) ** (1 / 3))))
    return np.asarray(array[::step, ::step, ::step], dtype=np.float32).ravel()


def as_labelmap(image: sitk.Image, where: str = "label map") -> sitk.Image:
    """Cast an integer-valued image to UInt8 (or UInt16); refuse fractional or negative values."""
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise UnsupportedImageError(f"{where}: fractional values; a label map holds whole numbers.")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < 0 or high > 65535:
        raise UnsupportedImageError(f"{where}: values {low:.0f}..{high:.0f}; label values must be 0-65535.")
    return sitk.Cast(image, sitk.sitkUInt8 if high <= 255 else sitk.sitkUInt16)


def grid_differences(a: sitk.Image, b: sitk.Image, origin_tolerance_mm: float | None = None) -> list[str]:
    """How the voxel grids of a and b differ (empty when they are the same).

    Tolerances absorb float32 rounding in file headers: spacing 1e-4 relative,
    direction 1e-4, origin 1e-3 of the smallest voxel unless given in mm.
    """
    problems = []
    if a.GetDimension() != b.GetDimension():
        return [f"dimension {a.GetDimension()} vs {b.GetDimension()}"]
    if a.GetSize() != b.GetSize():
        problems.append(f"size {a.GetSize()} vs {b.GetSize()}")
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4, atol=0.0):
        problems.append(f"spacing {a.GetSpacing()} vs {b.GetSpacing()} mm")
    if origin_tolerance_mm is None:
        origin_tolerance_mm = 1e-3 * min(min(a.GetSpacing()), min(b.GetSpacing()))
    if np.max(np.abs(np.subtract(a.GetOrigin(), b.GetOrigin()))) > origin_tolerance_mm:
        problems.append(f"origin {a.GetOrigin()} vs {b.GetOrigin()} mm")
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0.0, atol=1e-4):
        problems.append(f"direction {a.GetDirection()} vs {b.GetDirection()}")
    return problems


def same_grid(a: sitk.Image, b: sitk.Image, tolerance_mm: float | None = None) -> bool:
    """True when both images have the same size, spacing, origin and direction."""
    return not grid_differences(a, b, tolerance_mm)


def image_from_ijk_to_lps(voxels_kji: np.ndarray, matrix, where: str = "image") -> sitk.Image:
    """An image of `voxels_kji` (numpy order k, j, i) on the grid of a 4x4 IJK -> LPS matrix.

    The inverse of `ijk_to_lps_matrix`; refuses a sheared or degenerate matrix, which no
    ITK image can represent.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    columns = matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(f"{where}: voxel spacing must be positive, got {spacing.tolist()}")
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise GeometryError(f"{where}: the voxel axes are not perpendicular (a sheared grid); "
                            "resample the image onto a regular grid first.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels_kji))
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(matrix[:3, 3].tolist())
    return image


def ijk_to_lps_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 matrix taking voxel indices (i, j, k, 1) to LPS millimetres."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)  # scales columns
    matrix[:3, 3] = image.GetOrigin()
    return matrix


# --------------------------------------------------------------------------- writing


def write_image(image: sitk.Image, path: str | Path, overwrite: bool = False) -> Path:
    """Write atomically (temporary name, then rename), compressed where the format allows."""
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)
    return path


# --------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class Orientation:
    """How `canonicalize` rearranged an image, and the grid to return to."""

    permutation: tuple[int, int, int]  # canonical axis c takes original axis permutation[c]
    flips: tuple[bool, bool, bool]  # flipped along canonical axis c
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips)


def canonicalize(image: sitk.Image) -> tuple[sitk.Image, Orientation]:
    """Permute/flip voxel axes so that i, j, k run as closely as possible along
    L, P, S (a direction near identity). Exact: no voxel value changes."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    # The permutation that puts the largest direction components on the diagonal;
    # trying all six stays unambiguous even for 45-degree oblique grids.
    permutation = max(
        itertools.permutations(range(3)),
        key=lambda p: sum(abs(direction[axis, p[axis]]) for axis in range(3)),
    )
    flips = tuple(bool(direction[axis, permutation[axis]] < 0) for axis in range(3))
    orientation = Orientation(
        permutation=tuple(permutation),
        flips=flips,
        size=image.GetSize(),
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=image.GetDirection(),
    )
    if orientation.is_identity:
        return image, orientation

    array = sitk.GetArrayViewFromImage(image)  # numpy axes are (k, j, i)
    # numpy axis of canonical axis c is 2 - c; it comes from original numpy axis 2 - permutation[c]
    canonical = np.transpose(array, [2 - permutation[2 - n] for n in range(3)])
    flip_axes = tuple(2 - c for c in range(3) if flips[c])
    if flip_axes:
        canonical = np.flip(canonical, axis=flip_axes)
    result = sitk.GetImageFromArray(np.ascontiguousarray(canonical))

    spacing = np.asarray(image.GetSpacing())
    new_direction = np.empty((3, 3))
    corner = [0, 0, 0]
    for c in range(3):
        source = permutation[c]
        new_direction[:, c] = direction[:, source] * (-1 if flips[c] else 1)
        if flips[c]:
            corner[source] = image.GetSize()[source] - 1
    result.SetSpacing(tuple(float(spacing[permutation[c]]) for c in range(3)))
    result.SetDirection(tuple(new_direction.ravel()))
    result.SetOrigin(image.TransformIndexToPhysicalPoint(corner))
    _copy_metadata(image, result)
    return result, orientation


def restore_orientation(image: sitk.Image, orientation: Orientation) -> sitk.Image:
    """Undo `canonicalize` for an image on the canonical grid (e.g. a label map)."""
    if not orientation.is_identity:
        array = sitk.GetArrayViewFromImage(image)
        flip_axes = tuple(2 - c for c in range(3) if orientation.flips[c])
        if flip_axes:
            array = np.flip(array, axis=flip_axes)
        inverse = [0, 0, 0]
        for n in range(3):
            inverse[2 - orientation.permutation[2 - n]] = n
        restored = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, inverse)))
    else:
        restored = sitk.Image(image)
    if restored.GetSize() != tuple(orientation.size):
        raise GeometryError(
            f"cannot restore orientation: image size {restored.GetSize()} does not match {orientation.size}"
        )
    restored.SetSpacing(orientation.spacing)
    restored.SetOrigin(orientation.origin)
    restored.SetDirection(orientation.direction)
    return restored


def _copy_metadata(source: sitk.Image, target: sitk.Image) -> None:
    for key in source.GetMetaDataKeys():
        target.SetMetaData(key, source.GetMetaData(key))


# --------------------------------------------------------------------------- resampling

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
    # Each label interpolated on its own, then the most likely wins: no label
    # "between" two others appears and thin structures survive better than
    # with nearest neighbour.
    "label": sitk.sitkLabelLinear,
}


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical box (LPS mm) covering every voxel's full extent."""
    size = np.asarray(image.GetSize())
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in itertools.product(*[(-0.5, s - 0.5) for s in size])
    ]
    corners = np.asarray(corners)
    return corners.min(axis=0), corners.max(axis=0)


def check_grid(spacing_mm, size) -> None:
    """Raise GeometryError unless a grid of `size` voxels of `spacing_mm` is one we can resample onto."""
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    size = np.broadcast_to(np.asarray(size, dtype=float), (3,))
    extent = size * spacing
    problem = None
    if not (np.all(np.isfinite(extent)) and np.all(spacing > 0) and np.all(size >= 1)):
        problem = "its spacing or size is not a positive number"
    elif float(np.prod(size)) > MAX_GRID_VOXELS:
        problem = f"{float(np.prod(size)):.3g} voxels, more than the {MAX_GRID_VOXELS:.3g} we allow"
    elif extent.max() > MAX_GRID_EXTENT_MM:
        problem = f"{extent.max():.0f} mm along an axis, more than the {MAX_GRID_EXTENT_MM:.0f} mm we allow"
    if problem:
        raise GeometryError(
            f"cannot resample onto a grid of {' x '.join(f'{v:g}' for v in size)} voxels of "
            f"{' x '.join(f'{v:g}' for v in spacing)} mm: {problem}. Either the image's header has a wrong "
            "voxel spacing (check it), or the model package asks for an absurd region (its pipeline "
            "crop_mm or spacing settings): use another package."
        )


def axis_aligned_grid(image: sitk.Image, spacing_mm) -> sitk.Image:
    """An empty reference image with identity direction and the given spacing
    that covers `image`'s physical extent."""
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    low, high = physical_bounds(image)
    size = np.maximum(1, np.ceil((high - low) / spacing - 1e-6))
    check_grid(spacing, size)  # before casting: an absurd size may not even fit an int
    size = size.astype(int)
    # Centred on the old extent so that neither side is favoured.
    return centred_grid((low + high) / 2, spacing, size)


def centred_grid(centre_lps, spacing_mm, size) -> sitk.Image:
    """An empty axis-aligned LPS reference image (UInt8) of `size` voxels of `spacing_mm` whose voxel
    centres are centred on `centre_lps`. Refuses (GeometryError) a grid too large to resample onto,
    before allocating anything."""
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    check_grid(spacing, size)
    size = np.asarray(size, dtype=int)
    origin = np.asarray(centre_lps, dtype=float) - (size - 1) / 2 * spacing
    reference = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetOrigin(tuple(float(o) for o in origin))
    return reference


def resample_like(image: sitk.Image, reference: sitk.Image, interpolator: str = "linear",
                  default_value: float | None = None) -> sitk.Image:
    """Resample `image` onto `reference`'s grid. CT comes back as float32 (default
    value air), labels (interpolator 'label' or 'nearest') keep their pixel type."""
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}, not {interpolator!r}")
    is_label = interpolator in ("label", "nearest")
    if default_value is None:
        default_value = 0.0 if is_label else AIR_HU
    pixel_type = image.GetPixelID() if is_label else sitk.sitkFloat32
    return sitk.Resample(
        image, reference, sitk.Transform(), _INTERPOLATORS[interpolator], float(default_value), pixel_type
    )


def resample_onto_part(image: sitk.Image, target: sitk.Image) -> tuple[tuple[slice, ...] | None, np.ndarray]:
    """Linearly resample a small image onto only the part of a large target grid it reaches.

    Returns the (z, y, x) slices of the target's array that the image's physical
    box covers and the float32 values there (0 outside the image), or (None,
    empty) when they do not meet. This keeps pasting a crop back onto a full CT
    cheap whatever the CT's size or orientation."""
    low, high = physical_bounds(image)
    corners = [target.TransformPhysicalPointToContinuousIndex([float(c) for c in corner])
               for corner in itertools.product(*zip(low, high))]
    corners = np.asarray(corners)
    size = np.asarray(target.GetSize())
    first = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, size)
    last = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 1, 0, size)
    if np.any(last <= first):
        return None, np.zeros((0, 0, 0), np.float32)
    region = sitk.Image([int(v) for v in last - first], sitk.sitkUInt8)
    region.SetSpacing(target.GetSpacing())
    region.SetDirection(target.GetDirection())
    region.SetOrigin(target.TransformIndexToPhysicalPoint([int(v) for v in first]))
    values = sitk.GetArrayFromImage(resample_like(image, region, "linear", default_value=0.0))
    return tuple(slice(a, b) for a, b in zip(first[::-1], last[::-1])), values


def resample_to_spacing(image: sitk.Image, spacing_mm, interpolator: str = "linear",
                        default_value: float | None = None) -> sitk.Image:
    """Resample onto an axis-aligned (identity direction) grid of the given
    spacing that covers the image; oblique images are straightened on the way."""
    return resample_like(image, axis_aligned_grid(image, spacing_mm), interpolator, default_value)
