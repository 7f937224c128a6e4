"""A clinic's contoured cases (a folder tree of CTs and RT Structure Sets) -> training cases.

One case per CT series. The walk reads every DICOM file's header under the root
(any file names, any folders, several patients, studies and series); each CT
series is paired with the RT Structure Sets that reference it (by series UID, or
failing that by the CT instances their contours name). The CT is read through
`segcore.image` (which checks it is a whole, CT-like stack), its instances are
matched to the voxel slices by geometry (`match_series`), and each mapped ROI is
rasterised on that grid (`rasterise`: even-odd rule, voxel centres inside).

Decisions, reported per case in ``import_report_<UTC time>.csv``:

- ROI names map to labels through the synonym table (`SynonymTable`: the bundled
  ``structure_names.yaml`` plus ``--map FILE``); target volumes (CTV, PTV...) are never organs.
- Several structure sets on one series: each label comes from the newest set
  (StructureSetDate/Time) that has a contoured ROI for it; older ones are reported as superseded.
- Two ROIs of one set mapping to one label ('Prostate' and 'prostate'): that label is
  skipped for the case ("ambiguous").
- Overlapping structures: `LABEL_PRIORITY` decides which label a voxel gets (the small
  gland never vanishes into the bladder); the voxel counts are reported.
- Case names are ``dcm_<12 hex of sha256(CT SeriesInstanceUID)>``: no patient name or ID
  ever reaches a file name, and a re-run recognises (and skips) what it imported before.
- Nothing under the DICOM root is ever written; the output folder may not lie inside it.
  Stored reports name no paths under the root (a damaged file is named on stderr only).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore import anatomy
from segcore.dicom.ct import CT_IMAGE_STORAGE, CtSeries, ct_series_for, match_series, read_header
from segcore.dicom.names import SynonymTable
from segcore.dicom.rtstruct import RT_STRUCTURE_SET_STORAGE, Roi, StructureSetFile, rasterise, read_rtstruct
from segcore.errors import InputNotFoundError, SegcoreError, UnreadableImageError, UnsupportedImageError

log = logging.getLogger(__name__)

# Which label a voxel gets where mapped structures overlap, strongest first: the small structures before
# the large ones around them (the gland must not vanish into the bladder, the vesicles into the rectum).
LABEL_PRIORITY = ("prostate", "seminal_vesicles", "rectum", "bladder", "femoral_head_left", "femoral_head_right")
CASE_PREFIX = "dcm_"
REPORT_COLUMNS = ("case", "status", "reason", "ct_series_uid", "slices", "structure_sets", "found", "mapped",
                  "ignored", "overlaps", "problems")
IMPORTED, ALREADY, SKIPPED, FAILED = "imported", "already imported", "skipped", "failed"


def case_name(series_uid: str) -> str:
    """The case name of a CT series: a hash of its SeriesInstanceUID (never a patient's name or ID)."""
    return CASE_PREFIX + hashlib.sha256(series_uid.encode()).hexdigest()[:12]


@dataclass
class SeriesFiles:
    """One CT series found by the walk: its files and their headers."""

    uid: str
    headers: list = field(default_factory=list)  # (path, pydicom Dataset without pixels)

    @property
    def files(self) -> list[Path]:
        return [p for p, _ in self.headers]

    @property
    def frame_of_reference_uid(self) -> str:
        return str(getattr(self.headers[0][1], "FrameOfReferenceUID", ""))

    @property
    def instance_uids(self) -> set[str]:
        return {str(getattr(ds, "SOPInstanceUID", "")) for _, ds in self.headers}


@dataclass
class Walk:
    """What a DICOM tree holds."""

    series: dict[str, SeriesFiles] = field(default_factory=dict)
    structure_sets: list[StructureSetFile] = field(default_factory=list)
    failed_rtstructs: list[tuple[str, str]] = field(default_factory=list)  # (SOP instance UID, why)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    other_files: int = 0


@dataclass
class CaseRow:
    """One line of the import report."""

    case: str = ""
    status: str = ""
    reason: str = ""
    ct_series_uid: str = ""
    slices: int | str = ""
    structure_sets: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    mapped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    label_values: list[int] = field(default_factory=list)  # the labels the case's label map has (not reported)

    def cells(self) -> list[str]:
        return [str(v) if not isinstance(v, list) else "; ".join(v) for v in
                (getattr(self, c) for c in REPORT_COLUMNS)]


@dataclass
class ImportResult:
    rows: list[CaseRow]
    report: Path

    def count(self, status: str) -> int:
        return sum(row.status == status for row in self.rows)

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(s)} {s}" for s in (IMPORTED, ALREADY, SKIPPED, FAILED))
        return f"{counts}; report: {self.report}"


