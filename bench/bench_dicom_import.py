"""Importing one CT series with its RT Structure Set (`prostateseg dataset import`): target <= 5 s.

The series: phantom `--seed` at 512 x 512, 0.95 x 0.95 x 2 mm, 150 slices (bench_common.make_dicom_case);
its six organs as an RTSTRUCT from `write_rtstruct`. Each run imports the tree into a fresh output folder (walk, CT read and checks, rasterising, writing NIfTI and the report).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import SLICES, make_dicom_case

TARGET_S = 5.0


def make_tree(root: Path, workdir: Path, seed: int) -> None:
    """The benchmark CT series (bench_common) copied into `root` with an RTSTRUCT of its six organs."""
    import shutil

    from segcore import anatomy
    from segcore.dicom.ct import ct_series_for
    from segcore.dicom.rtstruct import write_rtstruct
    from segcore.image import read_image

    folder, labels_path = make_dicom_case(workdir, seed)
    shutil.copytree(folder, root / "ct")
    ct = read_image(root / "ct")
    organs = sitk.Resample(sitk.ReadImage(str(labels_path)), ct, sitk.Transform(), sitk.sitkNearestNeighbor)
    write_rtstruct(organs, [anatomy.BY_NAME[n] for n in anatomy.TARGET_NAMES], ct_series_for(ct, root / "ct"),
                   root / "rs.dcm")


def main(argv=None) -> int:
    from segcore.dicom.importer import IMPORTED, import_dicom

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="imports to time (default 3)")
    parser.add_argument("--seed", type=int, default=2, help="phantom seed (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench",
                        help="where the benchmark CT series is cached")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "dicom"
        started = time.perf_counter()
        make_tree(root, args.workdir, args.seed)
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
