"""Time writing an RT Structure Set and a DICOM SEG of 6 organs for a 512 x 512 x 150 CT series.

    python bench/bench_dicom_export.py [--repeat 3] [--seed 2]

The CT is phantom `seed` (0.95 x 0.95 x 2 mm, 150 slices) written as a DICOM
series; its six target organs are the label map. Each repeat runs the export
(`export_labelmap(..., formats=("rtstruct", "dicom-seg"))`: matching the series
to the grid, tracing, writing both files) in this process, after one warm-up
run that pays the imports; the parts are timed separately too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import make_dicom_case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    from segcore import anatomy
    from segcore.dicom.ct import ct_series_for
    from segcore.dicom.rtstruct import write_rtstruct
    from segcore.dicom.seg import write_seg
    from segcore.export import export_labelmap
    from segcore.image import read_image

    folder, labels_path = make_dicom_case(args.workdir, args.seed)
    ct = read_image(folder)
    labels = sitk.Resample(sitk.ReadImage(str(labels_path)), ct, sitk.Transform(), sitk.sitkNearestNeighbor)
    structures = [anatomy.BY_NAME[name] for name in anatomy.TARGET_NAMES]
    out = args.workdir / "dicom_export_out"
    rows = {"match series": [], "rtstruct": [], "dicom-seg": [], "export (both, staged)": []}
    for repeat in range(args.repeat + 1):  # the first run pays the imports and is not counted
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        tick = time.perf_counter()
        series = ct_series_for(labels, folder)
        times = {"match series": time.perf_counter() - tick}
        tick = time.perf_counter()
        write_rtstruct(labels, structures, series, out / "rt.dcm")
        times["rtstruct"] = time.perf_counter() - tick
        tick = time.perf_counter()
        write_seg(labels, structures, series, out / "seg.dcm")
        times["dicom-seg"] = time.perf_counter() - tick
        tick = time.perf_counter()
        export_labelmap(labels, structures, out, "case_seg", ("rtstruct", "dicom-seg"), source=folder)
        times["export (both, staged)"] = time.perf_counter() - tick
        if repeat:
            for key, value in times.items():
                rows[key].append(value)
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    summary = {key: {"median_s": round(float(np.median(v)), 3), "max_s": round(max(v), 3)} for key, v in rows.items()}
    print(f"CT series: {ct.GetSize()} voxels, spacing {tuple(round(s, 2) for s in ct.GetSpacing())} mm; "
          f"organs: {', '.join(s.name for s in structures)}")
    for key, value in summary.items():
        print(f"{key:24s} median {value['median_s']:.3f} s   max {value['max_s']:.3f} s   ({args.repeat} runs)")
    print("files: " + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sorted(sizes.items())))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