# ------------------------------------------------------------------------------ the walk


def _header(path: Path):
    """A file's header, or None and why not (no file name in the message: it may name a patient)."""
    try:
        return read_header(path), ""
    except UnreadableImageError as error:
        return None, str(error).replace(path.name, "the file").splitlines()[0][:200]


def dicom_paths(root: Path) -> list[Path]:
    """Every DICOM Part 10 file under `root` (by its 'DICM' mark, whatever its name), in a stable order."""
    from segcore.image import is_dicom_file

    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(folder, n) for n in sorted(names) if not n.startswith(".") and is_dicom_file(Path(folder, n))]
    return found


def walk(root, progress=None) -> Walk:
    """Read the headers of every DICOM file under `root`: CT series by UID, RT Structure Sets read whole."""
    result = Walk()
    paths = dicom_paths(Path(root))
    for n, path in enumerate(paths, start=1):
        ds, why = _header(path)
        if ds is None:
            result.unreadable.append((path, why))
        elif str(getattr(ds, "SOPClassUID", "")) == RT_STRUCTURE_SET_STORAGE:
            try:
                result.structure_sets.append(read_rtstruct(path, ds))  # read once
            except SegcoreError as error:
                message = str(error).replace(path.name, "the file")
                result.failed_rtstructs.append((str(getattr(ds, "SOPInstanceUID", "?")), message))
                log.warning("%s: %s", path, message)
        elif getattr(ds, "Modality", "") == "CT" or str(getattr(ds, "SOPClassUID", "")) == CT_IMAGE_STORAGE:
            uid = str(getattr(ds, "SeriesInstanceUID", ""))
            series = result.series.setdefault(uid, SeriesFiles(uid))
            if str(getattr(ds, "SOPInstanceUID", "")) not in series.instance_uids:  # an exported copy: once
                series.headers.append((path, ds))
        else:
            result.other_files += 1
        if progress is not None:
            progress(n, len(paths))
    return result


def references(structure_set: StructureSetFile, series: SeriesFiles) -> bool:
    """Whether a structure set was drawn on `series`: it names the series, or (naming none) its contours
    name the series' instances."""
    if structure_set.series_uids:
        return series.uid in structure_set.series_uids
    instances = series.instance_uids
    return any(uid in instances for roi in structure_set.rois for c in roi.contours for uid in c.image_uids)


# ------------------------------------------------------------------------------ labels of one case


def describe(structure_set: StructureSetFile) -> str:
    when = structure_set.date_time or "no date"
    return f"{structure_set.sop_instance_uid} ({when})"


def _chosen_rois(structure_sets, table: SynonymTable, row: CaseRow) -> dict[str, Roi]:
    """Each label's ROI: from the newest structure set with a contoured ROI for it; ambiguous labels left out."""
    chosen: dict[str, Roi] = {}
    decided: set[str] = set()
    for ss in sorted(structure_sets, key=lambda s: s.date_time, reverse=True):
        by_label: dict[str, list[Roi]] = {}
        for roi in ss.rois:
            row.found.append(roi.name)
            match = table.match(roi.name)
            if match.structure is None:
                row.ignored.append(f"{roi.name}: {match.reason}")
            elif not roi.contours:
                row.ignored.append(f"{roi.name}: no contours")
            else:
                by_label.setdefault(match.structure.name, []).append(roi)
        for label, rois in by_label.items():
            names = [r.name for r in rois]
            if label in decided:
                row.ignored += [f"{n}: superseded by a newer structure set's {label}" for n in names]
            elif len(rois) > 1:
                row.ignored += [f"{n}: ambiguous ({' and '.join(map(repr, names))} all map to {label}); "
                                f"{label} skipped" for n in names]
            else:
                chosen[label] = rois[0]
            decided.add(label)
    return chosen


