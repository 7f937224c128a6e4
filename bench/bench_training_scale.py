"""Training steps per second with 1 and 2 processes (torchrun, DistributedDataParallel).

    python bench/bench_training_scale.py --json out/bench_training_scale.json
    python bench/bench_training_scale.py --device cuda --processes 1 2 4     # on a machine with GPUs

For each job (train_prostate's stage 2, train_hmrnet) and each process count N, one fresh
``python -m torch.distributed.run --standalone --nproc_per_node=N`` runs the job's real training
function (`train_prostate.train_stage`, `train_hmrnet.train`) on small phantoms, with the settings of
the job below; rank 0 notes the time of every step (the ``on_iteration`` callback) and the rate is
taken over the steps after ``--warmup``, so case preparation, DDP start-up and validation are left out.
A step is one optimiser step on the configured (global) batch: with N processes each takes about
batch / N of it, so steps per second compare like with like. On the CPU the cores are shared out:
each of N processes gets ``--threads`` / N intra-op threads (OMP_NUM_THREADS and torch), so a 2-process
run uses no more cores than a 1-process one. CUDA figures (``--device cuda``) are printed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each job's settings over the script's DEFAULTS: stage 2 as configured by default (MetricUNet, 64x64x3
# patches, batch 16); HMR-Net with a ResNet-18 backbone on 128-pixel slices, batch 4 (the paper's
# ResNet-50 on 256 pixels is too slow to time on a CPU).
JOBS = {
    "prostate-stage2": ["data.cases=2", "data.validation_cases=1", "data.matrix=128", "stage2.epochs=1",
                        "stage2.batch_size=16"],
    "hmrnet": ["data.cases=2", "data.validation_cases=1", "data.matrix=128", "batch_size=4", "pipeline.size=128",
               ("arguments={num_classes: 6, in_channels: 1, depth: 18, points: 50, "
                "anchor_sizes: [16, 32, 64, 128]}")],
}


# --------------------------------------------------------------------------- one rank (under torchrun)


def prostate_worker(settings: list[str], steps: int, device: str, workdir: Path, on_step) -> None:
    from segcore.pipeline import resolve_device
    from training import data, distributed, runs
    from training import train_prostate as tp

    config = runs.load_config(None, settings + [f"cache={workdir / 'cache'}"], tp.DEFAULTS, "bench")
    config["stage2"]["patches_per_case"] = -(-steps * config["stage2"]["batch_size"] // config["data"]["cases"])
    dev = distributed.start(resolve_device(device))
    pipeline = tp.pipeline_settings(config)
    train_sources, val_sources, _ = data.case_sources(config)
    train_cases = distributed.main_first(lambda: tp.prepare(train_sources, pipeline, config, runs.log))
    val_cases = tp.prepare(val_sources, pipeline, config, runs.log) if distributed.is_main() else []
    tp.train_stage("stage2", config, train_cases, val_cases, pipeline, dev, workdir / "run", False, runs.log,
                   restart=True, on_iteration=on_step)


def hmrnet_worker(settings: list[str], steps: int, device: str, workdir: Path, on_step) -> None:
    from segcore.pipeline import resolve_device
    from training import data, distributed, runs
    from training import train_hmrnet as th

    config = runs.load_config(None, settings + [f"cache={workdir / 'cache'}", f"iterations={steps}",
                                                f"validate_every={steps}"], th.DEFAULTS, "bench")
    dev = distributed.start(resolve_device(device))
    organ_settings = th.settings_of(config)
    train_sources, val_sources, _ = data.case_sources(config)
    train_cases = distributed.main_first(lambda: th.prepare(train_sources, organ_settings, config, runs.log))
    val_cases = th.prepare(val_sources, organ_settings, config, runs.log) if distributed.is_main() else []
    th.train(config, train_cases, val_cases, organ_settings, dev, workdir / "run", False, True, runs.log,
             on_iteration=on_step)


def worker(args) -> int:
    """One rank of a timed run: train, note each step's time, and (rank 0) write the rate to ``--result``."""
    import torch

    from training import distributed

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    times: list[float] = []
    run = prostate_worker if args.worker == "prostate-stage2" else hmrnet_worker
    try:
        run(JOBS[args.worker], args.steps, args.device, args.workdir, lambda done, total: times.append(time.perf_counter()))
        if distributed.is_main():
            timed = times[args.warmup:]
            rate = (len(timed) - 1) / (timed[-1] - timed[0])
            args.result.write_text(json.dumps({"steps_per_s": rate, "steps": len(timed) - 1,
                                               "world": distributed.world().size}))
    finally:
        distributed.stop()
    return 0


# --------------------------------------------------------------------------- the driver


def measure(job: str, processes: int, args, workdir: Path) -> dict:
    """One fresh torchrun of ``job`` on ``processes`` processes; its steps per second and command."""
    result = workdir / f"{job}-{args.device}-{processes}.json"
    result.unlink(missing_ok=True)
    threads = max(1, args.threads // processes) if args.device == "cpu" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "bench/bench_training_scale.py", "--worker", job, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device,
               "--workdir", str(workdir / f"{job}-{processes}"), "--result", str(result)]
    tick = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                   stderr=None if args.verbose else subprocess.DEVNULL)
    out = json.loads(result.read_text())
    out.update(threads_per_process=threads, wall_s=round(time.perf_counter() - tick, 1),
               command=f"OMP_NUM_THREADS={threads} python " + " ".join(command[1:]))
    return out


def table(results: dict, device: str) -> str:
    lines = [f"device {device}: training steps per second (global batch; after warm-up)",
             f"{'job':18s} {'processes':>9s} {'threads/proc':>12s} {'steps/s':>9s} {'speed-up':>9s}"]
    for job, per_count in results.items():
        one = per_count.get(1, {}).get("steps_per_s")
        for count, r in sorted(per_count.items()):
            gain = f"{r['steps_per_s'] / one:8.2f}x" if one else "        -"
            lines.append(f"{job:18s} {count:9d} {r['threads_per_process']:12d} {r['steps_per_s']:9.3f} {gain:>9s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", nargs="+", choices=tuple(JOBS), default=list(JOBS))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the rate")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads shared out between the processes (default: all cores)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench-ddp")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--verbose", action="store_true", help="show the runs' own logs")
    parser.add_argument("--worker", choices=tuple(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(REPO))
        return worker(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {job: {n: measure(job, n, args, args.workdir) for n in args.processes} for job in args.jobs}
    print(table(results, args.device))
    for job, per_count in results.items():
        for count, r in sorted(per_count.items()):
            print(f"{job} x{count}: {r['command']}")
    print("command: python bench/bench_training_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({args.device: results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
