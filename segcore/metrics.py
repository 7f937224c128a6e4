"""Segmentation quality metrics: overlap, surface distances and volumes per label.

The core works on numpy boolean masks plus a spacing; :func:`evaluate` wraps it
for SimpleITK label images that share one voxel grid.

Conventions (read these before comparing numbers with other tools):

* Axis order. Spacing is always given in SimpleITK's (x, y, z) order, while the
  arrays are numpy's ``sitk.GetArrayFromImage`` order ``[z, y, x]``; the spacing is
  reversed internally.
* Surface. A surface voxel is a mask voxel with at least one of its 6 face
  neighbours outside the mask; the image border counts as outside. Distances are
  between voxel centres, in mm, using the anisotropic spacing.
* ASD, the average symmetric surface distance:
  ``(sum_{a in S_pred} d(a, S_ref) + sum_{b in S_ref} d(b, S_pred)) / (|S_pred| + |S_ref|)``,
  i.e. the mean of the pooled distances (not the mean of the two directed means).
* HD is the symmetric Hausdorff distance between the two surfaces (the largest
  pooled distance).
* HD95 is the *pooled* variant: the 95th percentile of the pooled distances of
  both directions, with numpy's default linear interpolation between order
  statistics. (Some tools instead take the max of the two directed 95th
  percentiles, which is never smaller; compare like with like.)
* SEN = TP / |ref|, PPV = TP / |pred|, DSC = 2 TP / (|pred| + |ref|);
  volumes in cc (1 cc = 1000 mm^3).
* Empty masks never produce NaN or inf (JSON cannot hold them); instead:

  ============  =====  ================  =====  =====  ===============
  case          DSC    ASD / HD / HD95   SEN    PPV    flag
  ============  =====  ================  =====  =====  ===============
  both empty    1.0    0.0               1.0    1.0    ``both_empty``
  pred empty    0.0    None              0.0    None   ``pred_empty``
  ref empty     0.0    None              None   0.0    ``ref_empty``
  ============  =====  ================  =====  =====  ===============

  ``None`` means "undefined" (a distance to a surface that does not exist, or a
  0/0 ratio); it is ``null`` in JSON, an empty cell in CSV and ``n/a`` in the
  table. Both masks non-empty but disjoint adds the flag ``no_overlap``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
from scipy import ndimage

from segcore import anatomy
from segcore.errors import GeometryError, UnsupportedImageError
from segcore.files import write_text

HD95_PERCENTILE = 95.0

FLAG_BOTH_EMPTY = "both_empty"
FLAG_PRED_EMPTY = "pred_empty"
FLAG_REF_EMPTY = "ref_empty"
FLAG_NO_OVERLAP = "no_overlap"

JSON_SCHEMA = "prostateseg.metrics/1"

# Grid tolerances: files written as float32 (NIfTI) round origins and spacings,
# so exact equality would reject images that are really on the same grid.

# find_objects allocates one entry per label value up to the maximum.
_MAX_FIND_OBJECTS_LABEL = 1 << 16


# --------------------------------------------------------------------------- results


@dataclass
class LabelMetrics:
    """Metrics of one label. Distances in mm, volumes in cc, None = undefined."""

    label: int
    name: str
    dsc: float
    asd: float | None
    hd: float | None
    hd95: float | None
    sen: float | None
    ppv: float | None
    vol_pred_cc: float
    vol_ref_cc: float
    n_pred: int  # voxels
    n_ref: int
    n_tp: int
    flags: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (flags as a list)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["flags"] = list(self.flags)
        return data

    @staticmethod
    def from_dict(data: dict) -> LabelMetrics:
        def opt(key):
            value = data.get(key)
            return None if value is None else float(value)

        return LabelMetrics(
            label=int(data["label"]),
            name=str(data["name"]),
            dsc=float(data["dsc"]),
            asd=opt("asd"),
            hd=opt("hd"),
            hd95=opt("hd95"),
            sen=opt("sen"),
            ppv=opt("ppv"),
            vol_pred_cc=float(data["vol_pred_cc"]),
            vol_ref_cc=float(data["vol_ref_cc"]),
            n_pred=int(data["n_pred"]),
            n_ref=int(data["n_ref"]),
            n_tp=int(data["n_tp"]),
            flags=tuple(data.get("flags") or ()),
        )


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LabelMetrics))


def label_name(value: int) -> str:
    """The catalogue name of a label value, ``label_<v>`` when unknown."""
    entry = anatomy.BY_VALUE.get(int(value))
    return entry.name if entry is not None else f"label_{int(value)}"


# --------------------------------------------------------------------------- numpy core


def _spacing_numpy_order(spacing, ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise GeometryError(f"spacing {spacing} has {len(spacing)} values but the masks have {ndim} axes")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise GeometryError(f"spacing {spacing} must be finite and positive (mm)")
    return spacing[::-1]  # (x, y, z) -> numpy's [z, y, x]


def _check_masks(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise GeometryError(f"mask shapes differ: prediction {pred.shape}, reference {ref.shape}")
    if pred.ndim == 0:
        raise GeometryError("masks must have at least one axis")
    return pred, ref


def _mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of a boolean mask, None when empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other) if other else mask)
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _union_box(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(sa.start, sb.start), max(sa.stop, sb.stop)) for sa, sb in zip(a, b))


def surface_mask(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the image border is outside)."""
    mask = np.asarray(mask, dtype=bool)
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=cross, border_value=0)
    return mask & ~eroded


