"""What the evaluation scripts share: held-out phantoms run through a segmenter, summary statistics,
the labels of the real CT's TotalSegmentator reference, the held-out summary recorded in a package's
model.json, and the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from segcore import metrics
from segcore.errors import SegcoreError
from segcore.files import write_text

# TotalSegmentator v1 labels of the reference map of the real pelvic CT.
TS_BLADDER, TS_FEMUR_LEFT, TS_FEMUR_RIGHT, TS_COLON = 104, 88, 89, 57
TS_HIP_LEFT, TS_HIP_RIGHT = 90, 91


# --------------------------------------------------------------------------- held-out phantoms


def held_out_phantoms(segmenter, seed: int, cases: int, matrix: int = 512) -> Iterator[tuple]:
    """(seed, phantom, result, seconds) for the phantoms of seeds ``seed`` .. ``seed + cases - 1``, each
    segmented (and timed) on its own grid."""
    from segcore.phantom import make_phantom

    for n in range(cases):
        case = make_phantom(seed + n, matrix=matrix)
        tick = time.perf_counter()
        result = segmenter(case.ct)
        yield seed + n, case, result, time.perf_counter() - tick


def phantom_scores(result, case, value: int, keys) -> dict:
    """The ``keys`` of the mask metrics of one label value: the result's label map against the phantom's
    labels, on the phantom's grid."""
    score = metrics.mask_metrics(sitk.GetArrayViewFromImage(result.labelmap) == value,
                                 sitk.GetArrayViewFromImage(case.labels) == value, case.ct.GetSpacing()[::-1])
    return {k: getattr(score, k) for k in keys}


def mean_sd(values) -> dict:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def rounded_mean_sd(stats: dict) -> dict:
    """A `mean_sd` as model.json records it, to 4 decimals."""
    return {"mean": round(stats["mean"], 4), "sd": round(stats["sd"], 4)}


# --------------------------------------------------------------------------- model.json


def record_in_package(folder: Path, out: dict, metric_grid: str, summary: dict) -> None:
    """Add an evaluation's held-out summary to model.json: its seeds, case count, matrix, the grid the
    metrics were computed on, and ``summary``."""
    record_held_out(folder, {"seeds": out["seeds"], "cases": len(out["cases"]), "matrix": out["matrix"],
                             "metric_grid": metric_grid, **summary})


def record_held_out(folder: Path, held_out: dict) -> None:
    """Write ``validation.held_out_phantoms`` into model.json (not hashed: only weights files are) and
    re-validate the package."""
    from segcore.packages import MANIFEST_NAME, ModelPackage

    path = Path(folder) / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["validation"]["held_out_phantoms"] = held_out
    write_text(path, json.dumps(manifest, indent=1), overwrite=True)
    ModelPackage.load(folder)


# --------------------------------------------------------------------------- command line


def evaluation_parser(prog: str, description: str, seed: int, phantoms_help: str,
                      real_help: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, Any]:
    """The options both evaluation scripts have: the model, the device, the JSON output, and the
    ``phantoms`` and ``real`` commands. The parser, the ``real`` command's (for options of its own) and
    the commands' (for commands of its own)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", help="model package (default: the bundled default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write the results here")
    sub = parser.add_subparsers(dest="what", required=True)
    phantoms = sub.add_parser("phantoms", help=phantoms_help)
    phantoms.add_argument("--seed", type=int, default=seed)
    phantoms.add_argument("--cases", type=int, default=20)
    phantoms.add_argument("--matrix", type=int, default=512)
    phantoms.add_argument("--record", action="store_true",
                          help="also write the summary into the package's model.json (validation.held_out_phantoms)")
    real = sub.add_parser("real", help=real_help)
    real.add_argument("ct", type=Path)
    real.add_argument("reference", type=Path)
    real.add_argument("--picture", type=Path, help="also draw the result here (PNG)")
    return parser, real, sub


def write_results(path: Path | None, out: dict) -> None:
    """The results as JSON at ``path`` (when given); NaN stays NaN, NumPy numbers become floats."""
    if path:
        write_text(path, json.dumps(out, indent=1, default=float), overwrite=True)


def run_command(body: Callable[[], int]) -> int:
    """``body()``'s exit status, or 1 with a one-line error for a SegcoreError."""
    try:
        return body()
    except SegcoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
