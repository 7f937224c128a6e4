"""Benchmark: guided correction (segcore.refine), clicks to accuracy and latency per click, with a simulated user.

    python bench/bench_refine.py --json out/bench_refine.json
    python bench/bench_refine.py --cases 1 --max-clicks 3 --matrix 256     # a quick smoke run

On the held-out phantoms (seeds 9200-9219, ``make_phantom(seed, matrix=512)``, as the
bundled models' own evaluation), for each structure (the six targets) and each start:

* ``demo``: the label map of the bundled multi-organ model (``OrganSegmenter``,
  organs-hmrnet-demo), all six organs in it; and ``demo-prostate``: the label map of the
  default prostate model (``ProstateSegmenter``, prostate-metricunet-demo), for the prostate;
* ``poor``: the phantom's six organs, with this structure replaced by a deliberately poor
  mask (``training.clicks.poor_mask``: the truth shifted 5 mm in a random direction,
  seeded per case and structure, and eroded 2 mm; it overwrites what it covers).

The simulated user (``training.clicks.next_click``, the deepest point of the largest error
region, on the CT's own grid) clicks ``--max-clicks`` times; each click's voxel becomes an
LPS point, and every refinement gets all the points so far on the previous result's label
map, as the Slicer module does, through one loaded ``segcore.refinement.Refiner``. The
label map holds the other structures too, and every call is checked (cheaply: only the
voxels that changed) for voxels of other labels that changed. Reported per structure and
start: the mean DSC after 0, 1, 3 and 5 clicks; NoC@0.95, the clicks to DSC >= 0.95
(``--max-clicks`` when never reached) and how many reached it; the share of clicks after
which the DSC went down and the mean change per click; over all clicks, the wall time of
the refiner call (median, p95) and the refiner's own timings. Structures missing from the
start (or from a phantom) count too: the first include click creates them.

The results (per case and the summary) are written to ``--json`` after every case, so an
interrupted run continues with ``--resume``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # training/ (the simulated user) when run as `python bench/bench_refine.py`

STRUCTURES = ("prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right", "seminal_vesicles")
STARTS = ("demo", "poor")
NOC_DSC = 0.95
REPORTED_CLICKS = (0, 1, 3, 5)
DEFAULT_JSON = Path(tempfile.gettempdir()) / "prostateseg-bench" / "bench_refine.json"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- one case


def run_clicks(refiner, ct, start_labels, truth, value: int, max_clicks: int) -> dict:
    """One structure refined from one start label map by up to ``max_clicks`` simulated clicks."""
    import numpy as np
    import SimpleITK as sitk

    from segcore.errors import SegcoreError
    from segcore.postprocess import bounding_box
    from training.clicks import INCLUDE, dice, next_click

    spacing_zyx = tuple(float(s) for s in ct.GetSpacing()[::-1])
    labels = start_labels
    labelmap = sitk.GetImageFromArray(labels)
    labelmap.CopyInformation(ct)

    def score(mask):
        box = bounding_box(mask | truth)
        return 1.0 if box is None else dice(mask[box], truth[box])

    mask = labels == value
    after = [score(mask)]
    include, exclude, clicks, stopped = [], [], [], None
    for _ in range(max_clicks):
        # The user clicks where refine may act: not on a voxel another label holds (refine refuses that).
        reachable = truth & ((labels == 0) | (labels == value))
        box = bounding_box(mask | reachable)
        click = None if box is None else next_click(mask[box], reachable[box], spacing_zyx)
        if click is None:
            stopped = "perfect"
            break
        (z, y, x), kind = click
        z, y, x = z + box[0].start, y + box[1].start, x + box[2].start
        point = tuple(float(v) for v in ct.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))
        (include if kind == INCLUDE else exclude).append(point)
        tick = time.perf_counter()
        try:
            result = refiner(ct, labelmap, include, exclude, value)
        except SegcoreError as error:
            (include if kind == INCLUDE else exclude).pop()  # as the Slicer module removes a refused point
            stopped = f"refused: {error}"
            break
        seconds = time.perf_counter() - tick
        new = sitk.GetArrayFromImage(result.labelmap)
        changed = np.nonzero(new != labels)
        before_v, after_v = labels[changed], new[changed]
        ours = ((before_v == 0) | (before_v == value)) & ((after_v == 0) | (after_v == value))
        violations = int((~ours).sum())
        labels, labelmap, mask = new, result.labelmap, new == value
        after.append(score(mask))
        clicks.append({"kind": "include" if kind == INCLUDE else "exclude", "index_zyx": [int(z), int(y), int(x)],
                       "seconds": seconds,
                       "timings": {k: float(v) for k, v in result.timings.items()},
                       "dsc": after[-1], "violations": violations})
    made = len(after) - 1
    after += [after[-1]] * (max_clicks + 1 - len(after))  # a perfect (or stuck) mask stays as it is
    reached = [n for n, d in enumerate(after) if d >= NOC_DSC]
    return {"truth_voxels": int(truth.sum()), "start_voxels": int((start_labels == value).sum()),
            "dsc": after, "clicks_made": made, "clicks": clicks, "stopped": stopped,
            "noc": reached[0] if reached else None}


def poor_start(truth, spacing_zyx, rng, shift_mm: float = 5.0):
    """``poor_mask`` of the truth, computed on a box around it (the same mask as on the whole grid: the box
    reaches beyond the shifted truth, so what the shift and the erosion see there is background either way;
    about 8 s less per structure at 512)."""
    import numpy as np

    from segcore.postprocess import bounding_box
    from training.clicks import poor_mask

    out = np.zeros(truth.shape, bool)
    box = bounding_box(truth)
    if box is None:
        return out
    margin = [int(np.ceil(shift_mm / s)) + 2 for s in spacing_zyx]
    box = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(box, margin, truth.shape))
    out[box] = poor_mask(truth[box], spacing_zyx, rng, shift_mm=shift_mm)
    return out


def run_case(seed: int, args, refiner, segmenters, values) -> dict:
    """All structures and starts of one phantom."""
    import numpy as np
    import SimpleITK as sitk

    from segcore.phantom import make_phantom

    tick = time.perf_counter()
    case = make_phantom(seed, matrix=args.matrix)
    ct = case.ct
    phantom = sitk.GetArrayFromImage(case.labels)
    organs = np.where(np.isin(phantom, list(values.values())), phantom, 0).astype(np.uint8)  # the six targets
    spacing_zyx = tuple(float(s) for s in ct.GetSpacing()[::-1])
    made = time.perf_counter() - tick
    starts, seconds = {}, {}
    for name, segmenter in segmenters.items():
        tick = time.perf_counter()
        starts[name] = sitk.GetArrayFromImage(segmenter(ct).labelmap).astype(np.uint8)
        seconds[name] = time.perf_counter() - tick
    runs = []
    for structure in args.structures:
        value = values[structure]
        truth = phantom == value
        begins = []
        if "demo" in args.starts:
            begins.append(("demo", starts["demo"]))
            if structure == "prostate":
                begins.append(("demo-prostate", starts["demo-prostate"]))
        if "poor" in args.starts:
            labels = organs.copy()
            labels[truth] = 0
            labels[poor_start(truth, spacing_zyx, np.random.default_rng([seed, value]))] = value
            begins.append(("poor", labels))
        for start, labels in begins:
            run = run_clicks(refiner, ct, labels, truth, value, args.max_clicks)
            runs.append({"seed": seed, "structure": structure, "value": value, "start": start, **run})
            log(f"  {structure:<19} {start:<13} DSC " + " ".join(f"{d:.3f}" for d in run["dsc"])
                + (f"  ({run['stopped']})" if run["stopped"] else ""))
    return {"seed": seed, "size": list(ct.GetSize()), "spacing": [round(float(s), 4) for s in ct.GetSpacing()],
            "phantom_seconds": made, "segment_seconds": seconds, "runs": runs}


# --------------------------------------------------------------------------- summary


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def summarise(cases: list[dict], max_clicks: int) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
        for run in case["runs"]:
            groups.setdefault((run["structure"], run["start"]), []).append(run)
    rows = []
    for (structure, start), runs in groups.items():
        clicks = [c for r in runs for c in r["clicks"]]
        deltas = [r["dsc"][n + 1] - r["dsc"][n] for r in runs for n in range(r["clicks_made"])]
        seconds = [c["seconds"] for c in clicks]
        rows.append({
            "structure": structure, "start": start, "cases": len(runs),
            "dsc_mean": {n: statistics.fmean(r["dsc"][n] for r in runs) for n in range(max_clicks + 1)},
            "noc": statistics.fmean(max_clicks if r["noc"] is None else r["noc"] for r in runs),
            "reached": sum(r["noc"] is not None for r in runs),
            "clicks": len(clicks),
            "worse_after_click": sum(d < 0 for d in deltas) / len(deltas) if deltas else float("nan"),
            "mean_dsc_change_per_click": statistics.fmean(deltas) if deltas else float("nan"),
            "violations": sum(c["violations"] for c in clicks),
            "clicks_with_violations": sum(c["violations"] > 0 for c in clicks),
            "refused": sum(bool(r["stopped"]) and r["stopped"].startswith("refused") for r in runs),
            "stopped_perfect": sum(r["stopped"] == "perfect" for r in runs),
            "latency_median_s": statistics.median(seconds) if seconds else float("nan"),
            "latency_p95_s": percentile(seconds, 95),
        })
    order = {s: n for n, s in enumerate(STRUCTURES)}
    start_order = {"demo": 0, "demo-prostate": 1, "poor": 2}
    rows.sort(key=lambda r: (start_order.get(r["start"], 9), order.get(r["structure"], 99)))
    clicks = [c for case in cases for run in case["runs"] for c in run["clicks"]]
    seconds = [c["seconds"] for c in clicks]
    keys = sorted({k for c in clicks for k in c["timings"]}, key=["check", "prepare", "network", "apply",
                                                                  "total"].index)
    return {"rows": rows, "clicks": len(clicks), "latency_median_s": statistics.median(seconds) if seconds
            else float("nan"), "latency_p95_s": percentile(seconds, 95),
            "refiner_timings_median_s": {k: statistics.median(c["timings"].get(k, 0.0) for c in clicks)
                                         for k in keys},
            "refiner_timings_p95_s": {k: percentile([c["timings"].get(k, 0.0) for c in clicks], 95) for k in keys},
            "violations": sum(c["violations"] for c in clicks)}


def markdown(summary: dict, max_clicks: int, start_names: dict) -> str:
    shown = [n for n in REPORTED_CLICKS if n <= max_clicks]
    head = (["structure", "start"] + [f"DSC@{n}" for n in shown]
            + [f"NoC@{NOC_DSC:.2f} (reached)", "worse after a click", "mean ΔDSC/click"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        cells = [r["structure"], start_names.get(r["start"], r["start"])]
        cells += [f"{r['dsc_mean'][n]:.3f}" for n in shown]
        cells += [f"{r['noc']:.1f} ({r['reached']}/{r['cases']})",
                  f"{100 * r['worse_after_click']:.0f} % of {r['clicks']}", f"{r['mean_dsc_change_per_click']:+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Latency per click (wall time of the refiner call, {summary['clicks']} clicks): median "
                 f"{summary['latency_median_s']:.2f} s, p95 {summary['latency_p95_s']:.2f} s; refiner timings "
                 "(median): " + ", ".join(f"{k} {v:.3f}" for k, v in summary["refiner_timings_median_s"].items())
                 + " s.")
    bad = [r for r in summary["rows"] if r["violations"]]
    lines.append(f"Other labels changed: {summary['violations']} voxels"
                 + ("" if not bad else " (" + ", ".join(f"{r['structure']}/{r['start']}: {r['violations']} in "
                                                          f"{r['clicks_with_violations']} clicks" for r in bad) + ")")
                 + ".")
    refused = [r for r in summary["rows"] if r["refused"]]
    if refused:
        lines.append("Stopped by a refused click: " + ", ".join(f"{r['structure']}/{r['start']} {r['refused']}"
                                                                  for r in refused) + ".")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=20, help="phantoms (default 20)")
    parser.add_argument("--seed", type=int, default=9200, help="the first phantom's seed (default 9200)")
    parser.add_argument("--matrix", type=int, default=512, help="phantom matrix (default 512)")
    parser.add_argument("--max-clicks", type=int, default=10,
                        help="clicks per structure and start (default 10; NoC is capped there)")
    parser.add_argument("--structures", default=",".join(STRUCTURES),
                        help="comma-separated (default: all six targets)")
    parser.add_argument("--starts", default=",".join(STARTS), help="demo, poor or both (default demo,poor)")
    parser.add_argument("--model", help="refinement package (default: the bundled refine-demo)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--json", "--output", dest="json", type=Path, default=DEFAULT_JSON,
                        help=f"write the results here, after every case (default {DEFAULT_JSON})")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already in --json (same settings) and run only the others")
    args = parser.parse_args(argv)
    args.structures = [s.strip() for s in args.structures.split(",") if s.strip()]
    args.starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    unknown = [s for s in args.structures if s not in STRUCTURES] + [s for s in args.starts if s not in STARTS]
    if unknown or not args.structures or not args.starts or args.max_clicks < 1:
        parser.error(f"structures are among {', '.join(STRUCTURES)}, starts among {', '.join(STARTS)}, "
                     f"--max-clicks at least 1 (got {', '.join(unknown) or 'none'})")

    import torch

    from segcore import anatomy
    from segcore.organs import OrganSegmenter
    from segcore.pipeline import available_cores, use_available_cores
    from segcore.prostate import ProstateSegmenter
    from segcore.refinement import Refiner

    if args.device == "cpu":
        use_available_cores()
    values = {name: anatomy.BY_NAME[name].value for name in STRUCTURES}
    tick = time.perf_counter()
    refiner = Refiner(args.model, args.device)
    segmenters = {}
    if "demo" in args.starts:
        segmenters["demo"] = OrganSegmenter(None, args.device)
        if "prostate" in args.structures:
            segmenters["demo-prostate"] = ProstateSegmenter(None, args.device)
    loaded = time.perf_counter() - tick
    start_names = {"poor": "poor (5 mm shift, 2 mm erosion)"}
    start_names.update({k: f"{s.package.name}" for k, s in segmenters.items()})
    config = {"seed": args.seed, "matrix": args.matrix, "max_clicks": args.max_clicks,
              "structures": args.structures, "starts": args.starts, "model": refiner.package.name,
              "model_version": refiner.package.version, "device": str(refiner.device),
              "start_models": {k: s.package.name for k, s in segmenters.items()}, "noc_dsc": NOC_DSC}
    machine = {"cpus": os.cpu_count(), "available_cores": available_cores(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"{args.cases} phantoms from seed {args.seed} at matrix {args.matrix}; refinement model "
          f"{refiner.package.name} on {refiner.device}; {machine['cpus']} CPUs, {machine['available_cores']} "
          f"available, torch {machine['torch']} with {machine['torch_threads']} threads", flush=True)

    done: dict[int, dict] = {}
    if args.resume and args.json.is_file():
        previous = json.loads(args.json.read_text())
        if previous.get("config") == config:
            done = {c["seed"]: c for c in previous.get("cases", [])}
            log(f"resuming: {len(done)} case(s) already in {args.json}")
        else:
            log(f"not resuming: {args.json} was written with other settings")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.cases))
    started, ran = time.perf_counter(), 0
    for n, seed in enumerate(seeds):
        if seed in done:
            continue
        tick = time.perf_counter()
        log(f"case {n + 1}/{len(seeds)}: phantom seed {seed}")
        case = run_case(seed, args, refiner, segmenters, values)
        done[seed] = case
        clicks = [c["seconds"] for r in case["runs"] for c in r["clicks"]]
        ran += 1
        elapsed = time.perf_counter() - started
        left = sum(1 for s in seeds if s not in done)
        log(f"case {n + 1}/{len(seeds)} done in {time.perf_counter() - tick:.0f} s (size "
            f"{'x'.join(map(str, case['size']))}, phantom {case['phantom_seconds']:.1f} s, start models "
            + ", ".join(f"{k} {v:.1f} s" for k, v in case["segment_seconds"].items())
            + f", {len(clicks)} clicks, median {statistics.median(clicks) if clicks else float('nan'):.2f} s); "
            f"elapsed {elapsed / 60:.1f} min, about {elapsed / ran * left / 60:.0f} min to go")
        cases = [done[s] for s in seeds if s in done]
        write(args.json, config, machine, loaded, cases, summarise(cases, args.max_clicks), complete=False)
    cases = [done[s] for s in seeds if s in done]
    summary = summarise(cases, args.max_clicks)
    write(args.json, config, machine, loaded, cases, summary, complete=True)
    print(markdown(summary, args.max_clicks, start_names))
    print(f"\nresults: {args.json}")
    return 0


def write(path: Path, config: dict, machine: dict, loaded: float, cases: list, summary: dict,
          complete: bool) -> None:
    out = {"config": config, "machine": machine, "model_load_s": loaded, "complete": complete,
           "seeds": [c["seed"] for c in cases], "summary": summary, "cases": cases}
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(out, indent=1, default=float))
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())
