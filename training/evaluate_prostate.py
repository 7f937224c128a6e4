"""Evaluate a prostate model: held-out phantoms (accuracy) and the real pelvic CT (where it puts the prostate).

    python -m training.evaluate_prostate phantoms --seed 9000 --cases 20 --json out/eval_phantoms.json
    python -m training.evaluate_prostate real ../shared/data/real/pelvis_ct/example_ct.nii.gz \
        ../shared/data/real/pelvis_ct/example_seg_v1.nii.gz --picture docs/real_ct_prostate.png

Phantom seeds must be ones never used in training (the demo model trained on
1000-1039 and validated on 5000-5003). Metrics are computed on each input's own
grid, as a user would see them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore import anatomy, metrics
from segcore.errors import SegcoreError
from segcore.prostate import PROSTATE, ProstateSegmenter

METRICS = ("dsc", "asd", "hd95", "sen", "ppv")

# TotalSegmentator v1 labels of the reference map of the real pelvic CT.
TS_BLADDER, TS_FEMUR_LEFT, TS_FEMUR_RIGHT, TS_COLON = 104, 88, 89, 57


def evaluate_phantoms(segmenter: ProstateSegmenter, seed: int, cases: int, matrix: int = 512, log=print) -> dict:
    from segcore.phantom import make_phantom

    rows = []
    for n in range(cases):
        case = make_phantom(seed + n, matrix=matrix)
        tick = time.perf_counter()
        result = segmenter(case.ct)
        seconds = time.perf_counter() - tick
        ref = sitk.GetArrayViewFromImage(case.labels) == PROSTATE.value
        row = {"seed": seed + n, "size": list(case.ct.GetSize()), "spacing_mm": list(case.ct.GetSpacing()),
               "orientation": case.info["orientation"], "confidence": result.confidence, "seconds": seconds,
               "volume_cc": float(ref.sum() * np.prod(case.ct.GetSpacing()) / 1000)}
        # The prostate's metrics under their plain names, any other organ's prefixed with its name.
        for organ in segmenter.structures:
            score = metrics.mask_metrics(sitk.GetArrayViewFromImage(result.labelmap) == organ.value,
                                         sitk.GetArrayViewFromImage(case.labels) == organ.value,
                                         case.ct.GetSpacing()[::-1])
            prefix = "" if organ == PROSTATE else f"{organ.name}_"
            row.update({prefix + k: getattr(score, k) for k in METRICS})
        rows.append(row)
        others = "".join(f", {o.name} DSC {row[o.name + '_dsc']:.3f}" for o in segmenter.structures if o != PROSTATE)
        log(f"seed {seed + n}: DSC {row['dsc']:.3f} ASD {_fmt(row['asd'])} HD95 {_fmt(row['hd95'])} "
            f"confidence {row['confidence']:.2f}{others} ({seconds:.1f} s)")
    summary = {}
    keys = [k for k in rows[0] if k not in ("seed", "size", "spacing_mm", "orientation", "volume_cc")]
    for key in keys:
        values = [r[key] if r[key] is not None else float("nan") for r in rows]
        summary[key] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                        "min": float(np.min(values)), "max": float(np.max(values))}
    return {"model": segmenter.package.name, "seeds": [seed, seed + cases - 1], "matrix": matrix,
            "summary": summary, "cases": rows}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def real_ct_plausibility(prediction: sitk.Image, reference: sitk.Image) -> dict:
    """Where the predicted prostate lies relative to the reference bladder, femoral heads and colon/rectum.

    Femoral heads: the top 30 mm of each femur label. Rectum: the colon label
    (which includes the rectum) in the slices the prediction spans. LPS: x grows
    to the patient's left, y to the back, z upward. Assumes axially stored slices
    (k runs along z, either way), as the real pelvic CT is.
    """
    from segcore.image import grid_differences

    differences = grid_differences(prediction, reference)
    if differences:
        raise SegcoreError("the reference label map is not on the CT's grid: " + "; ".join(differences))
    pred = sitk.GetArrayViewFromImage(prediction) == PROSTATE.value
    ref = np.rint(sitk.GetArrayViewFromImage(reference)).astype(np.int32)
    spacing = np.asarray(prediction.GetSpacing())
    volume = float(pred.sum() * np.prod(spacing) / 1000)
    checks = {"volume_cc": volume, "volume_plausible": 10.0 <= volume <= 100.0}
    if not pred.any():
        checks["found"] = False
        return checks
    checks["found"] = True

    def centre(mask):
        k, j, i = np.nonzero(mask)
        return np.asarray(prediction.TransformContinuousIndexToPhysicalPoint(
            [float(i.mean()), float(j.mean()), float(k.mean())]))

    def z_of(k):
        return prediction.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, float(k)])[2]

    p = centre(pred)
    checks["centroid_lps_mm"] = [round(float(v), 1) for v in p]
    bladder = ref == TS_BLADDER
    b = centre(bladder)
    pk = np.nonzero(pred.any(axis=(1, 2)))[0]
    bk = np.nonzero(bladder.any(axis=(1, 2)))[0]
    checks["bladder_centroid_lps_mm"] = [round(float(v), 1) for v in b]
    lowest_prostate = min(z_of(k) for k in (pk.min(), pk.max()))
    lowest_bladder = min(z_of(k) for k in (bk.min(), bk.max()))
    checks["inferior_to_bladder"] = bool(p[2] < b[2] and lowest_prostate < lowest_bladder)
    checks["overlap_with_bladder_cc"] = float((pred & bladder).sum() * np.prod(spacing) / 1000)
    heads = []
    for label in (TS_FEMUR_LEFT, TS_FEMUR_RIGHT):
        femur = ref == label
        ks = np.nonzero(femur.any(axis=(1, 2)))[0]
        top = max(ks, key=z_of)
        keep = [k for k in ks if abs(z_of(k) - z_of(top)) <= 30.0]
        head = np.zeros_like(femur)
        head[keep] = femur[keep]
        heads.append(centre(head))
    left, right = heads
    checks["femoral_heads_x_mm"] = [round(float(left[0]), 1), round(float(right[0]), 1)]
    checks["between_femoral_heads"] = bool(min(left[0], right[0]) < p[0] < max(left[0], right[0]))
    colon = ref == TS_COLON
    band = np.zeros_like(colon)
    band[pk.min():pk.max() + 1] = colon[pk.min():pk.max() + 1]
    if band.any():
        r = centre(band)
        checks["rectum_centroid_lps_mm"] = [round(float(v), 1) for v in r]
        checks["anterior_to_rectum"] = bool(p[1] < r[1])
    else:
        checks["anterior_to_rectum"] = None   # no colon/rectum label in those slices
    checks["plausible"] = bool(checks["volume_plausible"] and checks["inferior_to_bladder"]
                               and checks["between_femoral_heads"] and checks["anterior_to_rectum"] is not False)
    return checks


def draw_real_ct(ct: sitk.Image, prediction: sitk.Image, reference: sitk.Image, path: Path) -> None:
    """Axial, coronal and sagittal slices through the predicted centroid, with the prediction and the
    reference bladder, femurs and colon outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segcore.image import canonicalize

    ct_c, _ = canonicalize(ct)
    pred_c, _ = canonicalize(prediction)
    ref_c, _ = canonicalize(sitk.Cast(reference, sitk.sitkUInt8))
    a = sitk.GetArrayFromImage(ct_c)
    p = sitk.GetArrayFromImage(pred_c) == PROSTATE.value
    r = sitk.GetArrayFromImage(ref_c)
    if p.any():
        k, j, i = (round(float(v.mean())) for v in np.nonzero(p))
    else:
        k, j, i = (n // 2 for n in a.shape)
    sz, sy, sx = ct_c.GetSpacing()[::-1]
    views = [("axial", a[k], p[k], r[k], sy / sx), ("coronal", a[:, j][::-1], p[:, j][::-1], r[:, j][::-1], sz / sx),
             ("sagittal", a[:, :, i][::-1], p[:, :, i][::-1], r[:, :, i][::-1], sz / sy)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    for ax, (title, img, pm, rm, aspect) in zip(axes, views):
        ax.imshow(np.clip(img, -160, 240), cmap="gray", aspect=aspect)
        for value, colour, name in ((TS_BLADDER, "yellow", "bladder (ref)"), (TS_FEMUR_LEFT, "cyan", "femur (ref)"),
                                    (TS_FEMUR_RIGHT, "cyan", None), (TS_COLON, "lime", "colon/rectum (ref)")):
            if (rm == value).any():
                ax.contour(rm == value, levels=[0.5], colors=colour, linewidths=0.8)
        if pm.any():
            ax.contour(pm, levels=[0.5], colors="red", linewidths=1.5)
        ax.set_title(f"{title} (red: predicted prostate)")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def record_in_package(folder: Path, out: dict) -> None:
    """Add the held-out summary to model.json."""
    record_held_out(folder, {
        "seeds": out["seeds"], "cases": len(out["cases"]), "matrix": out["matrix"],
        "metric_grid": "each case's own grid",
        **{k: {"mean": round(v["mean"], 4), "sd": round(v["sd"], 4)} for k, v in out["summary"].items()
           if k != "seconds"},
    })


def record_held_out(folder: Path, held_out: dict) -> None:
    """Write ``validation.held_out_phantoms`` into model.json (not hashed: only weights files are) and
    re-validate the package."""
    from segcore.packages import MANIFEST_NAME, ModelPackage

    path = Path(folder) / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["validation"]["held_out_phantoms"] = held_out
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    ModelPackage.load(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate_prostate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model package (default: the bundled default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write the results here")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("phantoms", help="DSC, ASD, HD95, SEN, PPV on held-out phantoms")
    p.add_argument("--seed", type=int, default=9000)
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument("--record", action="store_true",
                   help="also write the summary into the package's model.json (validation.held_out_phantoms)")
    p = sub.add_parser("real", help="location plausibility on a real CT with a TotalSegmentator v1 reference")
    p.add_argument("ct", type=Path)
    p.add_argument("reference", type=Path)
    p.add_argument("--picture", type=Path, help="also draw the result here (PNG)")
    p.add_argument("--save", type=Path, help="also save the predicted label map here")
    args = parser.parse_args(argv)
    try:
        segmenter = ProstateSegmenter(args.model, args.device)
        if args.what == "phantoms":
            out = evaluate_phantoms(segmenter, args.seed, args.cases, args.matrix)
            for key, s in out["summary"].items():
                print(f"{key:12s} {s['mean']:.3f} ± {s['sd']:.3f}  (min {s['min']:.3f}, max {s['max']:.3f})")
            if args.record:
                record_in_package(segmenter.package.path, out)
        else:
            ct = sitk.ReadImage(str(args.ct))
            reference = sitk.ReadImage(str(args.reference))
            result = segmenter(ct)
            out = {"model": segmenter.package.name, "confidence": result.confidence, "messages": result.messages,
                   **real_ct_plausibility(result.labelmap, reference)}
            if any(s.name == "bladder" for s in segmenter.structures):
                out["bladder_dsc"] = metrics.mask_metrics(
                    sitk.GetArrayViewFromImage(result.labelmap) == anatomy.structure("bladder").value,
                    np.rint(sitk.GetArrayViewFromImage(reference)) == TS_BLADDER, ct.GetSpacing()[::-1]).dsc
            print(json.dumps(out, indent=1))
            if args.picture:
                draw_real_ct(ct, result.labelmap, reference, args.picture)
            if args.save:
                sitk.WriteImage(result.labelmap, str(args.save), True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    except SegcoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
