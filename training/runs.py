"""What every training script shares: the run's configuration, provenance, checkpoints, logs and export.

- configuration: the script's DEFAULTS, a YAML file on top, ``--set KEY=VALUE``
  overrides on top of that; unknown keys are refused (`load_config`);
- provenance: the git commit a run was trained from (`git_commit`);
- checkpoints: the network and optimiser state as safetensors, the rest as JSON
  (no pickles), so that ``--resume`` continues exactly (`save_checkpoint`,
  `load_checkpoint`, `resume_checkpoint`);
- logs: ``log.csv`` and ``curves.png`` in the run folder (`write_log`), and
  TensorBoard scalars when tensorboard is installed (`tensorboard_writer`);
- export: the best checkpoint as a model package's weights and the
  ``model.json`` parts every package records (`best_weights`, `package_header`,
  `training_record`);
- the command line: the options, the start of a run and its error handling;
- several processes (torchrun): the writers here write on rank 0 only, `log` is rank 0's, the
  process group is joined by `start_run` and left by `run_command` (see `training.distributed`).

Every file goes through `segcore.files`, so a crash never leaves half of one.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from segcore.errors import SegcoreError
from segcore.files import atomic_output, write_json, write_text

from . import distributed

REPO = Path(__file__).resolve().parents[1]

# Sections whose keys are checked by the constructors they feed (network arguments, losses, ...), not here.
FREE_FORM = ("arguments", "metric", "pipeline", "augment", "loss", "objective")


# --------------------------------------------------------------------------- configuration


def merge(base: dict, update: dict) -> dict:
    """``update`` over a copy of ``base``, nested dictionaries merged key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def unknown_keys(config: dict, defaults: dict, where: str = "") -> list[str]:
    """Dotted names of the keys of ``config`` that ``defaults`` does not have (free-form sections aside)."""
    problems = []
    for key, value in config.items():
        if key not in defaults:
            problems.append(f"{where}{key}")
        elif isinstance(defaults[key], dict) and isinstance(value, dict) and key not in FREE_FORM:
            problems += unknown_keys(value, defaults[key], f"{where}{key}.")
    return problems


def known_part(config: dict, defaults: dict) -> dict:
    """``config`` without the keys ``defaults`` does not have (free-form sections kept whole): a
    configuration recorded by another version of a script, made loadable by this one."""
    out = {}
    for key, value in config.items():
        if key not in defaults:
            continue
        if isinstance(defaults[key], dict) and isinstance(value, dict) and key not in FREE_FORM:
            out[key] = known_part(value, defaults[key])
        else:
            out[key] = value
    return out


def load_config(path: str | None, overrides: list[str], defaults: dict, script: str) -> dict:
    """``defaults``, the YAML file at ``path`` merged over them, then each ``KEY.SUB=VALUE`` override
    (the value read as YAML). Unknown keys raise a SegcoreError that points to ``script``'s DEFAULTS."""
    import yaml

    config = copy.deepcopy(defaults)
    if path:
        text = Path(path).read_text()
        config = merge(config, yaml.safe_load(text) or {})
    for item in overrides:
        key, _, value = item.partition("=")
        if not _:
            raise SegcoreError(f"--set needs KEY=VALUE, got {item!r}")
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    unknown = unknown_keys(config, defaults)
    if unknown:
        raise SegcoreError(f"unknown configuration keys: {', '.join(unknown)} (see DEFAULTS in {script} "
                           "for the names)")
    return config


def write_config(outdir: Path, config: dict) -> None:
    """The run's full configuration as ``config.json`` in the run folder (rank 0's)."""
    if not distributed.is_main():
        return
    write_json(outdir / "config.json", config, overwrite=True, indent=1)


def git_commit() -> str | None:
    """The commit of this checkout, with ``-dirty`` when tracked files are modified; None without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# --------------------------------------------------------------------------- checkpoints (no pickles)


def save_checkpoint(folder: Path, name: str, network, optimizer, state: dict) -> None:
    """``<name>.safetensors`` (network as ``model.*``, optimiser tensors as ``optim.<index>.*``) and
    ``<name>.json`` (``state``) in ``folder``."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    for index, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            if hasattr(value, "shape"):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
    with atomic_output(folder / f"{name}.safetensors", overwrite=True) as tmp:
        save_file(tensors, str(tmp))
    # Histories may hold NaN metrics (no organ predicted); json writes them as NaN and reads them back.
    write_text(folder / f"{name}.json", json.dumps(state, indent=1), overwrite=True)


