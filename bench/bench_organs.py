"""Benchmark: `prostateseg organs` end to end on a 512 x 512 x 150 CT (the same CT as bench_segment.py).

Each run is a fresh process, so its peak memory is its own:
1. ``segcore.organs.OrganSegmenter`` on the CT: model load time, wall time per
   step (read, detection over all slices, building the organs and placing them
   on the input grid) and peak RSS;
2. the installed ``prostateseg organs`` command on the same file, end to end
   (imports, model load, segmentation, writing .seg.nrrd + .nii.gz).

    python bench/bench_organs.py --repeat 3
    python bench/bench_organs.py --device cuda     # when a GPU is present
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from bench_common import add_common_arguments, make_ct, measure_segmenter, run_child, run_cli


def child_pipeline(ct: str, device: str, model: str | None) -> None:
    """Runs in a fresh process: load the model once, segment once, print one JSON line."""
    from segcore.organs import OrganSegmenter

    result, measured = measure_segmenter(lambda: OrganSegmenter(model, device), ct)
    print(json.dumps({**measured, "organs": {s.name: round(s.volume_cc, 1) for s in result.segments}}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        child_pipeline(args.child[0], args.child[1], None if args.child[2] == "-" else args.child[2])
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    ct = make_ct(args.workdir, args.seed)
    print(f"CT: {ct.name}, {os.cpu_count()} CPUs, device {args.device}")
    runs = [run_child(__file__, ["--child", str(ct), args.device, args.model or "-"]) for _ in range(args.repeat)]
    cli_runs = [run_cli("organs", ct, args.device, args.model) for _ in range(args.repeat)]
    keys = ["load_model", "read", "detect", "paste_back", "total"]
    median = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
    results = {"ct": ct.name, "device": args.device, "threads": runs[0]["threads"], "pipeline_median_s": median,
               "pipeline_peak_mb": max(r["peak_mb"] for r in runs), "organs_cc": runs[0]["organs"],
               "cli_median_s": statistics.median(r["seconds"] for r in cli_runs),
               "cli_peak_mb": max(r["peak_mb"] for r in cli_runs)}
    print(f"pipeline (median of {args.repeat}, s): " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()))
    print(f"pipeline peak RSS {results['pipeline_peak_mb']:.0f} MB; organs (cc): {results['organs_cc']}")
    print(f"prostateseg organs end to end: {results['cli_median_s']:.2f} s, peak {results['cli_peak_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
