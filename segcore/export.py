"""Writing results: Slicer segmentations (.seg.nrrd), NIfTI / NRRD label maps and
surface meshes, all through a temporary file renamed onto the target.

Geometry: label maps are SimpleITK images, whose physical space is LPS. A
``.seg.nrrd`` is written with ``space: left-posterior-superior`` and the image's
own IJK -> LPS matrix (spacing, direction cosines including oblique and
mirrored axes, origin), which is what slicerio writes and what Slicer reads;
Slicer converts to its RAS space itself (x and y negated).

Segment metadata follows Slicer's ``.seg.nrrd`` fields: name, colour (0..1
floats, not auto-generated), label value, layer, extent and the
``TerminologyEntry`` tag (see :func:`segcore.anatomy.terminology_entry`).

For a DICOM CT input, ``rtstruct`` and ``dicom-seg`` write an RT Structure Set and
a DICOM SEG referencing that series (`segcore.dicom`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore import anatomy
from segcore.anatomy import Structure, terminology_entry
from segcore.errors import (
    InputNotFoundError,
    OutputExistsError,
    SegcoreError,
    UnreadableImageError,
    UnsupportedImageError,
)
from segcore.files import StagedSet, atomic_output, exists_message, make_folder
from segcore.image import as_labelmap, ijk_to_lps_matrix, image_from_ijk_to_lps, quiet_libraries, write_image

LABELMAP_FORMATS = ("seg.nrrd", "nii.gz", "nii", "nrrd")
SURFACE_FORMATS = ("stl", "obj", "vtp", "ply")
DICOM_FORMATS = ("rtstruct", "dicom-seg")
SUPPORTED_FORMATS = LABELMAP_FORMATS + SURFACE_FORMATS + DICOM_FORMATS

_LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ geometry


def _checked_labelmap(labelmap: sitk.Image) -> sitk.Image:
    """The label map as UInt8/UInt16 after checking it is 3-D with whole, non-negative values."""
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedImageError(
            f"a label map must be a 3-D scalar image, got a {labelmap.GetDimension()}-D image with "
            f"{labelmap.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    return as_labelmap(labelmap)


def _smallest_label_type(array: np.ndarray):
    return np.uint8 if (array.size == 0 or array.max() <= np.iinfo(np.uint8).max) else np.uint16


# ------------------------------------------------------------------------- writers


def write_labelmap(image: sitk.Image, path, overwrite: bool = False) -> Path:
    """Write a label map as compressed NIfTI (.nii.gz / .nii) or NRRD (.nrrd), uint8 or uint16."""
    path = Path(path)
    if not path.name.lower().endswith(_LABELMAP_SUFFIXES) or path.name.lower().endswith(".seg.nrrd"):
        raise SegcoreError(
            f"cannot write a label map to {path.name!r}: use one of {', '.join(_LABELMAP_SUFFIXES)} "
            "(or write_seg_nrrd for .seg.nrrd)"
        )
    return write_image(_checked_labelmap(image), path, overwrite=overwrite)


def _check_structures(structures: Sequence[Structure]) -> list[Structure]:
    structures = list(structures)
    values = [s.value for s in structures]
    names = [s.name for s in structures]
    if len(set(values)) != len(values) or len(set(names)) != len(names):
        raise SegcoreError(
            f"structures must have distinct label values and names, got {list(zip(values, names))}"
        )
    for s in structures:
        if not 0 < s.value <= np.iinfo(np.uint16).max:
            raise SegcoreError(f"label value of {s.name!r} must be 1..65535, got {s.value}")
    return structures


def write_seg_nrrd(
    labelmap: sitk.Image, structures: Sequence[Structure], path, overwrite: bool = False
) -> Path:
    """Write a Slicer segmentation (.seg.nrrd): one segment per structure, on the label map's grid.

    Voxels whose value is not among `structures` are written as background.
    """
    import slicerio  # only needed here
    from slicerio.segmentation import terminology_entry_from_string

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise SegcoreError(f"a Slicer segmentation file name must end in .seg.nrrd, got {path.name!r}")
    structures = _check_structures(structures)
    labelmap = _checked_labelmap(labelmap)  # keep a reference: the array below is a view
    array = sitk.GetArrayViewFromImage(labelmap)
    listed = [s.value for s in structures]
    kji = np.where(np.isin(array, listed), array, 0).astype(_smallest_label_type(np.array(listed)))
    shape_ijk = kji.shape[::-1]
    full_extent = [0, shape_ijk[0] - 1, 0, shape_ijk[1] - 1, 0, shape_ijk[2] - 1]

    segmentation = {
        "voxels": np.transpose(kji, (2, 1, 0)),  # slicerio's default index order is (i, j, k)
        "ijkToLPS": ijk_to_lps_matrix(labelmap),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap", "Closed surface"],  # show 3D on load
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [],
    }
    for s in structures:
        segmentation["segments"].append(
            {
                "id": s.name,
                "name": s.name,
                "nameAutoGenerated": False,  # keeps Slicer from renaming from terminology
                "color": [c / 255.0 for c in s.color],
                "colorAutoGenerated": False,
                "labelValue": int(s.value),
                "layer": 0,
                # The full extent works around old Slicer versions that cropped
                # every segment of a layer to the first segment's extent.
                "extent": full_extent,
                "terminology": terminology_entry_from_string(terminology_entry(s)),
            }
        )
    with atomic_output(path, overwrite=overwrite) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation)
    return path


# ------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class Segment:
    """A segment read from a .seg.nrrd; `value` is its label in the returned image."""

    id: str
    name: str
    value: int
    color: tuple[float, float, float] | None
    terminology: str | None


def read_seg_nrrd(path) -> tuple[sitk.Image, list[Segment]]:
    """Read a .seg.nrrd into one label map (LPS, as SimpleITK) and its segments.

    A single-layer file keeps its label values. In a multi-layer file (overlapping
    segments) each segment gets the value of its position (1, 2, ...) and where
    segments overlap the later one wins.
    """
    import slicerio
    from slicerio.segmentation import terminology_entry_to_string

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"segmentation file not found: {path}")
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # pynrrd/slicerio raise assorted types
        raise UnreadableImageError(f"cannot read {path} as a Slicer segmentation: {error}") from error

    voxels = np.asarray(segmentation["voxels"])
    raw_segments = segmentation.get("segments", [])
    if voxels.ndim == 3:
        labels = voxels
        values = [int(s.get("labelValue", 1)) for s in raw_segments]
    elif voxels.ndim == 4:
        labels = np.zeros(voxels.shape[1:], dtype=np.uint8 if len(raw_segments) < 256 else np.uint16)
        values = []
        for index, s in enumerate(raw_segments, start=1):
            labels[voxels[int(s.get("layer", 0))] == int(s.get("labelValue", 1))] = index
            values.append(index)
    else:
        raise UnsupportedImageError(
            f"{path} has {voxels.ndim} dimensions; a segmentation has 3 (or 4 with layers)"
        )

    segments = []
    for s, value in zip(raw_segments, values):
        terminology = s.get("terminology")
        segments.append(
            Segment(
                id=str(s.get("id", "")),
                name=str(s.get("name", s.get("id", ""))),
                value=value,
                color=tuple(float(c) for c in s["color"]) if "color" in s else None,
                terminology=terminology_entry_to_string(terminology) if terminology else None,
            )
        )
    return image_from_ijk_to_lps(np.transpose(labels, (2, 1, 0)), segmentation["ijkToLPS"], str(path)), segments


# --------------------------------------------------------------------- entry point


def normalise_formats(formats: Iterable[str]) -> list[str]:
    """The formats as export keys (``".NII.GZ"`` -> ``"nii.gz"``), checked before any work."""
    if isinstance(formats, str):
        formats = [formats]
    result = []
    for fmt in formats:
        key = str(fmt).strip().lower().lstrip(".")
        if key not in SUPPORTED_FORMATS:
            raise SegcoreError(
                f"unknown export format {fmt!r}; supported formats: {', '.join(SUPPORTED_FORMATS)}"
            )
        if key not in result:
            result.append(key)
    if not result:
        raise SegcoreError(f"no export format given; supported formats: {', '.join(SUPPORTED_FORMATS)}")
    return result



def output_name(stem: str, fmt: str, structure_name: str | None = None) -> str:
    """The file an export of `stem` writes in format `fmt`: ``<stem>.<fmt>`` for label maps,
    ``<stem>_<structure>.<fmt>`` for surfaces; for DICOM, with the base name ``<base>`` being `stem`
    without a trailing ``_seg`` (``case_seg`` -> ``case``): ``<base>_rtstruct.dcm`` and ``<base>_seg.dcm``."""
    if fmt in SURFACE_FORMATS:
        return f"{stem}_{structure_name}.{fmt}"
    if fmt in DICOM_FORMATS:
        base = stem.removesuffix("_seg")
        return f"{base}_rtstruct.dcm" if fmt == "rtstruct" else f"{base}_seg.dcm"
    return f"{stem}.{fmt}"


def possible_names(stem: str, structure_names: Iterable[str]) -> list[str]:
    """Every file name an export of `stem` can write, in any format, for these structures."""
    names = [output_name(stem, fmt) for fmt in LABELMAP_FORMATS + DICOM_FORMATS]
    return names + [output_name(stem, fmt, name) for name in structure_names for fmt in SURFACE_FORMATS]


@contextmanager
def quiet_writers(surfaces: bool) -> Iterator[None]:
    """Keep ITK's and VTK's warnings off stderr while we write: what they would say (an empty or
    degenerate surface, an odd direction matrix) is checked here and goes to the debug log. ITK's side is
    the readers' (`segcore.image.quiet_libraries`); VTK reports through its own output window."""
    with quiet_libraries():
        if not surfaces:
            yield
            return
        from vtkmodules.vtkCommonCore import vtkOutputWindow, vtkStringOutputWindow

        previous, window = vtkOutputWindow.GetInstance(), vtkStringOutputWindow()
        vtkOutputWindow.SetInstance(window)
        try:
            yield
        finally:
            vtkOutputWindow.SetInstance(previous)
            if window.GetOutput().strip():
                log.debug("VTK while writing surfaces: %s", window.GetOutput().strip())