def load_checkpoint(folder: Path, name: str, network, optimizer) -> dict:
    """Load a checkpoint into ``network`` (and ``optimizer`` unless None); its JSON state."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"{name}.safetensors"))
    network.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        optim_state = optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, field_name = key.split(".", 2)
                optim_state["state"].setdefault(int(index), {})[field_name] = value
        optimizer.load_state_dict(optim_state)
    return json.loads((folder / f"{name}.json").read_text())


def resume_checkpoint(folder: Path, network, optimizer, resume: bool, restart: bool, what: str) -> dict | None:
    """The state of the last checkpoint in ``folder`` when resuming (loaded into the network and the
    optimiser), else None. A fresh start over an existing ``what`` (e.g. "stage2 run") is refused unless
    ``restart``, so that no checkpoint is replaced by accident."""
    if not resume and not restart and (folder / "last.json").is_file():
        raise SegcoreError(f"{folder} already holds a {what}: continue it with --resume, or start "
                           "again from scratch with --restart (its checkpoints are then replaced)")
    if resume and (folder / "last.json").is_file():
        return load_checkpoint(folder, "last", network, optimizer)
    return None


def keep_checkpoints(folder: Path, network, optimizer, state: dict, improved: bool) -> None:
    """``last`` after every validation, and ``best`` too when the validation improved (rank 0 writes them;
    ``network`` unwrapped from DDP, so that the names are a single process's)."""
    if not distributed.is_main():
        return
    network = distributed.unwrap(network)
    if improved:
        save_checkpoint(folder, "best", network, optimizer, state)
    save_checkpoint(folder, "last", network, optimizer, state)


def checkpoint_reached(folder: Path, key: str, goal: int) -> bool:
    """Whether the last checkpoint in ``folder`` is at ``goal``: ``key`` "epoch" (counted from 0) or
    "iteration" (counted from 1)."""
    path = folder / "last.json"
    if not path.is_file():
        return False
    done = json.loads(path.read_text())[key]
    return (done + 1 if key == "epoch" else done) >= goal


def finite_dsc(validation: dict) -> float:
    """The validation's mean DSC, 0 when it is undefined (NaN: nothing to compare)."""
    return validation["dsc"] if math.isfinite(validation["dsc"]) else 0.0


# --------------------------------------------------------------------------- logs


@dataclass
class EpochRecord:
    """One row of the run's log: a validation after ``iterations`` training iterations."""

    stage: str
    epoch: int
    iterations: int
    lr: float
    seconds: float
    losses: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)

    def row(self) -> dict:
        out = {"stage": self.stage, "epoch": self.epoch, "iterations": self.iterations, "lr": f"{self.lr:.6g}",
               "seconds": f"{self.seconds:.1f}"}
        out.update({f"loss_{k}": f"{v:.6g}" for k, v in self.losses.items()})
        out.update({f"val_{k}": f"{v:.6g}" for k, v in self.validation.items()})
        return out


def write_log(outdir: Path, records: list[EpochRecord], draw: Callable) -> None:
    """``log.csv`` (one row per record) and ``curves.png``, whose two side-by-side plots ``draw(axes)``
    fills (the curves are skipped when matplotlib is not installed). Rank 0's."""
    if not distributed.is_main():
        return
    rows = [r.row() for r in records]
    write_csv(outdir / "log.csv", rows, list(dict.fromkeys(k for row in rows for k in row)))
    draw_figure(outdir / "curves.png", 2, draw, (10, 4))


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Rows of a table as a CSV file with a header."""
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def draw_figure(path: Path, panels: int, draw: Callable, size: tuple) -> None:
    """A PNG of ``panels`` side-by-side plots that ``draw(axes)`` fills, gridded; nothing when matplotlib
    is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    try:
        draw(axes[0])
        for ax in axes[0]:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_output(path, overwrite=True) as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)


def tensorboard_writer(folder: Path):
    """A TensorBoard writer into ``folder/tensorboard``, or None when tensorboard is not installed (or on
    ranks other than 0)."""
    if not distributed.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def write_scalars(writer, losses: dict, validation: dict, step: int) -> None:
    """The losses (``loss/*``) and validation metrics (``val/*``) at ``step``; nothing without a writer."""
    if writer is None:
        return
    for key, value in {**{f"loss/{k}": v for k, v in losses.items()},
                       **{f"val/{k}": v for k, v in validation.items()}}.items():
        writer.add_scalar(key, value, step)


# --------------------------------------------------------------------------- export


def best_weights(architecture: str, arguments: dict, folder: Path, fp16: bool,
                 checkpoint: str = "best") -> tuple[dict, dict]:
    """A checkpoint in ``folder`` (``best``, or ``last``) as a package stores it: the network's weights only
    (no optimiser state; fp16 when asked), and the checkpoint's state."""
    import torch

    from segcore import networks

    if checkpoint not in ("best", "last"):
        raise SegcoreError(f"export.checkpoint must be 'best' or 'last', not {checkpoint!r}")
    network = networks.build(architecture, arguments)
    state = load_checkpoint(folder, checkpoint, network, None)
    dtype = torch.float16 if fp16 else torch.float32
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in network.state_dict().items()}
    return weights, state


