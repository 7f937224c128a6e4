"""Benchmark: a batch of CTs segmented by the serial loop and on a local Dask cluster of 1 and 2 workers.

    python bench/bench_cluster.py                      # 12 CTs; serial, --workers 1, --workers 2
    python bench/bench_cluster.py --cases 24 --workers 1,2,4 --device cpu

The CTs are the benchmark phantoms of bench_common.make_ct (512 x 512 x 150,
seeds 0..N-1), written once into --workdir. Each configuration is one fresh
``prostateseg segment`` process over all of them (so imports, model loads and,
for the cluster, starting it are counted), writing nii.gz into its own folder.
Reported per configuration: wall seconds, cases per hour, the mean per-case
pipeline time from manifest.jsonl, and the cluster's overhead per case against
the serial loop. The label maps of every configuration are compared voxel for
voxel with the serial run's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import make_ct


def run_batch(cts: list[Path], out: Path, workers: int | None, model: str | None, device: str) -> dict:
    command = [sys.executable, "-m", "segcore.cli", "-q", "segment", *map(str, cts), "-o", str(out),
               "--formats", "nii.gz", "--device", device, *(["--model", model] if model else []),
               *(["--workers", str(workers)] if workers else [])]
    tick = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - tick
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == len(cts) and all(line["status"] == "done" for line in lines), lines
    return {"workers": workers or 0, "wall_s": round(wall, 1), "cases_per_hour": round(3600 * len(cts) / wall, 1),
            "mean_case_s": round(statistics.mean(line["timings_s"]["total"] for line in lines), 2),
            "processes": len({(line["host"], line["pid"]) for line in lines})}


def same_labels(first: Path, other: Path) -> bool:
    import numpy as np
    import SimpleITK as sitk

    for path in sorted(first.glob("*_seg.nii.gz")):
        a, b = sitk.ReadImage(str(path)), sitk.ReadImage(str(other / path.name))
        if not np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12, help="number of CTs (default 12)")
    parser.add_argument("--workers", default="1,2", help="cluster sizes to run, comma-separated (default 1,2)")
    parser.add_argument("--model", help="model package (default: the bundled prostate demo model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench",
                        help="where the CTs are kept between runs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"making {args.cases} CTs in {args.workdir} (kept for later runs)", file=sys.stderr)
    cts = [make_ct(args.workdir, seed) for seed in range(args.cases)]
    with tempfile.TemporaryDirectory() as scratch:
        rows = []
        for workers in [None, *(int(n) for n in args.workers.split(","))]:
            out = Path(scratch) / f"workers{workers or 0}"
            print(f"running {'the serial loop' if not workers else f'{workers} worker(s)'}...", file=sys.stderr)
            row = run_batch(cts, out, workers, args.model, args.device)
            row["same_labels_as_serial"] = same_labels(Path(scratch) / "workers0", out)
            rows.append(row)
    serial = rows[0]
    for row in rows:
        row["overhead_per_case_s"] = round((row["wall_s"] - serial["wall_s"]) / args.cases, 2) if row["workers"] else 0.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{args.cases} CTs of 512 x 512 x 150, {cores} cores, device {args.device}")
    print(f"{'run':>10} {'wall s':>8} {'cases/h':>8} {'case s':>7} {'overhead/case s':>16} {'same labels':>12}")
    for row in rows:
        name = f"{row['workers']} worker" + ("s" if row["workers"] > 1 else "") if row["workers"] else "serial"
        print(f"{name:>10} {row['wall_s']:>8} {row['cases_per_hour']:>8} {row['mean_case_s']:>7} "
              f"{row['overhead_per_case_s']:>16} {row['same_labels_as_serial']!s:>12}")
    best = max(rows, key=lambda r: r["cases_per_hour"])
    hours = 10000 / (20 * best["cases_per_hour"])
    print(f"\nAt {best['cases_per_hour']} cases/h per node like this one, 10 000 CTs on 20 such nodes take "
          f"about {hours:.1f} h (the file system and the scheduler permitting).")
    if args.json:
        args.json.write_text(json.dumps({"cases": args.cases, "cores": cores, "device": args.device, "runs": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
