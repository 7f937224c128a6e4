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
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_segment import make_ct


def child_pipeline(ct: str, device: str, model: str | None) -> None:
    """Runs in a fresh process: load the model once, segment once, print one JSON line."""
    import resource
    import time

    tick = time.perf_counter()
    from segcore.organs import OrganSegmenter

    segmenter = OrganSegmenter(model, device)
    loaded = time.perf_counter() - tick
    result = segmenter(ct)
    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_model": loaded, **result.timings, "peak_mb": peak, "threads": torch.get_num_threads(),
                      "organs": {s.name: round(s.volume_cc, 1) for s in result.segments}}))


def run_child(args_list) -> dict:
    out = subprocess.run([sys.executable, __file__, *args_list], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cli(ct: Path, device: str, model: str | None) -> dict:
    import resource
    import time

    with tempfile.TemporaryDirectory() as out:
        command = [str(Path(sys.executable).with_name("prostateseg")), "-q", "organs", str(ct), "-o", out,
                   "--device", device]
        if model:
            command += ["--model", model]
        tick = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - tick
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    return {"seconds": seconds, "peak_mb": peak / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs per measurement (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--model", help="model package (default: the bundled default)")
    parser.add_argument("--seed", type=int, default=2, help="phantom seed of the test CT (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_pipeline(args.child[0], args.child[1], None if args.child[2] == "-" else args.child[2])
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    ct = make_ct(args.workdir, args.seed)
    print(f"CT: {ct.name}, {os.cpu_count()} CPUs, device {args.device}")
    runs = [run_child(["--child", str(ct), args.device, args.model or "-"]) for _ in range(args.repeat)]
    cli_runs = [run_cli(ct, args.device, args.model) for _ in range(args.repeat)]
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
