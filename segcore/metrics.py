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
* Surface Dice (surface DSC, Nikolov et al. 2018) at tolerance tau = 1, 2 and 3 mm
  (``sdsc_1mm``, ``sdsc_2mm``, ``sdsc_3mm``): the fraction of both surfaces lying
  within tau of the other one, with the surface voxels and distances of ASD/HD:
  ``(#{a in S_pred: d(a, S_ref) <= tau} + #{b in S_ref: d(b, S_pred) <= tau}) / (|S_pred| + |S_ref|)``.
  It counts surface *voxels* (Nikolov's reference code weights surface elements
  by their area, so its values differ slightly, most with very anisotropic
  voxels). A distance within 1e-6 mm of tau counts as ``<= tau`` (floating-point
  rounding of the distance transform). Distances are between voxel centres, so
  a tau below the smallest spacing accepts only voxels on the other surface.
  Empty masks: both empty -> 1.0, one empty -> 0.0 (as DSC; never None).
* Added path length (APL, Vaassen et al. 2020, ``apl_mm``): the length in mm of
  reference contour that would have to be drawn to turn the prediction into the
  reference, counted per slice of the image's third axis (numpy axis 0, the CT
  slice planes). In slice k the 2-D contour of a mask is its pixels with at least
  one of their 4 in-plane neighbours outside the mask (the slice border counts as
  outside). A reference contour pixel is *added* when its in-plane distance
  (pixel centres, mm) to the nearest prediction contour pixel of the same slice
  is more than ``apl_tolerance_mm`` (default :data:`APL_TOLERANCE_MM` = 1 mm, with
  the same 1e-6 mm allowance), or when the prediction has no contour in slice k.
  Each added pixel is one pixel length, the mean of the two in-plane spacings
  ((sx + sy) / 2, exactly the pixel size for square CT pixels).
  ``apl_per_slice_mm`` maps slice index k (0-based, of the whole image) to the
  slice's APL for the slices where it is non-zero; ``apl_mm`` is their sum. The
  1 mm default is about one pixel at CT in-plane spacings (0.6-1.0 mm): the
  one-pixel jitter between two drawings of the same edge is not an edit, any
  visible deviation is; 0 gives the strict pixel-exact count. Empty masks: both
  empty -> 0 (no slices); prediction empty -> the whole reference contour
  length; reference empty -> 0. 2-D masks are one slice (k = 0); APL is None for
  masks of other dimensions. The per-slice values are in JSON only: the CSV
  holds the total (and :func:`read_csv` gives ``apl_per_slice_mm = None``).
* The table shows the surface Dice at 2 mm (``sDSC 2mm``) and the total APL
  (``APL mm``); JSON and CSV have all three tolerances.
* Files written before these metrics existed still read: their missing values
  are None.
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

# Surface Dice field names and their tolerances (mm).
SURFACE_DICE_TOLERANCES_MM: tuple[tuple[str, float], ...] = (
    ("sdsc_1mm", 1.0),
    ("sdsc_2mm", 2.0),
    ("sdsc_3mm", 3.0),
)
APL_TOLERANCE_MM = 1.0
# A distance this close to a tolerance counts as equal to it (EDT rounding).
DISTANCE_ROUNDING_MM = 1e-6

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
    sdsc_1mm: float | None  # surface Dice at 1, 2, 3 mm; None only in files that predate them
    sdsc_2mm: float | None
    sdsc_3mm: float | None
    apl_mm: float | None  # added path length, total over the slices
    apl_per_slice_mm: dict[int, float] | None  # slice index -> APL mm, non-zero slices only
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
        if self.apl_per_slice_mm is not None:  # JSON object keys are strings
            data["apl_per_slice_mm"] = {str(k): v for k, v in self.apl_per_slice_mm.items()}
        return data

    @staticmethod
    def from_dict(data: dict) -> LabelMetrics:
        def opt(key):
            value = data.get(key)
            return None if value is None else float(value)

        per_slice = data.get("apl_per_slice_mm")
        return LabelMetrics(
            label=int(data["label"]),
            name=str(data["name"]),
            dsc=float(data["dsc"]),
            asd=opt("asd"),
            hd=opt("hd"),
            hd95=opt("hd95"),
            sdsc_1mm=opt("sdsc_1mm"),
            sdsc_2mm=opt("sdsc_2mm"),
            sdsc_3mm=opt("sdsc_3mm"),
            apl_mm=opt("apl_mm"),
            apl_per_slice_mm=None if per_slice is None else {int(k): float(v) for k, v in per_slice.items()},
            sen=opt("sen"),
            ppv=opt("ppv"),
            vol_pred_cc=float(data["vol_pred_cc"]),
            vol_ref_cc=float(data["vol_ref_cc"]),
            n_pred=int(data["n_pred"]),
            n_ref=int(data["n_ref"]),
            n_tp=int(data["n_tp"]),
            flags=tuple(data.get("flags") or ()),
        )