def _usable_contours(roi: Roi, instances: set[str], problems: list[str]) -> Roi:
    """The ROI without contours that name a CT instance outside the series."""
    kept = [c for c in roi.contours if not c.image_uids or all(u in instances for u in c.image_uids)]
    if len(kept) < len(roi.contours):
        problems.append(f"ROI {roi.name!r}: {len(roi.contours) - len(kept)} contour(s) reference an image "
                        "outside this CT series; left out")
    return replace(roi, contours=kept)


def _overlaps(masks: dict[str, np.ndarray]) -> list[str]:
    """Where mapped structures overlap: which one won (LABEL_PRIORITY) and how many voxels."""
    if len(masks) < 2:
        return []
    count = sum(m.astype(np.uint8) for m in masks.values())
    where = np.flatnonzero(count > 1)
    if not where.size:
        return []
    at = {label: m.ravel()[where] for label, m in masks.items()}
    order = [label for label in LABEL_PRIORITY if label in masks]
    found = []
    for i, winner in enumerate(order):
        for loser in order[i + 1:]:
            voxels = int(np.count_nonzero(at[winner] & at[loser]))
            if voxels:
                found.append(f"{winner} over {loser}: {voxels} voxel(s)")
    return found


def case_labels(image: sitk.Image, ct: CtSeries, structure_sets, table: SynonymTable, row: CaseRow) -> sitk.Image:
    """The label map (project values) of a CT from its structure sets; what was done goes into `row`."""
    instances = set(ct.sop_instance_uids)
    usable = []
    for ss in structure_sets:
        row.structure_sets.append(describe(ss))
        if ss.frame_of_reference_uids and ct.frame_of_reference_uid not in ss.frame_of_reference_uids:
            row.problems.append(f"structure set {ss.sop_instance_uid} is in another frame of reference "
                                f"({', '.join(ss.frame_of_reference_uids)}) than the CT; not used")
        else:
            usable.append(ss)
    chosen = _chosen_rois(usable, table, row)
    masks: dict[str, np.ndarray] = {}
    for label, roi in chosen.items():
        if roi.frame_of_reference_uid and roi.frame_of_reference_uid != ct.frame_of_reference_uid:
            row.ignored.append(f"{roi.name}: in another frame of reference than the CT")
            continue
        ss = next(s for s in usable if any(r is roi for r in s.rois))
        row.problems += [p for p in ss.problems if p.startswith(f"ROI {roi.name!r}")]
        mask, problems = rasterise(_usable_contours(roi, instances, row.problems), image)
        row.problems += problems
        if not mask.any():
            row.ignored.append(f"{roi.name}: empty (no voxel centre inside a contour on a CT slice plane)")
            continue
        masks[label] = mask
        row.label_values.append(anatomy.BY_NAME[label].value)
        row.mapped.append(f"{roi.name} -> {anatomy.BY_NAME[label].value} {label} ({int(mask.sum())} voxels)")
    row.overlaps = _overlaps(masks)
    labels = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    for label in reversed(LABEL_PRIORITY):
        if label in masks:
            labels[masks[label]] = anatomy.BY_NAME[label].value
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    return result


# ------------------------------------------------------------------------------ one case, the run


def _in_slice_order(headers) -> list[Path]:
    """The files of a series sorted along its slice normal (what a series reader needs)."""
    def position(item) -> float:
        ds = item[1]
        try:
            orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            return float(np.dot(np.cross(orientation[:3], orientation[3:]),
                                [float(v) for v in ds.ImagePositionPatient]))
        except (AttributeError, TypeError, ValueError):
            return 0.0  # no geometry: the reader's own checks say what is wrong

    return [path for path, _ in sorted(headers, key=position)]