def start_from_package(network, package_name_or_path: str | None, stage: str | None) -> None:
    """Load a package stage's weights into a freshly built ``network`` (``init_package``: fine-tuning starts
    from them); nothing when no package is named. The shapes must match, which the network's arguments
    (taken from the same package) ensure."""
    if not package_name_or_path:
        return
    from segcore import networks
    from segcore.packages import open_package

    package = open_package(package_name_or_path)
    networks.load_state(network, package.load_weights(stage), f"model package {package.name!r} {stage or ''}")


def best_record(history: list[dict]) -> dict:
    """The history's record with the best validation DSC."""
    return max(history, key=lambda r: r["validation"].get("dsc", -1))


def exported_record(history: list[dict], checkpoint: str) -> dict:
    """The record of the checkpoint a package is made from: the best one, or the last."""
    return history[-1] if checkpoint == "last" else best_record(history)


def rounded(validation: dict) -> dict:
    """Metrics as model.json records them: 4 decimals, None where undefined."""
    return {k: round(v, 4) if math.isfinite(v) else None for k, v in validation.items()}


def package_header(config: dict, task: str) -> dict:
    """The first fields of an exported package's model.json."""
    return {"name": config["name"], "version": str(config["version"]), "task": task,
            "description": config["description"], "licence": config["licence"]}


def training_record(config: dict, data_text: str, **details) -> dict:
    """model.json's ``training`` block: data, seed, commit, the script's ``details`` and the configuration
    (without the machine's folders)."""
    return {"data": data_text, "seed": int(config["seed"]), "commit": git_commit(), **details,
            "config": {k: v for k, v in config.items() if k not in ("output", "cache")}}


# --------------------------------------------------------------------------- command line


def log(message: str) -> None:
    """Progress of a run, on stderr (rank 0's only: the other ranks are quiet)."""
    if not distributed.is_main():
        return
    print(message, file=sys.stderr, flush=True)


def add_run_options(parser: argparse.ArgumentParser, set_example: str) -> argparse.ArgumentParser:
    """The options every training script has (its own ones are added by the script)."""
    parser.add_argument("--config", help="YAML configuration (missing keys take the defaults in this script)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one setting, e.g. --set {set_example} (repeatable)")
    parser.add_argument("--output", help="run folder (checkpoints, log.csv, curves.png); default from the config")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoints in the run folder")
    parser.add_argument("--restart", action="store_true",
                        help="train again from scratch over an existing run's checkpoints")
    parser.add_argument("--export", metavar="FOLDER", help="package folder to export to (default <output>/package)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing exported package")
    parser.add_argument("--device", help="auto, cpu or cuda (default from the config)")
    return parser


@dataclass
class Run:
    """A run as the command line starts it: its configuration, folder, device and package folder."""

    config: dict
    outdir: Path
    device: object
    target: Path


def start_run(args: argparse.Namespace, defaults: dict, script: str) -> Run:
    """The configuration (with ``--output``), the run folder (made), the device, and the package folder,
    checked not to exist unless ``--overwrite`` (before training, so that no training is wasted). Under
    torchrun, the process group is joined here and the device is this rank's."""
    from segcore.pipeline import resolve_device

    config = load_config(args.config, args.set, defaults, script)
    if args.output:
        config["output"] = args.output
    outdir = Path(config["output"])
    outdir.mkdir(parents=True, exist_ok=True)
    device = distributed.start(resolve_device(args.device or config["device"]))
    target = Path(args.export) if args.export else outdir / "package"
    if target.exists() and not args.overwrite:
        raise SegcoreError(f"{target} exists: choose another --export folder or add --overwrite "
                           "(checked before training, so that no training is wasted)")
    return Run(config, outdir, device, target)


def run_deterministic_command(body: Callable[[], int]) -> int:
    """`run_command`, with torch's deterministic-algorithms setting (which a training run sets for the CPU)
    put back as it was afterwards."""
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return run_command(body)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def run_command(body: Callable[[], int]) -> int:
    """A script's exit status: ``body()``'s, or 1 with a one-line error for a SegcoreError, a wrong key in
    a free-form configuration section (the TypeError of the constructor it feeds) or the loss of the other
    training processes. A process group joined by the run is left in every case."""
    try:
        code = body()
        distributed.stop(finished=True)
        return code
    except SegcoreError as error:
        print(f"error: {where()}{error}", file=sys.stderr)
        return 1
    except TypeError as error:  # a wrong key in a free-form section (network arguments, loss, augment)
        print(f"error: {where()}bad configuration: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        message = distributed.describe(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        distributed.stop()


def where() -> str:
    """``rank R/N: `` in front of the errors of a process other than rank 0 under torchrun, else nothing."""
    world = distributed.world()
    return f"rank {world.rank}/{world.size}: " if world.distributed and not world.main else ""