# The CSV columns: every field but the per-slice APL (JSON only).
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LabelMetrics) if f.name != "apl_per_slice_mm")


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


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and radius of the sphere fitted by least squares to ``points`` (N x 3, mm):
    |p|^2 = 2 c.p + (r^2 - |c|^2) is linear in the centre c and the constant."""
    a = np.hstack([2 * points, np.ones((len(points), 1))])
    solution, *_ = np.linalg.lstsq(a, (points ** 2).sum(axis=1), rcond=None)
    centre = solution[:3]
    return centre, float(np.sqrt(solution[3] + centre @ centre))


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


def _within(distances: np.ndarray, tolerance_mm: float) -> np.ndarray:
    return distances <= tolerance_mm + DISTANCE_ROUNDING_MM


def _surface_dice_fields(d_pr: np.ndarray, d_rp: np.ndarray) -> dict[str, float]:
    total = d_pr.size + d_rp.size
    return {
        key: float(np.count_nonzero(_within(d_pr, tol)) + np.count_nonzero(_within(d_rp, tol))) / total
        for key, tol in SURFACE_DICE_TOLERANCES_MM
    }


def surface_dice(pred_mask, ref_mask, spacing, tolerance_mm: float) -> float:
    """Surface Dice at ``tolerance_mm`` (module docstring); both empty 1.0, one empty 0.0."""
    _check_tolerance(tolerance_mm)
    pred, ref = _check_masks(pred_mask, ref_mask)
    sampling = _spacing_numpy_order(spacing, pred.ndim)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not (has_pred and has_ref):
        return 1.0 if has_pred == has_ref else 0.0
    box = _union_box(_mask_box(pred), _mask_box(ref))
    d_pr, d_rp = _surface_distances_cropped(pred[box], ref[box], sampling)
    total = d_pr.size + d_rp.size
    return float(np.count_nonzero(_within(d_pr, tolerance_mm)) + np.count_nonzero(_within(d_rp, tolerance_mm))) / total


def _check_tolerance(tolerance_mm) -> float:
    tolerance_mm = float(tolerance_mm)
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"a tolerance must be a finite distance >= 0 mm, not {tolerance_mm!r}")
    return tolerance_mm


def slice_contours(mask) -> np.ndarray:
    """The 2-D contour of every slice of a ``[z, y, x]`` mask (a 2-D mask is one slice): pixels
    with one of their 4 in-plane neighbours outside the mask (the slice border is outside)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in (2, 3):
        raise GeometryError(f"slice contours need a 2-D or 3-D mask, not {mask.ndim}-D")
    # Shifted views instead of binary_erosion: the same pixels, several times faster on large masks.
    inner = mask.copy()
    inner[..., 1:, :] &= mask[..., :-1, :]
    inner[..., :-1, :] &= mask[..., 1:, :]
    inner[..., :, 1:] &= mask[..., :, :-1]
    inner[..., :, :-1] &= mask[..., :, 1:]
    inner[..., (0, -1), :] = False
    inner[..., :, (0, -1)] = False
    return mask & ~inner


def _apl_cropped(pred, ref, sampling, tolerance_mm: float, first_slice: int):
    """(total mm, {slice: mm}) of 3-D masks cropped to (at least) their union box.

    Cropping is exact: every contour pixel of either mask lies inside the box, and
    a pixel on the box border has its outside neighbour outside both masks.
    """
    ref_contour = slice_contours(ref)
    pred_contour = slice_contours(pred)
    added = ref_contour.copy()  # a slice without a prediction contour keeps all of it
    both = ref_contour.any(axis=(1, 2)) & pred_contour.any(axis=(1, 2))
    for k in np.flatnonzero(both):
        # Both contours of slice k lie in their own 2-D box: the EDT restricted to it is exact.
        box = _mask_box(pred_contour[k] | ref_contour[k])
        # EDT: distance to the nearest zero, i.e. to the prediction's contour in this slice.
        dist = ndimage.distance_transform_edt(~pred_contour[k][box], sampling=sampling[1:])
        added[k][box] &= ~_within(dist, tolerance_mm)
    pixel_mm = (sampling[1] + sampling[2]) / 2.0
    counts = np.count_nonzero(added, axis=(1, 2))
    per_slice = {first_slice + int(k): int(counts[k]) * pixel_mm for k in np.flatnonzero(counts)}
    return int(counts.sum()) * pixel_mm, per_slice


def _apl_fields(pred, ref, sampling, tolerance_mm: float, first_slice: int) -> dict:
    if pred.ndim == 2:  # one slice
        pred, ref, sampling = pred[np.newaxis], ref[np.newaxis], (1.0,) + tuple(sampling)
    if pred.ndim != 3:
        return {"apl_mm": None, "apl_per_slice_mm": None}
    if pred.size == 0:
        return {"apl_mm": 0.0, "apl_per_slice_mm": {}}
    total, per_slice = _apl_cropped(pred, ref, sampling, tolerance_mm, first_slice)
    return {"apl_mm": total, "apl_per_slice_mm": per_slice}