def _scrubbed(message: str, root: Path, files) -> str:
    """An error message without the paths of the source tree (folder and file names may name patients)."""
    for folder in sorted({str(p.parent) for p in files} | {str(p.resolve().parent) for p in files}, key=len,
                         reverse=True):
        message = message.replace(folder, "<series folder>")
    for path in files:
        message = message.replace(path.name, "<file>")
    return message.replace(str(root.resolve()), "DICOM_ROOT").replace(str(root), "DICOM_ROOT")


def _import_series(series: SeriesFiles, structure_sets, table, outdir: Path, root: Path) -> CaseRow:
    from segcore.dataset import training_case_paths, write_training_case
    from segcore.image import read_dicom_series

    name = case_name(series.uid)
    row = CaseRow(case=name, ct_series_uid=series.uid, slices=len(series.headers))
    if all(p.exists() for p in training_case_paths(outdir, name)):
        row.status, row.reason = ALREADY, "its files are in the output folder"
        return row
    if not structure_sets:
        row.status, row.reason = SKIPPED, "no RTSTRUCT references this CT series"
        return row
    try:
        image = read_dicom_series(_in_slice_order(series.headers), "the CT series")  # may span folders
        ct = match_series(image, series.headers, "the CT series")
        labels = case_labels(image, ct, structure_sets, table, row)
    except SegcoreError as error:
        row.status, row.reason = FAILED, _scrubbed(str(error), root, series.files)
        return row
    if not row.mapped:  # nothing usable: a plain skip, or a failure when something was wrong with it
        row.status = FAILED if row.problems else SKIPPED
        row.reason = "no mapped structure with contours on this CT" + ("; see problems" if row.problems else "")
        return row
    write_training_case(image, labels, outdir, name, overwrite=True)  # a half-written case of ours is redone
    row.status = IMPORTED
    return row


def _structure_set_rows(found: Walk, used: set[str]) -> list[CaseRow]:
    rows = []
    for ss in found.structure_sets:
        if ss.sop_instance_uid not in used:
            series = ", ".join(ss.series_uids) or "no series UID"
            rows.append(CaseRow(status=FAILED, ct_series_uid=", ".join(ss.series_uids),
                                reason=f"the RTSTRUCT references a CT series that is not under DICOM_ROOT "
                                f"({series})", structure_sets=[describe(ss)], found=[r.name for r in ss.rois]))
    rows += [CaseRow(status=FAILED, reason=f"a damaged RTSTRUCT: {why}", structure_sets=[uid])
             for uid, why in found.failed_rtstructs]
    for path, why in found.unreadable:
        log.warning("%s: not a readable DICOM file (%s)", path, why)
        rows.append(CaseRow(status=FAILED, reason=f"an unreadable DICOM file ({why}); its path is shown on stderr"))
    return rows


def check_folders(root, outdir) -> tuple[Path, Path]:
    """The DICOM root must exist; the output folder must not lie inside it (nothing is written there)."""
    from segcore.files import check_output_folder

    root, outdir = Path(root), Path(outdir)
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: no such folder (give the folder holding the DICOM files)")
    real_root, real_out = root.resolve(), outdir.resolve()
    if real_out == real_root or real_root in real_out.parents:
        raise SegcoreError(f"the output folder {outdir} lies inside the DICOM folder {root}; nothing is ever "
                           "written there: choose an output folder outside it")
    check_output_folder(outdir)
    return root, outdir


