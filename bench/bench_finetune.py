"""Fine-tuning, measured: the convention-shift experiment and the forgetting check, with wall times.

    python bench/bench_finetune.py --json out/bench_finetune.json

1. Convention shift: phantoms whose reference prostate includes the proximal 10 mm
   of the seminal vesicles (``prostateseg phantom --prostate-sv-mm 10``). The base
   model is fine-tuned on 10 of them (seeds 9400-9409) and both models are scored
   on 20 held-out ones of the same convention (seeds 9420-9439).
2. Forgetting: fine-tuned on 10 standard phantoms (seeds 9440-9449), both models
   are scored on the standard held-out phantoms 9200-9219 (those of the bundled
   models' own evaluation).
3. Ten cases: a clinic's first fine-tune with the defaults, timed: 10 standard
   phantoms (seeds 9460-9469) in one folder, 2 of them held out by the command.

Each fine-tune is one run of ``python -m training.finetune`` in a fresh process
(``--validation`` gives the held-out phantoms), timed from start to exported
package. None of these seeds is used by any training or evaluation elsewhere.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EXPERIMENTS = {
    "convention": {"train": (9400, 10), "held_out": (9420, 20), "sv_mm": 10.0},
    "forgetting": {"train": (9440, 10), "held_out": (9200, 20), "sv_mm": 0.0},
    # A clinic's first fine-tune, timed: 10 cases in one folder, the command's own split (8 + 2).
    "ten_cases": {"train": (9460, 10), "held_out": None, "sv_mm": 0.0},
}


def phantoms(folder: Path, seed: int, count: int, sv_mm: float, size: int) -> Path:
    """The phantom cases (made once, then reused)."""
    if not (folder / "labels.json").is_file():
        subprocess.run([sys.executable, "-m", "segcore.cli", "-q", "phantom", str(folder), "-n", str(count),
                        "--seed", str(seed), "--size", str(size), "--prostate-sv-mm", str(sv_mm)],
                       check=True, cwd=REPO)
    return folder


def run(name: str, spec: dict, args, workdir: Path) -> dict:
    size = args.size
    train = phantoms(workdir / f"{name}_train", *spec["train"], spec["sv_mm"], size)
    outdir = workdir / f"{name}_run"
    command = [sys.executable, "-m", "training.finetune", "--model", args.model, "--data", str(train),
               "--export", str(workdir / f"{name}_package"), "--overwrite",
               "--iterations", str(args.iterations), "--stages", args.stages, "--output", str(outdir),
               "--name", f"bench-{name}"]
    if spec["held_out"]:
        held = phantoms(workdir / f"{name}_held_out", *spec["held_out"], spec["sv_mm"], size)
        command += ["--validation", str(held)]
    if (outdir / "split.json").is_file():
        command.append("--resume")
    tick = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    seconds = time.perf_counter() - tick
    summary = json.loads((outdir / "summary.json").read_text())
    out = {"seconds": round(seconds, 1), "command": " ".join(command[1:]), "held_out": summary["held_out"]}
    for model in ("base", "tuned"):
        out[f"{model}_dsc"] = summary["held_out"][model]["prostate"]["dsc"]["mean"]
    out["gain"] = round(out["tuned_dsc"] - out["base_dsc"], 4)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="prostate-metricunet-demo")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--stages", default="stage2")
    parser.add_argument("--size", type=int, default=512, help="phantom matrix")
    parser.add_argument("--only", choices=tuple(EXPERIMENTS), help="run one experiment")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench-finetune")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, spec in EXPERIMENTS.items():
        if args.only and name != args.only:
            continue
        results[name] = run(name, spec, args, args.workdir)
        r = results[name]
        print(f"{name}: base DSC {r['base_dsc']:.4f}, tuned DSC {r['tuned_dsc']:.4f}, gain {r['gain']:+.4f} "
              f"({r['seconds']:.0f} s)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
