"""Evaluate a prostate model: held-out phantoms (accuracy) and the real pelvic CT (where it puts the prostate).

    python -m training.evaluate_prostate --json out/eval_phantoms.json phantoms --seed 9000 --cases 20
    python -m training.evaluate_prostate real ../shared/data/real/pelvis_ct/example_ct.nii.gz \
        ../shared/data/real/pelvis_ct/example_seg_v1.nii.gz --picture docs/real_ct_prostate.png
    python -m training.evaluate_prostate agree ../shared/data/real/pelvis_ct/example_ct.nii.gz \
        ../shared/data/real/pelvis_ct/example_seg_v1.nii.gz --picture docs/real_ct_prostate_agreement.png

Phantom seeds must be ones never used in training (the demo model trained on
1000-1039 and validated on 5000-5003). Metrics are computed on each input's own
grid, as a user would see them.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore import anatomy, metrics
from segcore.errors import SegcoreError
from segcore.files import atomic_output
from segcore.prostate import PROSTATE, ProstateSegmenter

from .evaluation import (
    TS_BLADDER,
    TS_COLON,
    TS_FEMUR_LEFT,
    TS_FEMUR_RIGHT,
    evaluation_parser,
    held_out_phantoms,
    mean_sd,
    phantom_scores,
    record_in_package,
    rounded_mean_sd,
    run_command,
    write_results,
)

METRICS = ("dsc", "asd", "hd95", "sen", "ppv")
PROSTATE_DEMOS = ("prostate-metricunet-demo", "prostate-hfunet-demo", "prostate-hmedn-demo")


def evaluate_phantoms(segmenter: ProstateSegmenter, seed: int, cases: int, matrix: int = 512, log=print) -> dict:
    rows = []
    for case_seed, case, result, seconds in held_out_phantoms(segmenter, seed, cases, matrix):
        ref = sitk.GetArrayViewFromImage(case.labels) == PROSTATE.value
        row = {"seed": case_seed, "size": list(case.ct.GetSize()), "spacing_mm": list(case.ct.GetSpacing()),
               "orientation": case.info["orientation"], "confidence": result.confidence, "seconds": seconds,
               "volume_cc": float(ref.sum() * np.prod(case.ct.GetSpacing()) / 1000)}
        # The prostate's metrics under their plain names, any other organ's prefixed with its name.
        for organ in segmenter.structures:
            prefix = "" if organ == PROSTATE else f"{organ.name}_"
            row.update({prefix + k: v for k, v in phantom_scores(result, case, organ.value, METRICS).items()})
        rows.append(row)
        others = "".join(f", {o.name} DSC {row[o.name + '_dsc']:.3f}" for o in segmenter.structures if o != PROSTATE)
        log(f"seed {case_seed}: DSC {row['dsc']:.3f} ASD {_fmt(row['asd'])} HD95 {_fmt(row['hd95'])} "
            f"confidence {row['confidence']:.2f}{others} ({seconds:.1f} s)")
    summary = {}
    keys = [k for k in rows[0] if k not in ("seed", "size", "spacing_mm", "orientation", "volume_cc")]
    for key in keys:
        values = [r[key] if r[key] is not None else float("nan") for r in rows]
        summary[key] = {**mean_sd(values), "min": float(np.min(values)), "max": float(np.max(values))}
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


def draw_real_ct(ct: sitk.Image, predictions: dict[str, sitk.Image], reference: sitk.Image, path: Path) -> None:
    """Axial, coronal and sagittal slices through the predicted prostates' common centroid, with each
    model's prostate (a colour each) and the reference bladder, femurs and colon outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segcore.image import canonicalize

    ct_c, _ = canonicalize(ct)
    a = sitk.GetArrayFromImage(ct_c)
    r = sitk.GetArrayFromImage(canonicalize(sitk.Cast(reference, sitk.sitkUInt8))[0])
    masks = {name: sitk.GetArrayFromImage(canonicalize(image)[0]) == PROSTATE.value
             for name, image in predictions.items()}
    union = np.any(list(masks.values()), axis=0)
    if union.any():
        k, j, i = (round(float(v.mean())) for v in np.nonzero(union))
    else:
        k, j, i = (n // 2 for n in a.shape)
    sz, sy, sx = ct_c.GetSpacing()[::-1]
    cuts = [("axial", lambda v: v[k], sy / sx), ("coronal", lambda v: v[:, j][::-1], sz / sx),
            ("sagittal", lambda v: v[:, :, i][::-1], sz / sy)]
    colours = ("red", "magenta", "orange", "deepskyblue")
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    for ax, (title, cut, aspect) in zip(axes, cuts):
        ax.imshow(np.clip(cut(a), -160, 240), cmap="gray", aspect=aspect)
        for value, colour in ((TS_BLADDER, "yellow"), (TS_FEMUR_LEFT, "cyan"), (TS_FEMUR_RIGHT, "cyan"),
                              (TS_COLON, "lime")):
            if (cut(r) == value).any():
                ax.contour(cut(r) == value, levels=[0.5], colors=colour, linewidths=0.8)
        for (name, mask), colour in zip(masks.items(), colours):
            if cut(mask).any():
                ax.contour(cut(mask), levels=[0.5], colors=colour, linewidths=1.5)
        ax.set_title(title)
        ax.axis("off")
    names = ", ".join(f"{name} {colour}" for name, colour in zip(masks, colours))
    fig.suptitle(f"predicted prostate: {names}; reference: bladder yellow, femurs cyan, colon/rectum green",
                 fontsize=9)
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def pairwise_dsc(labelmaps: dict[str, sitk.Image]) -> dict[str, float]:
    """The DSC of each pair of predicted prostates (all on one grid), keyed "a / b". Two empty
    predictions agree on nothing being there, which is no agreement on a prostate: DSC 0 (where
    mask_metrics, comparing with a reference, says 1)."""
    masks = {name: sitk.GetArrayViewFromImage(image) == PROSTATE.value for name, image in labelmaps.items()}
    spacing = next(iter(labelmaps.values())).GetSpacing() if labelmaps else None
    return {f"{a} / {b}": metrics.mask_metrics(masks[a], masks[b], spacing).dsc if masks[a].any() or masks[b].any()
            else 0.0 for a, b in itertools.combinations(masks, 2)}


def agreement(ct: sitk.Image, reference: sitk.Image, models: list[str], device: str, log=print) -> tuple[dict, dict]:
    """Each model's prostate on one CT (confidence, volume, plausibility) and how far the models agree
    with each other; also the label maps, by model."""
    rows, labelmaps = {}, {}
    for name in models:
        result = ProstateSegmenter(name, device)(ct)
        labelmaps[name] = result.labelmap
        checks = real_ct_plausibility(result.labelmap, reference)
        rows[name] = {"confidence": result.confidence, "volume_cc": checks["volume_cc"],
                      "plausible": checks.get("plausible", False), "centroid_lps_mm": checks.get("centroid_lps_mm")}
        failed = [key for key, value in checks.items() if value is False and key != "plausible"]
        log(f"{name}: {checks['volume_cc']:.1f} cc, confidence {result.confidence:.2f}, "
            + ("plausible" if rows[name]["plausible"] else "not plausible: " + ", ".join(failed)))
    pairs = pairwise_dsc(labelmaps)
    for pair, dsc in pairs.items():
        log(f"DSC {pair}: {dsc:.3f}")
    out = {"models": rows, "pairwise_dsc": pairs,
           "min_pairwise_dsc": min(pairs.values()) if pairs else None,
           "min_confidence": min(r["confidence"] for r in rows.values())}
    return out, labelmaps


def record_prostate_in_package(folder: Path, out: dict) -> None:
    """Add the held-out summary to model.json."""
    record_in_package(folder, out, "each case's own grid",
                      {k: rounded_mean_sd(v) for k, v in out["summary"].items() if k != "seconds"})


def main(argv=None) -> int:
    parser, real, commands = evaluation_parser(
        "python -m training.evaluate_prostate", __doc__.split("\n")[0], 9000,
        "DSC, ASD, HD95, SEN, PPV on held-out phantoms",
        "location plausibility on a real CT with a TotalSegmentator v1 reference")
    real.add_argument("--save", type=Path, help="also save the predicted label map here")
    agree = commands.add_parser(
        "agree", help="several models on one real CT: each one's confidence, volume and plausibility, "
                      "and the pairwise DSC of their prostates")
    agree.add_argument("ct", type=Path)
    agree.add_argument("reference", type=Path, help="its TotalSegmentator v1 label map (for the plausibility)")
    agree.add_argument("--models", nargs="+", default=list(PROSTATE_DEMOS), metavar="MODEL",
                       help="model packages (default: the three bundled prostate models)")
    agree.add_argument("--picture", type=Path, help="also draw every model's prostate here (PNG)")
    args = parser.parse_args(argv)
    return run_command(lambda: evaluate(args))


def evaluate(args) -> int:
    if args.what == "agree":
        ct, reference = sitk.ReadImage(str(args.ct)), sitk.ReadImage(str(args.reference))
        out, labelmaps = agreement(ct, reference, args.models, args.device)
        if args.picture:
            draw_real_ct(ct, labelmaps, reference, args.picture)
        write_results(args.json, out)
        return 0
    segmenter = ProstateSegmenter(args.model, args.device)
    if args.what == "phantoms":
        out = evaluate_phantoms(segmenter, args.seed, args.cases, args.matrix)
        for key, s in out["summary"].items():
            print(f"{key:12s} {s['mean']:.3f} ± {s['sd']:.3f}  (min {s['min']:.3f}, max {s['max']:.3f})")
        if args.record:
            record_prostate_in_package(segmenter.package.path, out)
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
            draw_real_ct(ct, {segmenter.package.name: result.labelmap}, reference, args.picture)
        if args.save:
            with atomic_output(args.save, overwrite=True) as tmp:
                sitk.WriteImage(result.labelmap, str(tmp), True)
    write_results(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
