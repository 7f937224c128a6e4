"""Benchmark: `prostateseg segment` end to end on a 512 x 512 x ~150 CT, against an nnU-Net stand-in.

Each job runs in a fresh process (its peak memory is its own; see README.md):
1. the CT: the digital phantom ``make_phantom(seed, matrix=512, spacing=(0.95, 0.95, 2.0))``,
   cut or padded to exactly 150 slices, written once as .nii.gz into --workdir;
2. ``segcore.prostate.ProstateSegmenter`` on it: wall time per stage (read,
   stage 1, stage 2, paste back), the model load time and peak RSS;
3. the installed ``prostateseg segment`` command on the same file, end to end
   (imports, model load, segmentation, writing .seg.nrrd + .nii.gz);
4. unless --no-nnunet: nnU-Net v2's own predictor with a default 3d_fullres U-Net
   at 3 mm and random weights (bench/nnunet_standin.py), as the stand-in for what
   a TotalSegmentator-style tool spends on the same CT; the ratio is reported.
   nnunetv2 pulls its own torch build; install it in a separate environment and
   point NNUNET_PYTHON at that environment's python.

    python bench/bench_segment.py --repeat 3
    python bench/bench_segment.py --device cuda     # when a GPU is present
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import add_common_arguments, make_ct, measure_segmenter, run_child, run_cli

HERE = Path(__file__).resolve().parent


def child_pipeline(ct: str, device: str, model: str | None) -> None:
    """Runs in a fresh process: load the model once, segment once, print one JSON line."""
    from segcore.prostate import ProstateSegmenter

    result, measured = measure_segmenter(lambda: ProstateSegmenter(model, device), ct)
    print(json.dumps({**measured, "found": result.found,
                      "volume_cc": result.segments[0].volume_cc if result.found else 0}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--no-nnunet", action="store_true", help="skip the nnU-Net stand-in")
    parser.add_argument("--nnunet-repeat", type=int, default=1, help="runs of the (slow) stand-in (default 1)")
    args = parser.parse_args(argv)
    if args.child:
        child_pipeline(args.child[0], args.child[1], None if args.child[2] == "-" else args.child[2])
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    ct = make_ct(args.workdir, args.seed)
    print(f"CT: {ct.name}, {os.cpu_count()} CPUs, device {args.device}")
    runs = [run_child(__file__, ["--child", str(ct), args.device, args.model or "-"]) for _ in range(args.repeat)]
    cli_runs = [run_cli("segment", ct, args.device, args.model) for _ in range(args.repeat)]
    keys = ["load_model", "read", "stage1", "stage2", "paste_back", "total"]
    median = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
    results = {"ct": ct.name, "device": args.device, "threads": runs[0]["threads"], "pipeline_median_s": median,
               "pipeline_peak_mb": max(r["peak_mb"] for r in runs), "found": runs[0]["found"],
               "volume_cc": runs[0]["volume_cc"],
               "cli_median_s": statistics.median(r["seconds"] for r in cli_runs),
               "cli_peak_mb": max(r["peak_mb"] for r in cli_runs)}
    print(f"pipeline (median of {args.repeat}, s): " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()))
    print(f"pipeline peak RSS {results['pipeline_peak_mb']:.0f} MB; prostate found: {results['found']} "
          f"({results['volume_cc']:.1f} cc)")
    print(f"prostateseg segment end to end: {results['cli_median_s']:.2f} s, peak {results['cli_peak_mb']:.0f} MB")
    if not args.no_nnunet:
        standin = HERE / "nnunet_standin.py"
        python = os.environ.get("NNUNET_PYTHON", sys.executable)
        nn_runs = []
        for _ in range(args.nnunet_repeat):
            out = subprocess.run([python, str(standin), str(ct)], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"nnU-Net stand-in skipped: {(out.stderr or out.stdout).strip().splitlines()[-1]}")
                break
            nn_runs.append(json.loads(out.stdout[out.stdout.index("{"):]))
        if nn_runs:
            nn_s = statistics.median(r["seconds"] for r in nn_runs)
            results["nnunet_standin"] = {**nn_runs[0], "median_s": nn_s,
                                         "peak_mb": max(r["peak_rss_mb"] for r in nn_runs)}
            results["ratio_nnunet_over_pipeline"] = nn_s / median["total"]
            print(f"nnU-Net v2 3d_fullres stand-in (3 mm, random weights): {nn_s:.2f} s, peak "
                  f"{results['nnunet_standin']['peak_mb']:.0f} MB; ratio to our pipeline "
                  f"{results['ratio_nnunet_over_pipeline']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
