"""Reading and writing images, orientation and resampling, always in physical space.

Everything here works on `SimpleITK.Image`: physical coordinates are ITK's LPS
millimetres, and an image's grid is its size, spacing, origin and direction.

- `read_image` reads NIfTI, NRRD/NHDR, MHA/MHD, a DICOM series folder or a
  single DICOM file, checks that the result is a sane 3-D scalar volume (and,
  for CT, that it holds Hounsfield units) and raises a `SegcoreError` otherwise.
- `canonicalize` permutes and flips the voxel axes (no interpolation) so that
  i, j, k run as close as possible to L, P, S; `restore_orientation` undoes it
  exactly, voxel for voxel.
- `resample_to_spacing` / `resample_like` move images between grids: linear or
  B-spline for CT, label-aware linear interpolation for label maps.
"""

from __future__ import annotations

import itertools
import logging
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
    if path.is_dir():
        image = _read_dicom_folder(path)
    elif is_dicom_file(path):
        image = _read_dicom_file(path)
    else:
        image = _read_volume_file(path)
    check_volume(image, str(path))
    if kind == "ct":
        check_not_blank(image, str(path))
        check_ct_like(image, str(path))
    elif kind == "labels":
        image = as_labelmap(image, str(path))
    return image


def _read_volume_file(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        if is_volume_file(path):
            what = "it is damaged or not what its name says"
        else:
            what = "its format is not one we read (NIfTI, NRRD, MHA/MHD or DICOM)"
        raise UnreadableImageError(f"{path}: cannot read this image: {what}. ({_first_line(exc)})") from None


def _read_dicom_folder(folder: Path) -> sitk.Image:
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise UnreadableImageError(f"{folder}: the folder is empty. Give a DICOM series folder or an image file.")
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        volumes = sorted(p.name for p in entries if p.is_file() and is_volume_file(p))
        hint = f" It holds image files ({', '.join(volumes[:3])}...): give one of them instead." if volumes else ""
        raise UnreadableImageError(f"{folder}: no DICOM series in this folder.{hint}")
    candidates = []
    for sid in series_ids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)
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
    return _read_dicom_series(files, str(folder))


def _read_dicom_file(path: Path) -> sitk.Image:
    """A single DICOM file: the whole series it belongs to if its folder holds it, else the file."""
    folder = str(path.parent)
    for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid)
        if len(files) > 1 and any(Path(f).resolve() == path.resolve() for f in files):
            log.info("%s is one slice of a series of %d: reading the whole series", path.name, len(files))
            return _read_dicom_series(files, str(path))
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise UnreadableImageError(f"{path}: cannot read this DICOM file ({_first_line(exc)}).") from None


def _dicom_header(file_name: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file_name))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UnreadableImageError(f"{file_name}: damaged DICOM file ({_first_line(exc)}).") from None
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}


def _read_dicom_series(files, where: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # keep each slice's header: positions are checked below
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UnreadableImageError(f"{where}: cannot read the DICOM series ({_first_line(exc)}).") from None
    headers = [{key: reader.GetMetaData(n, key) for key in ("0020|0032", "0020|0037")
                if reader.HasMetaDataKey(n, key)} for n in range(len(files))]
    _check_slice_positions(headers, where)
    return image


def _check_slice_positions(headers, where: str) -> None:
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


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# --------------------------------------------------------------------------- checks


def check_volume(image: sitk.Image, where: str = "image") -> None:
    """Raise unless `image` is a sane 3-D scalar volume."""
    dim = image.GetDimension()
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
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise GeometryError(f"{where}: the direction matrix is not orthonormal (sheared or damaged header).")


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
        raise NotCTError(
            f"{where}: intensities {low:.0f} to {high:.0f} (median {median:.0f}) do not look like CT in "
            "Hounsfield units (air about -1000, soft tissue 0-80). Is this MR, or CT saved without its "
            "rescale slope/intercept? ProstateSeg needs CT in HU."
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


def axis_aligned_grid(image: sitk.Image, spacing_mm) -> sitk.Image:
    """An empty reference image with identity direction and the given spacing
    that covers `image`'s physical extent."""
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    low, high = physical_bounds(image)
    size = np.maximum(1, np.ceil((high - low) / spacing - 1e-6)).astype(int)
    # Centred on the old extent so that neither side is favoured.
    return centred_grid((low + high) / 2, spacing, size)


def centred_grid(centre_lps, spacing_mm, size) -> sitk.Image:
    """An empty axis-aligned LPS reference image (UInt8) of `size` voxels of `spacing_mm` whose voxel
    centres are centred on `centre_lps`."""
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
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
