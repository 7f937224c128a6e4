"""Benchmark: read + canonicalise + resample to 1 mm of a 512x512x300 pelvic CT.

The test CT is a digital phantom (segcore.phantom) at 0.9 x 0.9 x 1.5 mm stored
RAS (so canonicalise really flips axes), brought to exactly 300 slices and
written once into a cache folder. Each repetition then runs in a fresh Python
process, as a user's job would, so the peak memory (ru_maxrss) is that job's:

    read_image(path) -> canonicalize(img) -> resample_to_spacing(canonical, 1.0, "linear")

Speed and memory are reported here, never asserted in tests.

    python bench/bench_image.py                      # NIfTI (.nii.gz), 3 repetitions
    python bench/bench_image.py --format dicom --repeat 5 --json image.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = (512, 512, 300)
SPACING = (0.9, 0.9, 1.5)
TARGET_S, TARGET_MB, TARGET_CORES = 3.0, 2048.0, 2
STAGES = ("read", "canonicalize", "resample", "total")
SUFFIX = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "dicom": ""}


# --------------------------------------------------------------------------- the test CT (made once)


def make_ct(seed: int):
    """The phantom CT padded/cropped along k to exactly SIZE[2] slices.

    Padding appends mirrored slices at the end of k (realistic content, so that
    compression and reading behave as on a real scan); the origin, spacing and
    direction stay those of the phantom, so the geometry remains consistent.
    """
    import numpy as np
    import SimpleITK as sitk

    from segcore.phantom import make_phantom

    ct = make_phantom(seed, matrix=SIZE[0], spacing=SPACING, orientation="RAS").ct
    made = ct.GetSize()
    array = sitk.GetArrayFromImage(ct)  # numpy axes (k, j, i)
    if array.shape[0] < SIZE[2]:
        array = np.pad(array, ((0, SIZE[2] - array.shape[0]), (0, 0), (0, 0)), mode="symmetric")
    array = array[: SIZE[2]]
    result = sitk.GetImageFromArray(np.ascontiguousarray(array))
    result.SetSpacing(ct.GetSpacing())
    result.SetOrigin(ct.GetOrigin())
    result.SetDirection(ct.GetDirection())
    assert result.GetSize() == SIZE, result.GetSize()
    return result, made


def write_dicom_series(image, folder: Path) -> None:
    """One CT file per k-slice, with Image Position/Orientation (Patient)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    series, study = "1.2.826.0.1.3680043.2.1125.1.42", "1.2.826.0.1.3680043.2.1125.2.42"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series}.{k + 1}",
            "0020|000d": study, "0020|000e": series, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}", "0008|103e": "bench CT",
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"CT{k + 1:04d}.dcm"))
        writer.Execute(slice_)


def ct_path(workdir: Path, fmt: str, seed: int) -> Path:
    """Cache name: size, seed and a hash of the phantom's source, so that a
    changed phantom (or this script's way of making the CT) makes a new file."""
    package = Path(importlib.util.find_spec("segcore.phantom").origin).parent  # found, not imported
    sources = b"".join(p.read_bytes() for p in sorted(package.glob("*.py")))
    digest = hashlib.sha256(sources + Path(__file__).read_bytes()).hexdigest()[:10]
    name = f"ct_{SIZE[0]}x{SIZE[1]}x{SIZE[2]}_seed{seed}_{digest}"
    return workdir / (name + ("_dicom" if fmt == "dicom" else SUFFIX[fmt]))


def make_cached_ct(path: Path, fmt: str, seed: int) -> None:
    """Write the test CT to `path` in `fmt` (atomically: temporary name, then rename)."""
    import SimpleITK as sitk

    start = time.perf_counter()
    image, made = make_ct(seed)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the suffix
    if fmt == "dicom":
        write_dicom_series(image, temporary)
    else:
        sitk.WriteImage(image, str(temporary), useCompression=(fmt == "nii.gz"))
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(temporary, path)
    print(f"  phantom {made} -> {SIZE} voxels, {time.perf_counter() - start:.1f} s, "
          f"{disk_mb(path):.0f} MB on disk")


def disk_mb(path: Path) -> float:
    files = path.iterdir() if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 2**20


# --------------------------------------------------------------------------- one repetition (child process)