def _plan(fmts, structures, present, stem) -> list[tuple[str, str, Structure | None]]:
    plan: list[tuple[str, str, Structure | None]] = []
    for fmt in fmts:
        if fmt in SURFACE_FORMATS:
            plan += [(fmt, output_name(stem, fmt, s.name), s) for s in structures if s.value in present]
        else:
            plan.append((fmt, output_name(stem, fmt), None))
    return plan


def export_labelmap(
    labelmap: sitk.Image,
    structures: Sequence[Structure] | None,
    outdir,
    stem: str,
    formats: Iterable[str] = ("seg.nrrd", "nii.gz"),
    overwrite: bool = False,
    smoothing: float = 0.5,
    decimation: float = 0.0,
    *,
    source=None,
    roi_names: Mapping[str, str] | None = None,
    algorithm=None,
) -> list[Path]:
    """Write a label map in each requested format into `outdir`; return the files written.

    Label map formats give ``<stem>.<format>``; surface formats (stl, obj, vtp,
    ply) give one ``<stem>_<structure name>.<format>`` per structure present in the
    image (none for a structure too small to give a surface); ``rtstruct`` and
    ``dicom-seg`` give an RT Structure Set and a DICOM SEG (names: `output_name`)
    referencing `source`, the DICOM CT series (folder, or a file of it, or a
    `segcore.dicom.ct.CtSeries` already matched to it) whose grid the label map is on; `roi_names` maps structures (our or TG-263 names) to the
    clinic's ROI names, `algorithm` (`segcore.dicom.ct.Algorithm`) names the model.
    `structures` names the labels to export (default: every catalogued label
    present); other voxel values are written as background. All targets are
    checked before anything is written, and the files are staged and moved in
    together: a failed export leaves no partial set.
    """
    fmts = normalise_formats(formats)
    if not stem or Path(stem).name != stem or stem in (".", ".."):
        raise SegcoreError(f"the output name stem must be a plain file name, got {stem!r}")
    labelmap = _checked_labelmap(labelmap)
    array = sitk.GetArrayViewFromImage(labelmap)
    present = {int(v) for v in np.unique(array) if v != 0}
    if structures is None:
        unknown = sorted(present - set(anatomy.BY_VALUE))
        if unknown:
            raise SegcoreError(f"label values {unknown} are not in the structure catalogue; pass structures")
        structures = [anatomy.BY_VALUE[v] for v in sorted(present)]
    structures = _check_structures(structures)

    dicom = _dicom_target(fmts, labelmap, structures, source, roi_names, algorithm)
    outdir = Path(outdir)
    plan = _plan(fmts, structures, present, stem)
    if not overwrite:
        existing = [outdir / name for _, name, _ in plan if (outdir / name).exists()]
        if existing:
            raise OutputExistsError(exists_message(existing))

    listed = [s.value for s in structures]
    if present - set(listed):
        kept = np.where(np.isin(array, listed), array, 0)
        only_listed = sitk.GetImageFromArray(kept.astype(_smallest_label_type(kept)))
        only_listed.CopyInformation(labelmap)
        labelmap = only_listed

    make_folder(outdir)
    staged = StagedSet(outdir, overwrite=overwrite)
    try:
        with quiet_writers(surfaces=any(fmt in SURFACE_FORMATS for fmt in fmts)):
            _write_plan(labelmap, structures, plan, staged.staging, smoothing, decimation, dicom)
        return staged.commit()
    finally:
        staged.discard()


