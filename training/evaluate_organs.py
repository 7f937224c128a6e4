"""Evaluate a multi-organ model: held-out phantoms (accuracy per organ) and the real pelvic CT.

    python -m training.evaluate_organs phantoms --seed 9200 --cases 20 --record
    python -m training.evaluate_organs real ../shared/data/real/pelvis_ct/example_ct.nii.gz \\
        ../shared/data/real/pelvis_ct/example_seg_v1.nii.gz --picture docs/real_ct_organs.png

Phantoms: the full pipeline on each case's own grid, DSC, HD and HD95 per organ
against the phantom's labels; mAP50-95 of the slice detections on the canonical
slice grid (the boxes the network is trained to find).

Real CT (TotalSegmentator v1 reference): the bladder against label 104, with
its front, back and side edges' offsets from the reference's (`edge_offsets`). The
reference has whole femurs (88 left, 89 right) but no femoral heads, so each
femoral head is compared with the part of its femur that lies inside a sphere
fitted (least squares) to the head's articular surface: the femur's surface
voxels within 4 mm of the same side's hip bone (90 left, 91 right), which is
where the head sits in the acetabulum. The sphere is grown by half a voxel, as
surface voxels' centres lie that far inside the bone. DSC and HD95 of our
femoral head against that part. (Until 2026-12-07 the sphere was fitted to the
femur's top 30 mm, which takes in the greater trochanter where it rises that
high: on phantoms, whose heads are known, that recovered the head at DSC
0.79-0.93, the articular fit at 0.97-1.00.) On the real CT the femur labels stop
short of the heads' domes, which pulls that sphere low, so each head is also
compared with balls fitted to the joint space seen in the CT itself
(`joint_space_sphere`), from several first guesses, as min / median / max.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore import anatomy, metrics
from segcore.errors import SegcoreError
from segcore.files import atomic_output
from segcore.organs import OrganSegmenter

from .evaluation import (
    TS_BLADDER,
    TS_COLON,
    TS_FEMUR_LEFT,
    TS_FEMUR_RIGHT,
    TS_HIP_LEFT,
    TS_HIP_RIGHT,
    evaluation_parser,
    held_out_phantoms,
    mean_sd,
    phantom_scores,
    record_in_package,
    rounded_mean_sd,
    run_command,
    write_results,
)

ORGAN_METRICS = ("dsc", "hd", "hd95")


def evaluate_phantoms(segmenter: OrganSegmenter, seed: int, cases: int, matrix: int = 512, log=print) -> dict:
    import torch

    from training.train_hmrnet import DEFAULTS, canonical_arrays, detection_map, make_batch

    rows = []
    found_all, truth_all = [], []
    config = {**DEFAULTS, "arguments": {"points": segmenter.network.points}}
    for case_seed, case, result, seconds in held_out_phantoms(segmenter, seed, cases, matrix):
        ref = sitk.GetArrayViewFromImage(case.labels)
        row = {"seed": case_seed, "seconds": seconds, "confidence": result.confidence}
        for structure in segmenter.organs:
            if (ref == structure.value).any():
                row[structure.name] = phantom_scores(result, case, structure.value, ORGAN_METRICS)
        rows.append(row)
        log(f"seed {case_seed}: " + ", ".join(
            f"{s.name} {row[s.name]['dsc']:.3f}" for s in segmenter.organs if s.name in row) + f" ({seconds:.1f} s)")
        # Slice detections on the canonical grid, for mAP.
        prepared = canonical_arrays(case.ct, case.labels, segmenter.settings, DEFAULTS["canvas_margin"])
        rng = np.random.default_rng(0)
        for start in range(0, prepared["ct"].shape[0], 8):
            picks = [(0, k) for k in range(start, min(prepared["ct"].shape[0], start + 8))]
            x, targets = make_batch([prepared], picks, config, segmenter.settings, rng, None, train=False)
            with torch.inference_mode():
                found_all += segmenter.network(x.to(segmenter.device))
            truth_all += targets
    summary = {}
    for structure in segmenter.organs:
        for key in ORGAN_METRICS:
            values = [r[structure.name][key] for r in rows if structure.name in r]
            values = [v if v is not None else float("nan") for v in values]
            if values:
                summary.setdefault(structure.name, {})[key] = mean_sd(values)
    per_class = {}
    for index, name in enumerate(segmenter.settings.organ_classes, start=1):
        only = [type(d)(d.boxes[d.labels == index], d.labels[d.labels == index], d.scores[d.labels == index],
                        d.points[d.labels == index]) for d in found_all]
        truth = [{k: v[t["labels"] == index] for k, v in t.items()} for t in truth_all]
        per_class[name] = detection_map(only, truth, len(segmenter.settings.organ_classes))
    for name, value in per_class.items():
        summary.setdefault(name, {})["map50_95"] = value
    seconds = [r["seconds"] for r in rows]
    return {"model": segmenter.package.name, "seeds": [seed, seed + cases - 1], "matrix": matrix,
            "summary": summary, "seconds": {"mean": float(np.mean(seconds)), "max": float(np.max(seconds))},
            "cases": rows}


# How close (mm) the femur's surface comes to the hip bone where it is the head's articular surface.
JOINT_MM = 4.0


def femoral_head_reference(femur: np.ndarray, hip_bone: np.ndarray, spacing_zyx,
                           joint_mm: float = JOINT_MM) -> np.ndarray:
    """The femoral-head part of a femur mask (z, y, x): femur voxels inside the sphere fitted to the femur's
    surface voxels within ``joint_mm`` of ``hip_bone`` (the head's articular surface in the acetabulum, whose
    joint space is a few millimetres), grown by half a voxel."""
    if not femur.any():
        return femur
    return head_in_sphere(femur, label_head_sphere(femur, hip_bone, spacing_zyx, joint_mm), spacing_zyx)


def head_in_sphere(femur: np.ndarray, sphere: tuple[np.ndarray, float], spacing_zyx) -> np.ndarray:
    """Femur voxels inside `sphere` (centre, radius mm) grown by half a voxel, as surface voxels' centres lie
    that far inside the bone."""
    centre, radius = sphere
    return femur & sphere_mask(femur.shape, spacing_zyx, centre, radius + 0.5 * float(np.mean(spacing_zyx)))


def label_head_sphere(femur: np.ndarray, hip_bone: np.ndarray, spacing_zyx,
                      joint_mm: float = JOINT_MM) -> tuple[np.ndarray, float]:
    """Centre (z, y, x mm) and radius of the sphere fitted to the femur's surface voxels within ``joint_mm``
    of ``hip_bone``."""
    from scipy import ndimage

    spacing = np.asarray(spacing_zyx, float)
    surface = femur & ~ndimage.binary_erosion(femur)
    near_hip = ndimage.distance_transform_edt(~hip_bone, sampling=spacing) <= joint_mm
    points = np.argwhere(surface & near_hip) * spacing
    if len(points) < 10:
        raise SegcoreError("the reference's femur label does not meet its hip bone label, so its femoral head "
                           "cannot be found: give a TotalSegmentator v1 label map (femurs 88/89, hip bones 90/91)")
    return metrics.fit_sphere(points)


# The joint-space fit: rays from the head's centre out to RAY_MM; a joint-space point is a ray's first dip
# with bone (above BONE_HU and JOINT_CONTRAST over the dip) within 4 mm on both sides: the head inside, the
# acetabulum outside. Rays that leave the head into muscle or fat find no such point.
RAY_MM = (8.0, 36.0)
BONE_HU, JOINT_CONTRAST = 150.0, 60.0
# Half the hip's joint space (two layers of cartilage, about 2 mm each, at the dome): the head's surface lies
# this far inside the middle of the joint space that the fit finds.
HALF_JOINT_SPACE_MM = 1.5


def joint_space_sphere(ct: np.ndarray, spacing_zyx, start_mm, rounds: int = 6) -> tuple[np.ndarray, float, int]:
    """Centre (z, y, x mm), radius and point count of the sphere through the hip's joint space seen in the
    CT array `ct` (HU), found from `start_mm`, a first guess within about 10 mm. Independent of any label:
    on the real CT the TotalSegmentator femur label stops short of the head's dome (its top slices are
    labelled hip bone), which pulls the label-based sphere down. Each round casts rays from the current
    centre, keeps the joint-space points, fits a sphere (`metrics.fit_sphere`) to them and refits to the 80 %
    that lie closest to it (the acetabular fossa's fat gives some points off the joint)."""
    from scipy import ndimage

    spacing = np.asarray(spacing_zyx, float)
    smooth = ndimage.gaussian_filter(np.asarray(ct, np.float32), 0.5)
    k = np.arange(2000) + 0.5                               # Fibonacci directions, evenly over the sphere
    polar, turn = np.arccos(1 - 2 * k / k.size), np.pi * (1 + 5 ** 0.5) * k
    directions = np.stack([np.cos(polar), np.sin(polar) * np.sin(turn), np.sin(polar) * np.cos(turn)], 1)
    radii = np.arange(*RAY_MM, 0.5)
    side = 8                                                # samples in 4 mm
    centre = np.asarray(start_mm, float)
    for _ in range(rounds):
        rays = centre + directions[:, None, :] * radii[None, :, None]
        hu = ndimage.map_coordinates(smooth, (rays / spacing).reshape(-1, 3).T, order=1, mode="nearest")
        hu = hu.reshape(len(directions), len(radii))
        points = np.array([centre + direction * radii[j] for direction, ray in zip(directions, hu)
                           if (j := _first_gap(ray, side)) is not None]).reshape(-1, 3)
        if len(points) < 20:
            raise SegcoreError("too few points of the hip's joint space were found round the femoral head: "
                               "give a CT (HU) whose femoral head lies in its acetabulum")
        centre, radius = metrics.fit_sphere(points)
        off = np.abs(np.linalg.norm(points - centre, axis=1) - radius)
        centre, radius = metrics.fit_sphere(points[off <= np.percentile(off, 80)])
    return centre, radius, len(points)


def _first_gap(ray: np.ndarray, side: int) -> int | None:
    """Index of the first dip along `ray` (HU, outwards) with bone on both sides within `side` samples,
    JOINT_CONTRAST above the dip: the joint space, not the fossa's fat or the pelvis's beyond the acetabulum.
    No absolute HU for the dip: at 3 mm slices the joint space's partial volume leaves it at 150-250 HU."""
    in_bone = False
    for j in range(side, len(ray) - side):
        before = ray[j - side:j].max()
        if in_bone and before < BONE_HU:        # the ray has left the head's bone without crossing a joint
            return None
        in_bone |= bool(before >= BONE_HU)
        if ray[j] <= ray[j - 1:j + 2].min() and min(before, ray[j + 1:j + side + 1].max()) > ray[j] + JOINT_CONTRAST:
            return j
    return None


def sphere_mask(shape, spacing_zyx, centre_mm, radius_mm: float) -> np.ndarray:
    zz, yy, xx = np.indices(shape, sparse=True)
    spacing = np.asarray(spacing_zyx, float)
    return ((zz * spacing[0] - centre_mm[0]) ** 2 + (yy * spacing[1] - centre_mm[1]) ** 2
            + (xx * spacing[2] - centre_mm[2]) ** 2) <= radius_mm ** 2


def centroid_mm(mask: np.ndarray, spacing_zyx) -> np.ndarray | None:
    return np.argwhere(mask).mean(axis=0) * np.asarray(spacing_zyx, float) if mask.any() else None


def evaluate_real(segmenter: OrganSegmenter, ct: sitk.Image, reference: sitk.Image) -> tuple[dict, sitk.Image]:
    from segcore.image import canonicalize

    result = segmenter(ct)
    pred_c, _ = canonicalize(result.labelmap)
    ref_c, _ = canonicalize(sitk.Cast(reference, sitk.sitkUInt8))
    pred, ref = sitk.GetArrayFromImage(pred_c), sitk.GetArrayFromImage(ref_c)
    spacing = pred_c.GetSpacing()[::-1]
    out = {"model": segmenter.package.name, "confidence": result.confidence, "messages": result.messages,
           "seconds": result.timings.get("total"), "organs": {}}
    bladder = ref == TS_BLADDER
    pairs = [("bladder", bladder, "TotalSegmentator label 104 (urinary bladder)")]
    spheres = {}
    for name, femur, hip in (("femoral_head_left", TS_FEMUR_LEFT, TS_HIP_LEFT),
                             ("femoral_head_right", TS_FEMUR_RIGHT, TS_HIP_RIGHT)):
        how = (f"femoral-head part of TotalSegmentator label {femur}: inside the sphere fitted to its surface "
               f"within {JOINT_MM:g} mm of hip bone label {hip}")
        spheres[name] = label_head_sphere(ref == femur, ref == hip, spacing)
        pairs.append((name, head_in_sphere(ref == femur, spheres[name], spacing), how))
    for name, reference_mask, how in pairs:
        value = anatomy.structure(name).value
        score = metrics.mask_metrics(pred == value, reference_mask, spacing)
        out["organs"][name] = {"dsc": score.dsc, "hd95": score.hd95, "reference": how,
                               "predicted_cc": float((pred == value).sum() * np.prod(spacing) / 1000),
                               "reference_cc": float(reference_mask.sum() * np.prod(spacing) / 1000)}
    out["organs"]["bladder"]["edges_mm"] = edge_offsets(pred == anatomy.structure("bladder").value, bladder, spacing)
    out["organs"]["rectum"] = rectum_in_colon(pred == anatomy.structure("rectum").value, ref == TS_COLON, spacing)
    image = sitk.GetArrayFromImage(canonicalize(ct)[0])
    out["femoral_heads_from_joint_space"] = {
        name: head_against_joint_space(pred == anatomy.structure(name).value, image, spacing, centre)
        for name, (centre, _) in spheres.items()}
    return out, result.labelmap


# First guesses for the joint-space fit, mm (z up, y back, x left) from the label-based sphere's centre: on
# the real CT the fit lands within about 10 mm of where it starts, so its spread over these is reported.
JOINT_SPACE_STARTS = ((0, 0, 0), (-5, 0, 0), (5, 0, 0), (10, 0, 0), (5, 5, 5), (0, -8, 8), (0, 5, -5))


def head_against_joint_space(predicted: np.ndarray, image: np.ndarray, spacing_zyx, label_centre) -> dict:
    """A second reference for one femoral head, from the CT itself: the ball inside the sphere through the
    joint space (`joint_space_sphere`), less half the joint space, fitted from each of JOINT_SPACE_STARTS
    round the label-based sphere's centre (`label_centre`, from `label_head_sphere`). DSC against each ball
    (min, median, max; the ball of the median DSC is given whole) and the centres' height above the
    label-based sphere's, mm, so that both references and the prediction can be compared. Centres (z, y, x) mm on the canonical grid, from its first voxel."""
    spacing = np.asarray(spacing_zyx, float)
    fits = []
    for offset in JOINT_SPACE_STARTS:
        try:
            centre, radius, _ = joint_space_sphere(image, spacing, label_centre + offset)
        except SegcoreError:
            continue
        radius -= HALF_JOINT_SPACE_MM
        ball = sphere_mask(image.shape, spacing, centre, radius)
        fits.append((metrics.mask_metrics(predicted, ball, spacing).dsc, centre, radius))
    if not fits:
        return {"dsc": None, "fits": 0}
    fits.sort(key=lambda fit: fit[0])
    dsc, radius = np.array([fit[0] for fit in fits]), np.array([fit[2] for fit in fits])
    above = np.array([fit[1][0] - label_centre[0] for fit in fits])
    found = centroid_mm(predicted, spacing)
    median_centre, median_radius = fits[len(fits) // 2][1:]
    return {"dsc": _spread(dsc, 3), "centre_above_label_sphere_mm": _spread(above, 1),
            "radius_mm": _spread(radius, 1), "fits": len(fits),
            "median_ball": {"centre_mm": [round(float(v), 1) for v in median_centre],
                            "radius_mm": round(float(median_radius), 1)},
            "predicted_above_label_sphere_mm": None if found is None else round(float(found[0] - label_centre[0]), 1),
            "reference": f"balls inside the spheres fitted to the hip's joint space in the CT from {len(fits)} "
                         f"starts, less {HALF_JOINT_SPACE_MM:g} mm"}


def _spread(values: np.ndarray, digits: int) -> dict:
    return {key: round(float(f(values)), digits) for key, f in (("min", np.min), ("median", np.median), ("max", np.max))}


def rectum_in_colon(rectum: np.ndarray, colon: np.ndarray, spacing_zyx, tolerance_mm: float = 3.0) -> dict:
    """The predicted rectum against the reference colon label (which holds the rectum): the fraction of its
    volume inside the colon label's pelvic part (the colon below the bladder's top is not separable here,
    so the part in the rectum's own slices), grown by `tolerance_mm` for the outline's partial volume."""
    from scipy import ndimage

    out = {"reference": f"colon label {TS_COLON} in the predicted rectum's slices, grown by {tolerance_mm:g} mm",
           "predicted_cc": float(rectum.sum() * np.prod(spacing_zyx) / 1000)}
    if not rectum.any():
        return {**out, "inside_colon_fraction": None}
    slices = np.nonzero(rectum.any(axis=(1, 2)))[0]
    pelvic = np.zeros_like(colon)
    pelvic[slices.min():slices.max() + 1] = colon[slices.min():slices.max() + 1]
    grown = ndimage.distance_transform_edt(~pelvic, sampling=spacing_zyx) <= tolerance_mm
    return {**out, "inside_colon_fraction": float((rectum & grown).sum() / rectum.sum())}


def edge_offsets(predicted: np.ndarray, reference: np.ndarray, spacing_zyx) -> dict | None:
    """Where a predicted organ's outline lies against the reference's, which DSC alone does not say: the
    signed distances (mm, + = the predicted edge outside the reference's) of its front, back, right and left
    edges, each the median over the slices both masks hold, read along each slice's column (front, back) and
    row (right, left) through the reference's centroid. Masks are on the canonical grid (y back, x left)."""
    spacing = np.asarray(spacing_zyx, float)
    rows = []
    for z in np.nonzero(reference.any(axis=(1, 2)) & predicted.any(axis=(1, 2)))[0]:
        cy, cx = np.round(np.argwhere(reference[z]).mean(axis=0)).astype(int)
        ref_col, pred_col = np.nonzero(reference[z][:, cx])[0], np.nonzero(predicted[z][:, cx])[0]
        ref_row, pred_row = np.nonzero(reference[z][cy])[0], np.nonzero(predicted[z][cy])[0]
        if min(map(len, (ref_col, pred_col, ref_row, pred_row))):
            rows.append([(ref_col.min() - pred_col.min()) * spacing[1], (pred_col.max() - ref_col.max()) * spacing[1],
                         (ref_row.min() - pred_row.min()) * spacing[2], (pred_row.max() - ref_row.max()) * spacing[2]])
    if not rows:
        return None
    medians = np.round(np.median(rows, axis=0), 1).tolist()
    return {**dict(zip(("front", "back", "right", "left"), medians)), "slices": len(rows)}


def draw_real_ct(ct: sitk.Image, prediction: sitk.Image, reference: sitk.Image, path: Path,
                 heads: dict | None = None) -> None:
    """A coronal slice through the femoral heads and an axial slice through the bladder: predicted organs
    filled, the reference bladder and femurs outlined, and in the coronal slice each head's ball of the
    median DSC from the joint space (`heads`, `evaluate_real`'s "femoral_heads_from_joint_space")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    from segcore.image import canonicalize

    ct_c = canonicalize(ct)[0]
    a, spacing = sitk.GetArrayFromImage(ct_c), ct_c.GetSpacing()
    p = sitk.GetArrayFromImage(canonicalize(prediction)[0])
    r = sitk.GetArrayFromImage(canonicalize(sitk.Cast(reference, sitk.sitkUInt8))[0])
    head_values = [anatomy.structure(f"femoral_head_{side}").value for side in ("left", "right")]
    in_heads = np.isin(p, head_values)
    j = int(np.nonzero(in_heads)[1].mean()) if in_heads.any() else a.shape[1] // 2
    bladder = p == anatomy.structure("bladder").value
    k = int(np.nonzero(bladder)[0].mean()) if bladder.any() else a.shape[0] // 2
    views = [("coronal", a[:, j][::-1], p[:, j][::-1], r[:, j][::-1], spacing[2] / spacing[0]),
             ("axial", a[k], p[k], r[k], spacing[1] / spacing[0])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for ax, (title, img, pm, rm, aspect) in zip(axes, views):
        ax.imshow(np.clip(img, -160, 240), cmap="gray", aspect=aspect)
        overlay = np.zeros(pm.shape + (4,))
        for structure in anatomy.STRUCTURES[:6]:
            overlay[pm == structure.value] = [*(c / 255 for c in structure.color), 0.45]
        ax.imshow(overlay, aspect=aspect)
        for value, colour in ((TS_BLADDER, "yellow"), (TS_FEMUR_LEFT, "cyan"), (TS_FEMUR_RIGHT, "cyan")):
            if (rm == value).any():
                ax.contour(rm == value, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"{title}: predicted organs filled; reference bladder (yellow) and femurs (cyan)", fontsize=9)
        ax.axis("off")
    for fit in (heads or {}).values():
        if not fit.get("median_ball"):
            continue
        (cz, cy, cx), radius = fit["median_ball"]["centre_mm"], fit["median_ball"]["radius_mm"]
        across = radius ** 2 - (j * spacing[1] - cy) ** 2         # the ball's circle in this coronal plane
        if across > 0:
            axes[0].add_patch(Ellipse((cx / spacing[0], a.shape[0] - 1 - cz / spacing[2]), 2 * np.sqrt(across) / spacing[0],
                                      2 * np.sqrt(across) / spacing[2], fill=False, color="magenta", lw=0.9, ls="--"))
    if heads:
        axes[0].set_xlabel("dashed magenta: femoral head from the CT's joint space (median fit)", fontsize=9)
        axes[0].axis("on")
        axes[0].set_xticks([])
        axes[0].set_yticks([])
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def record_organs_in_package(folder: Path, out: dict) -> None:
    """Add the held-out summary to model.json."""
    record_in_package(folder, out, "each case's own grid (mAP: slice detections on the canonical slice grid)", {
        "organs": {name: {k: rounded_mean_sd(v) if isinstance(v, dict) else round(v, 4) for k, v in values.items()}
                   for name, values in out["summary"].items()},
    })


def main(argv=None) -> int:
    parser, _, _ = evaluation_parser(
        "python -m training.evaluate_organs", __doc__.split("\n")[0], 9200,
        "DSC, HD, HD95 and mAP50-95 per organ on held-out phantoms",
        "bladder and femoral heads on a real CT with a TotalSegmentator v1 reference")
    args = parser.parse_args(argv)
    return run_command(lambda: evaluate(args))


def evaluate(args) -> int:
    segmenter = OrganSegmenter(args.model, args.device)
    if args.what == "phantoms":
        out = evaluate_phantoms(segmenter, args.seed, args.cases, args.matrix)
        for name, values in out["summary"].items():
            print(f"{name:20s} " + "  ".join(
                f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" if isinstance(v, dict) else f"{k} {v:.3f}"
                for k, v in values.items()))
        print(f"seconds per case: mean {out['seconds']['mean']:.1f}, max {out['seconds']['max']:.1f}")
        if args.record:
            record_organs_in_package(segmenter.package.path, out)
    else:
        ct = sitk.ReadImage(str(args.ct))
        reference = sitk.ReadImage(str(args.reference))
        out, labelmap = evaluate_real(segmenter, ct, reference)
        print(json.dumps(out, indent=1))
        if args.picture:
            draw_real_ct(ct, labelmap, reference, args.picture, out["femoral_heads_from_joint_space"])
    write_results(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