def child(path: str, threads: int | None) -> None:
    """Run the pipeline once and print one JSON line; runs in a fresh process."""
    import resource

    start = time.perf_counter()
    import SimpleITK as sitk

    from segcore.image import canonicalize, read_image, resample_to_spacing

    result = {"import_s": time.perf_counter() - start, "torch_loaded": "torch" in sys.modules}
    if threads:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(threads)
    result["sitk_threads"] = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()

    def peak_mb():  # ru_maxrss is in KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10

    def hwm_mb():  # the same peak from the kernel's per-process counter (Linux), a cross-check
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) / 2**10 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return None

    result["rss_after_import_mb"] = peak_mb()
    def clock():  # wall time, and CPU time of all the process's threads
        return time.perf_counter(), time.process_time()

    t0 = clock()
    image = read_image(path)
    t1 = clock()
    canonical, _ = canonicalize(image)
    t2 = clock()
    resampled = resample_to_spacing(canonical, 1.0, "linear")
    t3 = clock()
    for stage, (a, b) in zip(STAGES, ((t0, t1), (t1, t2), (t2, t3), (t0, t3))):
        result[stage], result[stage + "_cpu"] = b[0] - a[0], b[1] - a[1]
    result.update(peak_rss_mb=peak_mb(), vm_hwm_mb=hwm_mb(), input_size=list(image.GetSize()),
                  output_size=list(resampled.GetSize()), output_type=resampled.GetPixelIDTypeAsString())
    print(json.dumps(result))


# --------------------------------------------------------------------------- driver


def run_child(*options: str) -> str:
    """This script in a fresh process. The driver itself stays small (it imports
    neither numpy nor SimpleITK): on Linux a child's ru_maxrss starts from the
    parent's RSS at fork time, so a big driver would inflate the children's peaks."""
    command = [sys.executable, os.path.abspath(__file__), *options]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"child process failed (exit {done.returncode}):\n{done.stderr}")
    return done.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench",
                        help="cache folder for the test CT (default: prostateseg-bench in the temp folder)")
    parser.add_argument("--format", choices=tuple(SUFFIX), action="append",
                        help="file format(s) to benchmark; repeat to give several (default: nii.gz)")
    parser.add_argument("--dicom", action="store_true", help="also benchmark a DICOM series folder")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, each a fresh process (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--threads", type=int, help="SimpleITK threads (default: SimpleITK's own default)")
    parser.add_argument("--regenerate", action="store_true", help="remake the cached test CT")
    parser.add_argument("--json", type=Path, help="write all results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.threads)
        return 0
    if args.make:
        make_cached_ct(Path(args.make), args.format[0], args.seed)
        return 0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    formats = list(dict.fromkeys((args.format or ["nii.gz"]) + (["dicom"] if args.dicom else [])))

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    report = {"machine": {"cpu_count": cpus, "usable_cpus": usable, "platform": platform.platform(),
                          "python": platform.python_version()},
              "size": SIZE, "spacing_mm": SPACING, "repeat": args.repeat,
              "targets": {"total_s": TARGET_S, "peak_rss_mb": TARGET_MB, "cores": TARGET_CORES},
              "results": {}}
    for fmt in formats:
        path = ct_path(args.workdir, fmt, args.seed)
        if args.regenerate or not path.exists():
            args.workdir.mkdir(parents=True, exist_ok=True)
            print(f"making the test CT ({fmt}) in {args.workdir} ...", flush=True)
            made = run_child("--make", str(path), "--format", fmt, "--seed", str(args.seed))
            print(made, end="", flush=True)
        threads = ("--threads", str(args.threads)) if args.threads else ()
        runs = [json.loads(run_child("--child", str(path), *threads).splitlines()[-1])
                for _ in range(args.repeat)]
        report["results"][fmt] = {"disk_mb": round(disk_mb(path), 1), "runs": runs}

        first = runs[0]
        print(f"\n{fmt}: {tuple(first['input_size'])} at {SPACING} mm ({disk_mb(path):.0f} MB on disk) -> "
              f"{tuple(first['output_size'])} {first['output_type']} at 1 mm; "
              f"{args.repeat} fresh processes; cpu_count {cpus} (usable {usable}), "
              f"SimpleITK threads {first['sitk_threads']}")
        print(f"  {'stage':18s} {'median s':>9s} {'min s':>8s} {'median CPU s':>13s}")
        imports = [r["import_s"] for r in runs]
        print(f"  {'import (torch!)' if first['torch_loaded'] else 'import (no torch)':18s} "
              f"{statistics.median(imports):9.3f} {min(imports):8.3f}")
        for stage in STAGES:
            values, cpu = [r[stage] for r in runs], [r[stage + "_cpu"] for r in runs]
            print(f"  {stage:18s} {statistics.median(values):9.3f} {min(values):8.3f} "
                  f"{statistics.median(cpu):13.3f}")
        total = statistics.median(r["total"] for r in runs)
        peak = max(r["peak_rss_mb"] for r in runs)
        print(f"  peak RSS {peak:.0f} MB (ru_maxrss; after imports {first['rss_after_import_mb']:.0f} MB; "
              f"VmHWM {max(r['vm_hwm_mb'] or 0 for r in runs):.0f} MB)")
        print(f"  target: total <= {TARGET_S:.0f} s -> {'met' if total <= TARGET_S else 'NOT met'} "
              f"({total:.2f} s); peak <= {TARGET_MB / 1024:.0f} GB -> "
              f"{'met' if peak <= TARGET_MB else 'NOT met'} ({peak:.0f} MB); on {TARGET_CORES} cores "
              f"(this run: {usable})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