def dicom_input_problem(source, fmts: Sequence[str]) -> str | None:
    """Why `source` cannot give the DICOM formats among `fmts` (None when it can, or none are asked)."""
    asked = [fmt for fmt in fmts if fmt in DICOM_FORMATS]
    if not asked:
        return None
    from segcore.image import is_dicom_file

    path = Path(source) if source is not None else None
    if path is not None and (is_dicom_file(path) or (path.is_dir() and any(
            p.is_file() and is_dicom_file(p) for p in sorted(path.iterdir())[:50]))):
        return None
    what = "this input" if path is None else f"{path.name}"
    verb = "needs" if len(asked) == 1 else "need"
    return (f"{' and '.join(asked)} {verb} a DICOM CT input (a series folder or a file of one), and {what} is "
            f"not DICOM: leave {', '.join(asked)} out of the formats for it")


@dataclass
class _DicomTarget:
    series: object  # segcore.dicom.ct.CtSeries
    names: dict[int, str]
    algorithm: object


def _dicom_target(fmts, labelmap, structures, source, roi_names, algorithm) -> _DicomTarget | None:
    """The CT series and ROI names for the DICOM formats, checked before anything is written."""
    if not any(fmt in DICOM_FORMATS for fmt in fmts):
        return None
    from segcore.dicom.ct import Algorithm, CtSeries, ct_series_for
    from segcore.dicom.names import roi_names as names_for

    if isinstance(source, CtSeries):  # already matched to the label map's grid (Slicer finds its own files)
        series = source
    else:
        problem = dicom_input_problem(source, fmts)
        if problem:
            raise SegcoreError(problem)
        series = ct_series_for(labelmap, source)
    return _DicomTarget(series, names_for(structures, roi_names), algorithm or Algorithm())


