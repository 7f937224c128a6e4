"""Benchmark: the ProstateSeg module's logic on a 512 x 512 x 150 CT, as Slicer runs it.

Each run is a fresh process with real MRML (the ``slicer-core`` wheel, no Qt):
load the CT with Slicer's Volumes logic, then
``ProstateSegmentationLogic().segmentVolume(volume)`` -- model load,
segmentation, the segmentation node with its terminology and the closed
surface for the 3-D view. Reports wall time per step and peak RSS. The CT is
the one `bench_segment.py` makes (same --seed, same --workdir cache).

    python bench/bench_slicer_logic.py --repeat 3
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

HERE = Path(__file__).resolve().parent


def child(ct: str, device: str) -> None:
    """Runs in a fresh process; prints one JSON line."""
    import resource
    import time

    sys.path.insert(0, str(HERE.parent / "ProstateSeg"))
    sys.path.insert(0, str(HERE.parent / "Testing"))  # the test helpers' standalone MRML scene
    from slicer_scene import standalone_scene

    from ProstateSegLib.logic import ProstateSegmentationLogic

    _, logics = standalone_scene()
    tick = time.perf_counter()
    volume = logics["Volumes"].AddArchetypeVolume(ct, "ct")
    loaded = time.perf_counter() - tick
    logic = ProstateSegmentationLogic()
    tick = time.perf_counter()
    node = logic.segmentVolume(volume, device=device)
    total = time.perf_counter() - tick
    timings = logic.lastResult.timings
    print(json.dumps({"load_volume": loaded, "segment_volume": total, "segmentation": timings["total"],
                      "nodes_and_surface": total - timings["total"],
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "found": node is not None}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--seed", type=int, default=2, help="phantom seed of the test CT (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    sys.path.insert(0, str(HERE))
    from bench_common import make_ct

    args.workdir.mkdir(parents=True, exist_ok=True)
    ct = make_ct(args.workdir, args.seed)
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, __file__, "--child", str(ct), args.device],
                             check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ["load_volume", "segmentation", "nodes_and_surface", "segment_volume"]
    results = {"ct": ct.name, "device": args.device, "cpus": os.cpu_count(),
               "median_s": {k: statistics.median(r[k] for r in runs) for k in keys},
               "peak_mb": max(r["peak_mb"] for r in runs), "found": all(r["found"] for r in runs)}
    print(f"CT {ct.name}, {os.cpu_count()} CPUs, device {args.device}, median of {args.repeat}: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in results["median_s"].items())
          + f"; peak RSS {results['peak_mb']:.0f} MB; found: {results['found']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
