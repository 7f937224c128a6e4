"""Benchmark: make one 512-matrix digital pelvis phantom (segcore.phantom).

Times `make_phantom(seed, matrix=512)` (a 512 x 512 x ~150 case; the slice
count, spacing and orientation are drawn from the seed) for several seeds, each
in a fresh Python process, with its peak memory (ru_maxrss of that process).
With --with-write it also runs the `prostateseg phantom` command end to end
(make + write the CT and label map as .nii.gz), again one fresh process per seed.

Speed and memory are reported here, never asserted in tests.

    python bench/bench_phantom.py                    # seeds 0 1 2
    python bench/bench_phantom.py --seeds 0 1 2 3 4 --with-write --json phantom.json
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

MATRIX = 512
TARGET_S = 5.0


def child(seed: int) -> None:
    """Make one phantom and print one JSON line; runs in a fresh process."""
    import resource

    start = time.perf_counter()
    from segcore.phantom import make_phantom

    imported, cpu = time.perf_counter(), time.process_time()
    case = make_phantom(seed, matrix=MATRIX)
    done, cpu = time.perf_counter(), time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "seed": seed, "import_s": imported - start, "make_s": done - imported, "make_cpu_s": cpu,
        "peak_rss_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10,
        "size": list(case.ct.GetSize()), "spacing_mm": [round(v, 3) for v in case.ct.GetSpacing()],
        "orientation": case.info["orientation"], "implant": case.info["anatomy"].get("implant"),
    }))


def run_fresh(command: list[str]) -> tuple[float, float, str]:
    """Run `command` in a fresh process: (wall s, peak RSS MB of that process, stdout).

    The driver stays small (no numpy/SimpleITK here): on Linux a child's
    ru_maxrss starts from the parent's RSS at fork time."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            sys.exit(f"{' '.join(command)} failed (exit {process.returncode}):\n{err.read()}")
        return wall, usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10), out.read()


def cli_command() -> list[str]:
    """The installed `prostateseg` command next to this Python, as a user runs it."""
    script = Path(sys.executable).with_name("prostateseg")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from segcore.cli import main; sys.exit(main())"]


def summary(name: str, values: list[float], unit: str) -> str:
    return (f"  {name:28s} median {statistics.median(values):6.2f} {unit}  "
            f"min {min(values):6.2f}  max {max(values):6.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="phantom seeds (default: 0 1 2)")
    parser.add_argument("--with-write", action="store_true",
                        help="also time `prostateseg -q phantom OUTDIR --seed S` end to end (writes .nii.gz)")
    parser.add_argument("--json", type=Path, help="write all results to this JSON file")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0

    cpus = os.cpu_count()
    report = {"machine": {"cpu_count": cpus}, "matrix": MATRIX, "target_s": TARGET_S, "make": [], "cli": []}
    print(f"make_phantom(seed, matrix={MATRIX}), one fresh process per seed; cpu_count {cpus}")
    print(f"  {'seed':>4s} {'size':>16s} {'spacing mm':>20s} {'orient.':>8s} {'import s':>9s} "
          f"{'make s':>7s} {'CPU s':>6s} {'peak MB':>8s} {'s/150 sl.':>9s}")
    for seed in args.seeds:
        _, _, out = run_fresh([sys.executable, os.path.abspath(__file__), "--child", str(seed)])
        r = json.loads(out.splitlines()[-1])
        report["make"].append(r)
        print(f"  {seed:4d} {'x'.join(map(str, r['size'])):>16s} {'x'.join(map(str, r['spacing_mm'])):>20s} "
              f"{r['orientation']:>8s} {r['import_s']:9.2f} {r['make_s']:7.2f} {r['make_cpu_s']:6.2f} "
              f"{r['peak_rss_mb']:8.0f} {r['make_s'] * 150 / min(r['size']):9.2f}")
    make_s = [r["make_s"] for r in report["make"]]
    print(summary("make_phantom", make_s, "s"))
    print(f"  target <= {TARGET_S:.0f} s -> {'met' if statistics.median(make_s) <= TARGET_S else 'NOT met'} "
          f"(median); peak RSS max {max(r['peak_rss_mb'] for r in report['make']):.0f} MB")

    if args.with_write:
        command = cli_command()
        print(f"\n`prostateseg -q phantom OUTDIR -n 1 --seed S --size {MATRIX}` end to end "
              "(make + write .nii.gz)")
        with tempfile.TemporaryDirectory(prefix="prostateseg-bench-") as outdir:
            for seed in args.seeds:
                case_dir = Path(outdir) / f"seed{seed}"
                wall, peak, _ = run_fresh([*command, "-q", "phantom", str(case_dir), "-n", "1",
                                           "--seed", str(seed), "--size", str(MATRIX)])
                written = sum(f.stat().st_size for f in case_dir.iterdir()) / 2**20
                report["cli"].append({"seed": seed, "wall_s": wall, "peak_rss_mb": peak,
                                      "written_mb": written})
                print(f"  seed {seed:4d}: {wall:6.2f} s, peak RSS {peak:5.0f} MB, {written:5.1f} MB written")
        print(summary("prostateseg phantom", [r["wall_s"] for r in report["cli"]], "s"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