def _write_plan(labelmap, structures, plan, folder: Path, smoothing: float, decimation: float,
                dicom: _DicomTarget | None = None) -> None:
    surfaces = {}
    if any(fmt in SURFACE_FORMATS for fmt, _, _ in plan):
        from segcore import surfaces as surface_module  # vtk is loaded only when meshes are asked for

        surfaces = surface_module.labelmap_to_surfaces(
            labelmap, labels=[s.value for s in structures], smoothing=smoothing, decimation=decimation
        )
    for fmt, name, structure in plan:
        if fmt == "seg.nrrd":
            write_seg_nrrd(labelmap, structures, folder / name)
        elif fmt in SURFACE_FORMATS:
            mesh = surfaces.get(structure.value)
            if mesh is None or mesh.GetNumberOfPoints() == 0:
                log.info("%s: too small for a surface; no %s written", structure.name, name)
                continue
            surface_module.write_surface(mesh, folder / name)
        elif fmt == "rtstruct":
            from segcore.dicom.rtstruct import write_rtstruct

            write_rtstruct(labelmap, structures, dicom.series, folder / name, dicom.names, dicom.algorithm)
        elif fmt == "dicom-seg":
            from segcore.dicom.seg import write_seg

            write_seg(labelmap, structures, dicom.series, folder / name, dicom.algorithm)
        else:
            write_labelmap(labelmap, folder / name)