def write_labels_json(outdir: Path) -> None:
    """labels.json as `prostateseg phantom` writes it (the organs' values); an existing one must agree."""
    from segcore.files import write_text

    path = outdir / "labels.json"
    targets = [anatomy.BY_NAME[n] for n in anatomy.TARGET_NAMES]
    if path.exists():
        try:
            present = {int(e["value"]): e["name"] for e in json.loads(path.read_text(encoding="utf-8"))["labels"]}
        except (ValueError, KeyError, TypeError, OSError):
            raise SegcoreError(f"{path} is not a labels.json this project wrote; move it away") from None
        if any(present.get(s.value, s.name) != s.name for s in targets):
            raise SegcoreError(f"{path} gives other names to label values 1-6 than this project; "
                               "import into another folder")
        return
    write_text(path, json.dumps(anatomy.labels_json(targets), indent=1))


def write_report(rows: list[CaseRow], outdir: Path) -> Path:
    from segcore.files import write_text

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path, n = outdir / f"import_report_{stamp}.csv", 1
    while path.exists():
        n += 1
        path = outdir / f"import_report_{stamp}_{n}.csv"
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(REPORT_COLUMNS)
    writer.writerows(row.cells() for row in rows)
    return write_text(path, text.getvalue(), newline="")


def import_dicom(root, outdir, map_file=None, progress=None) -> ImportResult:
    """Import every contoured CT series under `root` into the training folder `outdir`.

    `progress(stage, done, total)` is called with stage "reading" (files) and "importing" (CT series).
    """
    from segcore.files import make_folder

    root, outdir = check_folders(root, outdir)
    table = SynonymTable(map_file)
    found = walk(root, None if progress is None else lambda d, t: progress("reading", d, t))
    if not found.series and not found.structure_sets and not found.unreadable and not found.failed_rtstructs:
        raise UnsupportedImageError(f"{root}: no DICOM CT or RTSTRUCT files found under this folder")
    make_folder(outdir)
    write_labels_json(outdir)
    rows, used = [], set()
    for n, series in enumerate(sorted(found.series.values(), key=lambda s: case_name(s.uid)), start=1):
        sets = [ss for ss in found.structure_sets if references(ss, series)]
        used.update(ss.sop_instance_uid for ss in sets)
        rows.append(_import_series(series, sets, table, outdir, root))
        if progress is not None:
            progress("importing", n, len(found.series))
    rows += _structure_set_rows(found, used)
    return ImportResult(rows, write_report(rows, outdir))


# ------------------------------------------------------------------------------ one RTSTRUCT on a given CT


def is_rtstruct(path) -> bool:
    """Whether `path` is a DICOM RT Structure Set file."""
    from segcore.image import is_dicom_file

    path = Path(path)
    if not path.is_file() or not is_dicom_file(path):
        return False
    ds, _ = _header(path)
    return ds is not None and str(getattr(ds, "SOPClassUID", "")) == RT_STRUCTURE_SET_STORAGE


def rtstruct_labelmap(rtstruct_path, ct_source, map_file=None) -> tuple[sitk.Image, CaseRow]:
    """An RT Structure Set as a label map (project values) on the grid of the CT series `ct_source` (a
    folder or one file of it), mapped as the importer maps it. Another series or frame of reference
    than the CT's is a one-line error."""
    from segcore.image import read_image

    ss = read_rtstruct(rtstruct_path)
    image = read_image(ct_source, kind="ct")
    ct = ct_series_for(image, ct_source)
    name = Path(rtstruct_path).name
    if ss.series_uids and ct.series_uid not in ss.series_uids:
        raise SegcoreError(f"{name} references the CT series {', '.join(ss.series_uids)}, but --ct {ct_source} is "
                           f"the series {ct.series_uid}: give the CT series the structures were drawn on")
    if ss.frame_of_reference_uids and ct.frame_of_reference_uid not in ss.frame_of_reference_uids:
        raise SegcoreError(f"{name} is in the frame of reference {', '.join(ss.frame_of_reference_uids)}, but "
                           f"--ct {ct_source} is in {ct.frame_of_reference_uid}: give the CT it was drawn on")
    row = CaseRow(ct_series_uid=ct.series_uid, slices=len(ct.instances))
    labels = case_labels(image, ct, [ss], SynonymTable(map_file), row)
    return labels, row
