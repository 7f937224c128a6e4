"""What the pipeline benchmarks share: the test CT, fresh-process runs and the CLI run.

Every measurement runs in a fresh process so that its peak memory (ru_maxrss)
is its own and no import or model load is shared between runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLICES = 150


def make_ct(workdir: Path, seed: int) -> Path:
    """The benchmark CT: phantom `seed` at 512 x 512, 0.95 x 0.95 x 2 mm, cut or padded to 150 slices."""
    path = workdir / f"bench_ct_seed{seed}_512x512x{SLICES}.nii.gz"
    if path.is_file():
        return path
    code = f"""
import numpy as np, SimpleITK as sitk
from segcore.phantom import make_phantom
case = make_phantom({seed}, matrix=512, spacing=(0.95, 0.95, 2.0), orientation="LPS")
a = sitk.GetArrayFromImage(case.ct)
if a.shape[0] >= {SLICES}:
    start = (a.shape[0] - {SLICES}) // 2
    a = a[start:start + {SLICES}]
    origin = case.ct.TransformIndexToPhysicalPoint([0, 0, start])
else:
    a = np.concatenate([a, np.full(({SLICES} - a.shape[0],) + a.shape[1:], -1024, a.dtype)])
    origin = case.ct.GetOrigin()
img = sitk.GetImageFromArray(a)
img.SetSpacing(case.ct.GetSpacing()); img.SetDirection(case.ct.GetDirection()); img.SetOrigin(origin)
sitk.WriteImage(img, r"{path}", True)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def _like(array, image):
    import SimpleITK as sitk

    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def _with_slices(image, count: int, fill: int):
    """The middle `count` slices, or the image padded with `fill` after its last slice up to `count`."""
    import numpy as np
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    if len(array) >= count:
        start = (len(array) - count) // 2
        return image[:, :, start:start + count]
    padding = np.full((count - len(array),) + array.shape[1:], fill, array.dtype)
    padded = sitk.GetImageFromArray(np.concatenate([array, padding]))
    padded.SetSpacing(image.GetSpacing())
    padded.SetOrigin(image.GetOrigin())
    padded.SetDirection(image.GetDirection())
    return padded


def make_dicom_case(workdir: Path, seed: int) -> tuple[Path, Path]:
    """Phantom `seed` at 512 x 512 x 150 (0.95 x 0.95 x 2 mm) as a DICOM CT series and its six organs as a
    label map (cached in `workdir`): what the DICOM benchmarks write and read."""
    import shutil

    import SimpleITK as sitk

    from segcore.dicom.ct import write_ct_series
    from segcore.phantom import make_phantom

    folder, labels_path = workdir / f"dicom_seed{seed}", workdir / f"dicom_seed{seed}_labels.nii.gz"
    if labels_path.is_file():
        return folder, labels_path
    case = make_phantom(seed, matrix=512, spacing=(0.95, 0.95, 2.0), orientation="LPS", implant=False)
    ct, organs = (_with_slices(image, SLICES, fill) for image, fill in ((case.ct, -1024), (case.labels, 0)))
    array = sitk.GetArrayFromImage(organs)
    array[array > 6] = 0
    organs = _like(array, organs)
    shutil.rmtree(folder, ignore_errors=True)
    write_ct_series(ct, folder, seed=f"bench{seed}")
    sitk.WriteImage(organs, str(labels_path), True)
    return folder, labels_path


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs per measurement (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--model", help="model package (default: the bundled default)")
    parser.add_argument("--seed", type=int, default=2, help="phantom seed of the test CT (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)


def measure_segmenter(make_segmenter, ct: str) -> tuple[object, dict]:
    """In a child process: load a model, segment `ct` once; the result and the load time, the pipeline's
    timings, peak RSS (MB) and torch's thread count."""
    tick = time.perf_counter()
    segmenter = make_segmenter()
    loaded = time.perf_counter() - tick
    result = segmenter(ct)
    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result, {"load_model": loaded, **result.timings, "peak_mb": peak, "threads": torch.get_num_threads()}


def run_child(script: str, args_list) -> dict:
    """Run `script --child ...` in a fresh process; its last stdout line is a JSON object."""
    out = subprocess.run([sys.executable, script, *args_list], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cli(command: str, ct: Path, device: str, model: str | None) -> dict:
    """`prostateseg -q COMMAND ct -o <tmp>` end to end: seconds and the largest child's peak RSS so far."""
    with tempfile.TemporaryDirectory() as out:
        line = [str(Path(sys.executable).with_name("prostateseg")), "-q", command, str(ct), "-o", out,
                "--device", device]
        if model:
            line += ["--model", model]
        tick = time.perf_counter()
        subprocess.run(line, check=True, capture_output=True)
        seconds = time.perf_counter() - tick
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_mb": peak / 1024}