def _directed(from_surface: np.ndarray, to_surface: np.ndarray, sampling) -> np.ndarray:
    # EDT gives each voxel its distance to the nearest zero, so zero = the target surface.
    dist = ndimage.distance_transform_edt(~to_surface, sampling=sampling)
    return dist[from_surface]


def _surface_distances_cropped(pred, ref, sampling):
    sp = surface_mask(pred)
    sr = surface_mask(ref)
    return _directed(sp, sr, sampling), _directed(sr, sp, sampling)


def surface_distances(pred_mask, ref_mask, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface -> ref surface, ref -> pred).

    ``spacing`` is in (x, y, z) order; masks are numpy ``[z, y, x]`` arrays. Both
    masks must be non-empty (ValueError otherwise: a distance to nothing is undefined).
    """
    pred, ref = _check_masks(pred_mask, ref_mask)
    sampling = _spacing_numpy_order(spacing, pred.ndim)
    box = _union_box(_mask_box(pred), _mask_box(ref))
    if not (pred.any() and ref.any()):
        raise ValueError("surface distances need two non-empty masks")
    # All of both surfaces lie inside the union box, so the EDT restricted to it is exact.
    return _surface_distances_cropped(pred[box], ref[box], sampling)


def _metrics_from_crops(pred, ref, sampling, label: int, name: str) -> LabelMetrics:
    """Metrics of two boolean masks already cropped to (at least) their union box."""
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    n_tp = int(np.count_nonzero(pred & ref))
    voxel_cc = float(np.prod(sampling)) / 1000.0
    common = {
        "label": int(label),
        "name": name,
        "vol_pred_cc": n_pred * voxel_cc,
        "vol_ref_cc": n_ref * voxel_cc,
        "n_pred": n_pred,
        "n_ref": n_ref,
        "n_tp": n_tp,
    }
    if n_pred == 0 and n_ref == 0:
        return LabelMetrics(
            dsc=1.0, asd=0.0, hd=0.0, hd95=0.0, sen=1.0, ppv=1.0, flags=(FLAG_BOTH_EMPTY,), **common
        )
    if n_pred == 0:
        return LabelMetrics(
            dsc=0.0, asd=None, hd=None, hd95=None, sen=0.0, ppv=None, flags=(FLAG_PRED_EMPTY,), **common
        )
    if n_ref == 0:
        return LabelMetrics(
            dsc=0.0, asd=None, hd=None, hd95=None, sen=None, ppv=0.0, flags=(FLAG_REF_EMPTY,), **common
        )
    d_pr, d_rp = _surface_distances_cropped(pred, ref, sampling)
    pooled = np.concatenate([d_pr, d_rp])
    return LabelMetrics(
        dsc=2.0 * n_tp / (n_pred + n_ref),
        asd=float(pooled.mean()),
        hd=float(pooled.max()),
        hd95=float(np.percentile(pooled, HD95_PERCENTILE)),
        sen=n_tp / n_ref,
        ppv=n_tp / n_pred,
        flags=(FLAG_NO_OVERLAP,) if n_tp == 0 else (),
        **common,
    )


def mask_metrics(pred_mask, ref_mask, spacing, label: int = 1, name: str | None = None) -> LabelMetrics:
    """All metrics for two boolean masks (numpy ``[z, y, x]``, spacing in (x, y, z) mm)."""
    pred, ref = _check_masks(pred_mask, ref_mask)
    sampling = _spacing_numpy_order(spacing, pred.ndim)
    box = _union_box(_mask_box(pred), _mask_box(ref))
    if box is not None:
        pred, ref = pred[box], ref[box]
    return _metrics_from_crops(pred, ref, sampling, label, label_name(label) if name is None else name)


def _as_label_array(arr, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise UnsupportedImageError(
                f"the {what} has non-integer values, so it is not a label map; "
                "give a label image (integer values, one per structure)"
            )
        return arr.astype(np.int64)
    raise UnsupportedImageError(f"the {what} has pixel type {arr.dtype}, not a label map of integers")


def _label_boxes(arr: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """Bounding box of every non-zero label value in one pass where possible."""
    if arr.size == 0:
        return {}
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi < _MAX_FIND_OBJECTS_LABEL:
        if hi == 0:
            return {}
        work = arr if arr.dtype.kind == "i" or arr.dtype.itemsize < 8 else arr.astype(np.int64)
        return {i + 1: box for i, box in enumerate(ndimage.find_objects(work, max_label=hi)) if box}
    # Negative or huge label values: slower, but still correct.
    boxes = {}
    for value in np.unique(arr):
        if value != 0:
            boxes[int(value)] = _mask_box(arr == value)
    return boxes


def _normalise_labels(labels) -> list[int]:
    out: list[int] = []
    for value in labels:
        if isinstance(value, (bool, np.bool_)) or int(value) != value:
            raise ValueError(f"label values must be integers, got {value!r}")
        if int(value) not in out:
            out.append(int(value))
    return out


def evaluate_arrays(pred, ref, spacing, labels: Iterable[int] | None = None) -> list[LabelMetrics]:
    """Metrics per label for two numpy label arrays (``[z, y, x]``, spacing in (x, y, z) mm).

    ``labels`` defaults to the sorted union of the non-zero values present in either.
    """
    pred = _as_label_array(pred, "prediction")
    ref = _as_label_array(ref, "reference")
    if pred.shape != ref.shape:
        raise GeometryError(f"array shapes differ: prediction {pred.shape}, reference {ref.shape}")
    sampling = _spacing_numpy_order(spacing, pred.ndim)
    pred_boxes = _label_boxes(pred)
    ref_boxes = _label_boxes(ref)
    wanted = sorted(set(pred_boxes) | set(ref_boxes)) if labels is None else _normalise_labels(labels)
    results = []
    for value in wanted:
        box = _union_box(pred_boxes.get(value), ref_boxes.get(value))
        if value == 0:
            box = tuple(slice(None) for _ in range(pred.ndim))  # background fills the image
        elif box is None:
            box = tuple(slice(0, 0) for _ in range(pred.ndim))  # absent from both: empty masks
        results.append(_metrics_from_crops(pred[box] == value, ref[box] == value, sampling,
                                           value, label_name(value)))
    return results


# --------------------------------------------------------------------------- SimpleITK level


def check_same_grid(pred_image, ref_image, what: tuple[str, str] = ("prediction", "reference")) -> None:
    """Raise GeometryError unless both images have the same size, spacing, origin and direction."""
    from segcore.image import grid_differences

    problems = grid_differences(pred_image, ref_image)
    if problems:
        raise GeometryError(
            f"the {what[0]} and the {what[1]} are not on the same voxel grid ("
            + "; ".join(f"{what[0]} vs {what[1]}: {p}" for p in problems)
            + f"). Resample the {what[0]} onto the {what[1]} grid (nearest-neighbour "
            "interpolation for label maps) and evaluate again."
        )


def _image_array(image, what: str) -> np.ndarray:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedImageError(
            f"the {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a label map has one"
        )
    return sitk.GetArrayViewFromImage(image)


def evaluate(pred_image, ref_image, labels: Iterable[int] | None = None) -> list[LabelMetrics]:
    """Metrics per label for two SimpleITK label images on the same grid.

    ``labels`` defaults to the union of the non-zero values present in either image.
    Raises GeometryError when the grids differ.
    """
    check_same_grid(pred_image, ref_image)
    pred = _image_array(pred_image, "prediction")
    ref = _image_array(ref_image, "reference")
    return evaluate_arrays(pred, ref, ref_image.GetSpacing(), labels)


def centroids(label_image) -> dict[int, tuple[float, ...]]:
    """Centroid of each non-zero label in physical coordinates (x, y, z) mm."""
    import SimpleITK as sitk

    image = label_image
    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64,
                                  sitk.sitkInt8, sitk.sitkInt16, sitk.sitkInt32, sitk.sitkInt64):
        arr = _as_label_array(sitk.GetArrayViewFromImage(image), "label image")
        image = sitk.GetImageFromArray(arr.astype(np.int32))
        image.CopyInformation(label_image)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(image)
    return {int(v): tuple(float(c) for c in stats.GetCentroid(v)) for v in sorted(stats.GetLabels())}


# --------------------------------------------------------------------------- output


def results_to_json(results: Sequence[LabelMetrics], meta: dict | None = None) -> str:
    """JSON text: ``{"schema", "meta", "labels": [LabelMetrics.to_dict(), ...]}``."""
    doc = {"schema": JSON_SCHEMA, "meta": dict(meta or {}), "labels": [r.to_dict() for r in results]}
    # allow_nan=False: a NaN or inf reaching here is a bug, never a value to write.
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write_json(results: Sequence[LabelMetrics], path, meta: dict | None = None, overwrite: bool = True) -> None:
    """Write the results (and optional ``meta``, e.g. input paths) as JSON."""
    write_text(path, results_to_json(results, meta), overwrite=overwrite, newline="")


def read_json(path) -> list[LabelMetrics]:
    """Read a file written by :func:`write_json`."""
    with open(os.fspath(path), encoding="utf-8") as fh:
        doc = json.load(fh)
    return [LabelMetrics.from_dict(entry) for entry in doc["labels"]]


def results_to_csv(results: Sequence[LabelMetrics]) -> str:
    """CSV text, one row per label; undefined values are empty cells, flags joined by ';'."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELD_NAMES)
    for r in results:
        row = []
        for key, value in r.to_dict().items():
            if key == "flags":
                row.append(";".join(value))
            elif value is None:
                row.append("")
            elif isinstance(value, float):
                row.append(repr(value))  # repr keeps every digit, so the CSV round-trips exactly
            else:
                row.append(str(value))
        writer.writerow(row)
    return buf.getvalue()