def added_path_length(pred_mask, ref_mask, spacing, tolerance_mm: float = APL_TOLERANCE_MM):
    """Added path length: ``(total mm, {slice index: mm})`` (module docstring; numpy
    ``[z, y, x]`` masks, spacing in (x, y, z) mm, slices along numpy axis 0).

    Only slices with a non-zero APL are in the dict. 2-D masks are one slice (index 0).
    """
    tolerance_mm = _check_tolerance(tolerance_mm)
    pred, ref = _check_masks(pred_mask, ref_mask)
    if pred.ndim not in (2, 3):
        raise GeometryError(f"the added path length needs 2-D or 3-D masks, not {pred.ndim}-D")
    sampling = _spacing_numpy_order(spacing, pred.ndim)
    box = _union_box(_mask_box(pred), _mask_box(ref))
    if box is None:
        return 0.0, {}
    fields_ = _apl_fields(pred[box], ref[box], sampling, tolerance_mm, box[0].start if pred.ndim == 3 else 0)
    return fields_["apl_mm"], fields_["apl_per_slice_mm"]


def _metrics_from_crops(pred, ref, sampling, label: int, name: str, first_slice: int = 0,
                        apl_tolerance_mm: float = APL_TOLERANCE_MM) -> LabelMetrics:
    """Metrics of two boolean masks already cropped to (at least) their union box.

    ``first_slice`` is the index of the crop's first slice (numpy axis 0) in the image.
    """
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
    common.update(_apl_fields(pred, ref, sampling, apl_tolerance_mm, first_slice))
    if n_pred == 0 and n_ref == 0:
        return LabelMetrics(
            dsc=1.0, asd=0.0, hd=0.0, hd95=0.0, sen=1.0, ppv=1.0, flags=(FLAG_BOTH_EMPTY,),
            **{key: 1.0 for key, _ in SURFACE_DICE_TOLERANCES_MM},
            **common,
        )
    if n_pred == 0 or n_ref == 0:
        return LabelMetrics(
            dsc=0.0, asd=None, hd=None, hd95=None,
            sen=0.0 if n_pred == 0 else None, ppv=None if n_pred == 0 else 0.0,
            flags=(FLAG_PRED_EMPTY if n_pred == 0 else FLAG_REF_EMPTY,),
            **{key: 0.0 for key, _ in SURFACE_DICE_TOLERANCES_MM},
            **common,
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
        **_surface_dice_fields(d_pr, d_rp),
        **common,
    )


def mask_metrics(pred_mask, ref_mask, spacing, label: int = 1, name: str | None = None, *,
                 apl_tolerance_mm: float = APL_TOLERANCE_MM) -> LabelMetrics:
    """All metrics for two boolean masks (numpy ``[z, y, x]``, spacing in (x, y, z) mm)."""
    apl_tolerance_mm = _check_tolerance(apl_tolerance_mm)
    pred, ref = _check_masks(pred_mask, ref_mask)
    sampling = _spacing_numpy_order(spacing, pred.ndim)
    box = _union_box(_mask_box(pred), _mask_box(ref))
    first_slice = 0
    if box is not None:
        pred, ref = pred[box], ref[box]
        first_slice = box[0].start if pred.ndim == 3 else 0
    return _metrics_from_crops(pred, ref, sampling, label, label_name(label) if name is None else name,
                               first_slice, apl_tolerance_mm)


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


def evaluate_arrays(pred, ref, spacing, labels: Iterable[int] | None = None, *,
                    apl_tolerance_mm: float = APL_TOLERANCE_MM) -> list[LabelMetrics]:
    """Metrics per label for two numpy label arrays (``[z, y, x]``, spacing in (x, y, z) mm).

    ``labels`` defaults to the sorted union of the non-zero values present in either.
    ``apl_tolerance_mm`` is the in-plane tolerance of the added path length.
    """
    apl_tolerance_mm = _check_tolerance(apl_tolerance_mm)
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
        first_slice = (box[0].start or 0) if pred.ndim == 3 else 0
        results.append(_metrics_from_crops(pred[box] == value, ref[box] == value, sampling,
                                           value, label_name(value), first_slice, apl_tolerance_mm))
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


def evaluate(pred_image, ref_image, labels: Iterable[int] | None = None, *,
             apl_tolerance_mm: float = APL_TOLERANCE_MM) -> list[LabelMetrics]:
    """Metrics per label for two SimpleITK label images on the same grid.

    ``labels`` defaults to the union of the non-zero values present in either image.
    APL slices are the images' third (k) axis. Raises GeometryError when the grids differ.
    """
    check_same_grid(pred_image, ref_image)
    pred = _image_array(pred_image, "prediction")
    ref = _image_array(ref_image, "reference")
    return evaluate_arrays(pred, ref, ref_image.GetSpacing(), labels, apl_tolerance_mm=apl_tolerance_mm)


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
        data = r.to_dict()
        for key in FIELD_NAMES:
            value = data[key]
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
    """Write the results as CSV (header = :data:`FIELD_NAMES`; APL total only, not per slice)."""
    write_text(path, results_to_csv(results), overwrite=overwrite, newline="")


def read_csv(path) -> list[LabelMetrics]:
    """Read a file written by :func:`write_csv` (``apl_per_slice_mm`` is None: CSV has no per-slice values)."""
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
    ("sDSC 2mm", "sdsc_2mm", "{:.4f}"),
    ("APL mm", "apl_mm", "{:.1f}"),
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
