"""Importing one CT series with its RT Structure Set (`prostateseg dataset import`): target <= 5 s.

The series: phantom `--seed` at 512 x 512, 0.95 x 0.95 x 2 mm, cut to 150 slices, written with
`write_ct_series`; its six organs as an RTSTRUCT from `write_rtstruct`. Each run imports the tree into
a fresh output folder (walk, CT read and checks, rasterising, writing NIfTI and the report).

    python bench/bench_dicom_import.py [--repeat 3] [--seed 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SLICES = 150
TARGET_S = 5.0


def cut(image: sitk.Image, start: int, dtype, fill) -> sitk.Image:
    """`SLICES` slices from `start`, padded with `fill` where the phantom is shorter (as bench_common does)."""
    array = sitk.GetArrayFromImage(image)[start:start + SLICES].astype(dtype)
    if array.shape[0] < SLICES:
        array = np.concatenate([array, np.full((SLICES - array.shape[0],) + array.shape[1:], fill, dtype)])
    out = sitk.GetImageFromArray(array)
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    out.SetOrigin(image.TransformIndexToPhysicalPoint([0, 0, start]))
    return out


def make_tree(root: Path, seed: int) -> None:
    from segcore import anatomy
    from segcore.dicom.ct import ct_series_for, write_ct_series
    from segcore.dicom.rtstruct import write_rtstruct
    from segcore.image import read_image
    from segcore.phantom import make_phantom

    case = make_phantom(seed, matrix=512, spacing=(0.95, 0.95, 2.0), orientation="LPS")
    start = max(0, (case.ct.GetSize()[2] - SLICES) // 2)
    ct, labels = cut(case.ct, start, np.int16, -1024), cut(case.labels, start, np.uint8, 0)
    array = sitk.GetArrayViewFromImage(labels)
    if array.shape[0] != SLICES:
        raise SystemExit(f"the phantom has {array.shape[0]} slices, not {SLICES}")
    organs = sitk.GetImageFromArray(np.where(array <= 6, array, 0).astype(np.uint8))
    organs.CopyInformation(labels)
    write_ct_series(ct, root / "ct", seed=f"bench{seed}")
    series = ct_series_for(read_image(root / "ct"), root / "ct")
    write_rtstruct(organs, [anatomy.BY_NAME[n] for n in anatomy.TARGET_NAMES], series, root / "rs.dcm")


def main(argv=None) -> int:
    from segcore.dicom.importer import IMPORTED, import_dicom

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="imports to time (default 3)")
    parser.add_argument("--seed", type=int, default=2, help="phantom seed (default 2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "dicom"
        started = time.perf_counter()
        make_tree(root, args.seed)
        print(f"wrote 512x512x{SLICES} CT series + RTSTRUCT in {time.perf_counter() - started:.1f} s")
        times = []
        for n in range(args.repeat):
            started = time.perf_counter()
            result = import_dicom(root, Path(work) / f"out{n}")
            times.append(time.perf_counter() - started)
            if [r.status for r in result.rows] != [IMPORTED]:
                print(f"import failed: {result.rows}", file=sys.stderr)
                return 1
    best, median = min(times), float(np.median(times))
    verdict = "meets" if median <= TARGET_S else "MISSES"
    print(f"import of 1 CT series (512x512x{SLICES}) + RTSTRUCT (6 organs): best {best:.2f} s, median "
          f"{median:.2f} s over {len(times)} run(s); {verdict} the {TARGET_S:.0f} s target")
    return 0 if median <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