def write_csv(results: Sequence[LabelMetrics], path, overwrite: bool = True) -> None:
    """Write the results as CSV (header = :data:`FIELD_NAMES`)."""
    write_text(path, results_to_csv(results), overwrite=overwrite, newline="")


def read_csv(path) -> list[LabelMetrics]:
    """Read a file written by :func:`write_csv`."""
    with open(os.fspath(path), encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        data = {k: (None if v == "" else v) for k, v in row.items()}
        data["flags"] = [f for f in (row.get("flags") or "").split(";") if f]
        out.append(LabelMetrics.from_dict(data))
    return out


_TABLE_COLUMNS = (
    # header, attribute, format
    ("DSC", "dsc", "{:.4f}"),
    ("ASD mm", "asd", "{:.2f}"),
    ("HD mm", "hd", "{:.2f}"),
    ("HD95 mm", "hd95", "{:.2f}"),
    ("SEN", "sen", "{:.4f}"),
    ("PPV", "ppv", "{:.4f}"),
    ("pred cc", "vol_pred_cc", "{:.2f}"),
    ("ref cc", "vol_ref_cc", "{:.2f}"),
)


def format_table(results: Sequence[LabelMetrics]) -> str:
    """A fixed-width text table, one row per label; ``n/a`` = undefined (see flags)."""
    header = ["label", "name"] + [h for h, _, _ in _TABLE_COLUMNS] + ["flags"]
    rows = []
    for r in results:
        cells = [str(r.label), r.name]
        for _, attr, fmt in _TABLE_COLUMNS:
            value = getattr(r, attr)
            cells.append("n/a" if value is None else fmt.format(value))
        cells.append(",".join(r.flags))
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(cells):
        # Text columns left-aligned, numbers right-aligned; the last column is not padded.
        parts = []
        for i, (cell, width) in enumerate(zip(cells, widths)):
            if i == len(cells) - 1:
                parts.append(cell)
            elif i == 1:
                parts.append(cell.ljust(width))
            else:
                parts.append(cell.rjust(width))
        return "  ".join(parts).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths).rstrip()]
    lines += [line(row) for row in rows]
    return "\n".join(lines) + "\n"
