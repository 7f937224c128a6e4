"""Train the two-stage prostate pipeline (stage-1 localiser and stage-2 network) and export a model package.

    python -m training.train_prostate --config training/configs/metricunet.yaml
    python -m training.train_prostate --config ... --resume          # continue an interrupted run
    python -m training.train_prostate --config ... --set stage2.epochs=2 --output out/try

Each stage trains on 2.5-D patches (64x64x5 on the coarse grid, 64x64x3 on the
1 mm crop), with SGD and poly learning-rate decay, validates every epoch (DSC and
ASD on held-out cases), keeps a checkpoint per epoch (safetensors + JSON, so a
run resumes exactly), writes ``log.csv`` and ``curves.png`` (and TensorBoard
scalars when tensorboard is installed), and finally exports a model package.
Runs are seeded and deterministic on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from segcore import anatomy, metrics, networks
from segcore.errors import SegcoreError
from segcore.prostate import PipelineSettings, normalise, predict_slices

from . import data

STAGES = ("stage1", "stage2")
REPO = Path(__file__).resolve().parents[1]

DEFAULTS = {
    "name": "prostate-metricunet",
    "version": "1.0",
    "description": "Two-stage prostate segmentation (stage-1 U-Net localiser, MetricUNet stage 2).",
    "licence": "Apache-2.0",
    "seed": 0,
    "device": "auto",
    "output": "out/train/prostate-metricunet",
    "cache": "out/cache",
    "data": {"source": "phantom", "seed": 1000, "cases": 40, "validation_seed": 5000, "validation_cases": 4,
             "matrix": 512, "folder": None, "validation_folder": None, "prostate_label": 1},
    "pipeline": {},
    # What stage 2 segments, by catalogue name: class k is organs[k - 1] (HMEDN: prostate, bladder, rectum).
    "organs": ["prostate"],
    "margin_mm": 32.0,
    "workers": 1,
    "augment": {},
    "stage1": {
        "architecture": "unet2p5d",
        "arguments": {"in_channels": 5, "num_classes": 2, "widths": [16, 32, 64, 128]},
        # Background patches come from the whole scan, so that stage 1 learns what is not prostate.
        "patch": {"size": 64, "slices": 5, "foreground_fraction": 0.5, "jitter": 24, "z_margin": 10000,
                  "cut_probability": 0.25},
        "epochs": 10, "patches_per_case": 500, "batch_size": 32, "loss": "ce+dice",
        "objective": {},
        "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9,
        # A package folder or name whose trained stage is taken as it is instead of training one.
        "from_package": None,
    },
    "stage2": {
        "architecture": "metricunet",
        "arguments": {"in_channels": 3, "num_classes": 2},
        "metric": {},
        # Background patches reach as far beyond the prostate as inference runs stage 2 (the coarse
        # blob's extent plus slice_margin_mm).
        "patch": {"size": 64, "slices": 3, "foreground_fraction": 0.7, "jitter": 24, "z_margin": 20,
                  "cut_probability": 0.0},
        "epochs": 10, "patches_per_case": 500, "batch_size": 16, "loss": "ce",
        # The network's own loss settings (hfunet: lambdas, sigma, cold_start; hmedn: mu0, mu, delta,
        # delta2, alpha, hr_weight); see the loss functions beside each network.
        "objective": {},
        "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9,
        "from_package": None,
    },
    "export": {"fp16": True},
}


# --------------------------------------------------------------------------- configuration


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


FREE_FORM = ("arguments", "metric", "pipeline", "augment", "loss", "objective")  # checked by the constructors they feed


def unknown_keys(config: dict, defaults: dict, where: str = "") -> list[str]:
    problems = []
    for key, value in config.items():
        if key not in defaults:
            problems.append(f"{where}{key}")
        elif isinstance(defaults[key], dict) and isinstance(value, dict) and key not in FREE_FORM:
            problems += unknown_keys(value, defaults[key], f"{where}{key}.")
    return problems


def load_config(path: str | None, overrides: list[str], defaults: dict | None = None,
                script: str = "training/train_prostate.py") -> dict:
    import yaml

    defaults = DEFAULTS if defaults is None else defaults
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


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# --------------------------------------------------------------------------- data


def case_sources(config: dict) -> tuple[list[data.CaseSource], list[data.CaseSource], str]:
    spec = config["data"]
    if spec["source"] == "phantom":
        train = data.phantom_sources(spec["seed"], spec["cases"], spec["matrix"])
        val = data.phantom_sources(spec["validation_seed"], spec["validation_cases"], spec["matrix"])
        text = (f"digital pelvis phantoms (segcore.phantom), training seeds {spec['seed']}-"
                f"{spec['seed'] + spec['cases'] - 1}, validation seeds {spec['validation_seed']}-"
                f"{spec['validation_seed'] + spec['validation_cases'] - 1}, matrix {spec['matrix']}")
        return train, val, text
    if spec["source"] == "folder":
        train = data.folder_sources(spec["folder"], spec.get("prostate_label", 1))
        if spec.get("validation_folder"):
            val = data.folder_sources(spec["validation_folder"], spec.get("prostate_label", 1))
        else:
            count = max(1, spec["validation_cases"])
            if len(train) <= count:
                raise SegcoreError(f"{len(train)} cases are too few to keep {count} for validation")
            train, val = train[:-count], train[-count:]
        return train, val, f"{len(train)} training / {len(val)} validation cases from {spec['folder']}"
    raise SegcoreError(f"data.source must be 'phantom' or 'folder', not {spec['source']!r}")


def prepare(sources, settings, config, log) -> list[data.PreparedCase]:
    """Prepared cases, made (or read from the cache) by ``workers`` processes."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    make = partial(data.cached_case, settings=settings, margin_mm=config["margin_mm"], cache_dir=config["cache"])
    workers = max(1, int(config.get("workers", 1)))
    tick = time.perf_counter()
    if workers == 1 or len(sources) == 1:
        cases = []
        for n, source in enumerate(sources):
            cases.append(make(source))
            log(f"  case {n + 1}/{len(sources)} {source.case_id} ready ({time.perf_counter() - tick:.0f} s)")
        return cases
    with ProcessPoolExecutor(workers) as pool:
        cases = list(pool.map(make, sources))
    log(f"  {len(cases)} cases ready ({time.perf_counter() - tick:.0f} s)")
    return cases


def stage_arrays(case: data.PreparedCase, stage: str, config: dict):
    """(CT, tissue labels, target, spacing) of one stage; a multi-organ stage 2's target holds classes."""
    if stage == "stage1":
        return case.coarse_ct, case.coarse_tissue, case.coarse_target, case.coarse_spacing
    if len(config["organs"]) > 1:
        values = [anatomy.structure(name).value for name in config["organs"]]
        return case.fine_ct, case.fine_tissue, data.class_targets(case.fine_tissue, values), case.fine_spacing
    return case.fine_ct, case.fine_tissue, case.fine_target, case.fine_spacing


def inference_region(case: data.PreparedCase, stage: str, config: dict) -> tuple | None:
    """Stage 2 only: the part of the cached cube the inference crop covers (the cube minus its margin)."""
    if stage == "stage1":
        return None
    settings = pipeline_settings(config)
    crop = np.maximum(1, np.round(np.asarray(settings.crop_mm) / np.asarray(settings.fine_spacing_mm))).astype(int)
    starts = [(n - c) // 2 for n, c in zip(case.fine_ct.shape, crop[::-1])]  # same rounding as crop_reference
    return tuple(slice(a, a + c) for a, c in zip(starts, crop[::-1]))


# --------------------------------------------------------------------------- checkpoints (no pickles)


def save_checkpoint(folder: Path, name: str, network, optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    for index, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            if hasattr(value, "shape"):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
    tmp = folder / f".{name}.safetensors"
    save_file(tensors, str(tmp))
    tmp.replace(folder / f"{name}.safetensors")
    (folder / f".{name}.json").write_text(json.dumps(state, indent=1))
    (folder / f".{name}.json").replace(folder / f"{name}.json")


def load_checkpoint(folder: Path, name: str, network, optimizer) -> dict:
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


# --------------------------------------------------------------------------- training one stage


@dataclass
class EpochRecord:
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


def soft_dice_loss(logits, target):
    """1 - soft Dice of the foreground over the whole batch: counters the small share of prostate voxels
    in stage-1 patches, where cross-entropy alone settles on 'all background' for a long time."""
    import torch

    p = torch.softmax(logits.float(), dim=1)[:, 1]
    y = (target == 1).float()
    return 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)


def stage_loss(network, spec: dict, x, y, metric, generator, cold: bool = False) -> dict:
    """The training loss terms of one batch (with "total"), as the stage's network defines them."""
    from torch.nn import functional as F

    from segcore.networks.hfunet import hfunet_loss
    from segcore.networks.hmedn import hmedn_loss
    from segcore.networks.metricunet import metricunet_loss

    objective = {k: v for k, v in spec["objective"].items() if k != "cold_start"}
    if spec["architecture"] == "hfunet":
        output = network(x, return_all=True)
        logits, terms = output.logits, hfunet_loss(output, y, cold=cold, **objective)
    elif spec["architecture"] == "hmedn":
        output = network(x, return_all=True)
        logits, terms = output.logits, hmedn_loss(output, y, **objective)
    elif metric is not None:
        logits, features = network(x, return_features=True)
        terms = metricunet_loss(logits, features, y, metric, generator)
    else:
        logits = network(x)
        terms = {"ce": F.cross_entropy(logits.float(), y)}
        terms["total"] = terms["ce"]
    if spec.get("loss", "ce") == "ce+dice":
        terms["dice"] = soft_dice_loss(logits, y)
        terms["total"] = terms["total"] + terms["dice"]
    return terms


def validate(network, cases, stage: str, settings: PipelineSettings, config: dict, device) -> dict:
    """Mean DSC / ASD / HD95 over validation cases: the whole coarse volume (stage 1) or the slices of
    the inference crop that hold prostate, plus a margin (stage 2, crop centred on the true centroid);
    a multi-organ stage 2 runs on the whole crop, as inference does, and adds each organ's DSC ("dsc" is
    then their mean)."""
    slices_in = config[stage]["arguments"]["in_channels"]
    organs = config["organs"] if stage == "stage2" else ["prostate"]
    scores = {name: [] for name in organs}
    for case in cases:
        ct, _, target, spacing = stage_arrays(case, stage, config)
        region = inference_region(case, stage, config)
        if region is not None:
            ct, target = ct[region], target[region]
        volume = normalise(ct, settings.window)
        zs = np.flatnonzero((target == 1).any(axis=(1, 2)))
        if stage == "stage1" or len(organs) > 1:
            indices = np.arange(volume.shape[0])
        else:
            margin = round(settings.slice_margin_mm / spacing[2])
            indices = np.arange(max(0, zs.min() - margin), min(volume.shape[0], zs.max() + margin + 1))
        probabilities = np.zeros((len(organs) + 1,) + volume.shape, np.float32)
        probabilities[0] = 1.0
        probabilities[:, indices] = predict_slices(network, volume, indices, slices_in, device, batch_size=16,
                                                   classes=True).transpose(1, 0, 2, 3)
        if len(organs) == 1:
            predicted = (probabilities[1] > settings.threshold).astype(np.uint8)
        else:
            predicted = probabilities.argmax(axis=0)
        for k, name in enumerate(organs, start=1):
            scores[name].append(metrics.mask_metrics(predicted == k, target == k, spacing[::-1]))

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")
    out = {key: mean([getattr(s, attr) for name in organs for s in scores[name]])
           for key, attr in (("dsc", "dsc"), ("asd_mm", "asd"), ("hd95_mm", "hd95"))}
    if len(organs) > 1:
        out.update({f"dsc_{name}": mean([s.dsc for s in scores[name]]) for name in organs})
    return out


def train_stage(stage: str, config: dict, train_cases, val_cases, settings, device, outdir: Path,
                resume: bool, log, max_epochs: int | None = None, restart: bool = False) -> list[EpochRecord]:
    import torch

    from segcore.networks.metricunet import MetricLossConfig, VoxelMetricLoss

    spec = config[stage]
    folder = outdir / stage
    folder.mkdir(parents=True, exist_ok=True)
    seed = int(config["seed"]) + STAGES.index(stage)
    torch.manual_seed(seed)
    network = networks.build(spec["architecture"], spec["arguments"]).to(device)
    metric = None
    if spec["architecture"] == "metricunet" and spec.get("metric", {}) is not None:
        metric = VoxelMetricLoss(MetricLossConfig(**spec.get("metric", {})))
    optimizer = torch.optim.SGD(network.parameters(), lr=spec["lr"], momentum=spec["momentum"],
                                weight_decay=spec["weight_decay"])
    patch = data.PatchSpec(**spec["patch"])
    augment_spec = data.AugmentSpec(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in config["augment"].items()})
    per_epoch = math.ceil(len(train_cases) * spec["patches_per_case"] / spec["batch_size"])
    total = per_epoch * spec["epochs"]
    # HF-UNet's cold start: the first share of the iterations trains the segmentation branch alone.
    cold_iterations = round(total * float(spec["objective"].get("cold_start", 0.1))) \
        if spec["architecture"] == "hfunet" else 0
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    history: list[EpochRecord] = []
    start_epoch, best = 0, -1.0
    if not resume and not restart and (folder / "last.json").is_file():
        raise SegcoreError(f"{folder} already holds a {stage} run: continue it with --resume, or start "
                           "again from scratch with --restart (its checkpoints are then replaced)")
    if resume and (folder / "last.json").is_file():
        state = load_checkpoint(folder, "last", network, optimizer)
        start_epoch, best = state["epoch"] + 1, state["best_dsc"]
        history = [EpochRecord(**r) for r in state["history"]]
        log(f"{stage}: resuming after epoch {state['epoch'] + 1}")
    writer = _tensorboard(folder)
    stop = spec["epochs"] if max_epochs is None else min(spec["epochs"], start_epoch + max_epochs)
    for epoch in range(start_epoch, stop):
        tick = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        torch.manual_seed(seed * 1000 + epoch)
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        # Sample the epoch's patches case by case, then shuffle them across cases.
        images, tissues, targets = [], [], []
        for case in train_cases:
            ct, tissue, target, _ = stage_arrays(case, stage, config)
            i, t, y = data.sample_patches(ct, tissue, target, spec["patches_per_case"], patch, rng,
                                          inference_region(case, stage, config))
            images.append(i), tissues.append(t), targets.append(y)
        images, tissues, targets = map(np.concatenate, (images, tissues, targets))
        order = rng.permutation(len(images))
        network.train()
        sums: dict[str, float] = {}
        for b in range(per_epoch):
            iteration = epoch * per_epoch + b
            lr = spec["lr"] * (1 - iteration / total) ** spec["poly_power"]
            for group in optimizer.param_groups:
                group["lr"] = lr
            pick = order[(b * spec["batch_size"]) % len(order):][: spec["batch_size"]]
            hu, y = data.augment(images[pick], tissues[pick], targets[pick], augment_spec, rng)
            x = torch.from_numpy(normalise(hu.numpy(), settings.window)).to(device)
            y = y.to(device)
            cold = iteration < cold_iterations
            if cold_iterations:
                network.cold_start(cold)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                terms = stage_loss(network, spec, x, y, metric, generator, cold)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(terms["total"]).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                terms["total"].backward()
                optimizer.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            if (b + 1) % 50 == 0 or b + 1 == per_epoch:
                log(f"{stage} epoch {epoch + 1}/{spec['epochs']} batch {b + 1}/{per_epoch} "
                    f"loss {sums['total'] / (b + 1):.4f} lr {lr:.5f}")
        losses = {k: v / per_epoch for k, v in sums.items()}
        validation = validate(network, val_cases, stage, settings, config, device)
        record = EpochRecord(stage, epoch + 1, (epoch + 1) * per_epoch, lr, time.perf_counter() - tick,
                             losses, validation)
        history.append(record)
        log(f"{stage} epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in validation.items()))
        if writer is not None:
            for key, value in {**{f"loss/{k}": v for k, v in losses.items()},
                               **{f"val/{k}": v for k, v in validation.items()}}.items():
                writer.add_scalar(key, value, record.iterations)
        dsc = validation["dsc"] if math.isfinite(validation["dsc"]) else 0.0
        state = {"epoch": epoch, "best_dsc": max(best, dsc), "history": [asdict(r) for r in history],
                 "config": config}
        if dsc > best:
            best = dsc
            save_checkpoint(folder, "best", network, optimizer, state)
        save_checkpoint(folder, "last", network, optimizer, state)
        write_log(outdir)
    if writer is not None:
        writer.close()
    return history


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def read_history(outdir: Path) -> list[dict]:
    rows = []
    for stage in STAGES:
        path = outdir / stage / "last.json"
        if path.is_file():
            rows += json.loads(path.read_text())["history"]
    return rows


def write_log(outdir: Path) -> None:
    """log.csv (one row per stage and epoch) and curves.png (loss and validation DSC per epoch)."""
    records = [EpochRecord(**r) for r in read_history(outdir)]
    rows = [r.row() for r in records]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(outdir / "log.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for stage in STAGES:
        mine = [r for r in records if r.stage == stage]
        if not mine:
            continue
        epochs = [r.epoch for r in mine]
        axes[0].plot(epochs, [r.losses.get("total", np.nan) for r in mine], marker="o", label=stage)
        axes[1].plot(epochs, [r.validation.get("dsc", np.nan) for r in mine], marker="o", label=stage)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="validation DSC", xlabel="epoch", ylim=(0, 1))
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(outdir / "curves.png", dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- export


def export_package(config: dict, outdir: Path, target: Path, data_text: str, overwrite: bool = False):
    """A model package from the best checkpoint of each stage; model.json records provenance and validation."""
    import torch

    from segcore.packages import create_package

    settings = pipeline_settings(config)
    weights, stages, validation, epochs = {}, {}, {}, 0
    for stage in STAGES:
        spec = config[stage]
        if spec["from_package"]:
            package = open_packaged_stage(spec["from_package"], stage)
            weights[f"{stage}.safetensors"] = package.load_weights(stage)
            stages[stage] = {"architecture": spec["architecture"], "arguments": spec["arguments"],
                             "weights": f"{stage}.safetensors"}
            validation[stage] = {**package.manifest.get("validation", {}).get(stage, {}),
                                 "from_package": f"{package.name} {package.version}"}
            continue
        network = networks.build(spec["architecture"], spec["arguments"])
        state = load_checkpoint(outdir / stage, "best", network, None)
        dtype = torch.float16 if config["export"].get("fp16") else torch.float32
        weights[f"{stage}.safetensors"] = {k: v.to(dtype) if v.is_floating_point() else v
                                           for k, v in network.state_dict().items()}
        stages[stage] = {"architecture": spec["architecture"], "arguments": spec["arguments"],
                         "weights": f"{stage}.safetensors"}
        best = max(state["history"], key=lambda r: r["validation"].get("dsc", -1))
        validation[stage] = {"epoch": best["epoch"], **{k: round(v, 4) if math.isfinite(v) else None
                                                        for k, v in best["validation"].items()}}
        epochs += json.loads((outdir / stage / "last.json").read_text())["epoch"] + 1
    manifest = {
        "name": config["name"], "version": str(config["version"]), "task": "prostate",
        "description": config["description"], "licence": config["licence"],
        "stages": stages,
        "input": {"spacing_mm": list(settings.fine_spacing_mm), "intensity_window": list(settings.window),
                  "normalisation": "clip to intensity_window, scale to [0, 1]"},
        "pipeline": {k: v for k, v in settings.to_json().items() if k not in ("window", "fine_spacing_mm")},
        "labels": [anatomy.structure(name) for name in config["organs"]],
        "training": {"data": data_text, "seed": int(config["seed"]), "commit": git_commit(), "epochs": epochs,
                     "epochs_per_stage": {s: config[s]["epochs"] for s in STAGES if not config[s]["from_package"]},
                     "config": {k: v for k, v in config.items() if k not in ("output", "cache")}},
        "validation": validation,
    }
    return create_package(target, manifest, weights, overwrite=overwrite)


def open_packaged_stage(name_or_path: str, stage: str):
    """The prostate package a stage is taken from (``<stage>.from_package``), checked."""
    from segcore.packages import open_package

    package = open_package(name_or_path)
    if package.task != "prostate":
        raise SegcoreError(f"{stage}.from_package: {package.name!r} is a {package.task!r} package, not a "
                           "prostate one")
    package.stage(stage)
    return package


def adopt_packaged_stages(config: dict) -> list[str]:
    """Take the architecture and arguments of every stage that comes from a package; those stages."""
    adopted = []
    for stage in STAGES:
        if config[stage]["from_package"]:
            spec = open_packaged_stage(config[stage]["from_package"], stage).stage(stage)
            config[stage]["architecture"], config[stage]["arguments"] = spec.architecture, dict(spec.arguments)
            adopted.append(stage)
    return adopted


def pipeline_settings(config: dict) -> PipelineSettings:
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in config["pipeline"].items()}
    spec.setdefault("coarse_slices", config["stage1"]["arguments"]["in_channels"])
    spec.setdefault("fine_slices", config["stage2"]["arguments"]["in_channels"])
    return PipelineSettings(**spec)


# --------------------------------------------------------------------------- command line


def _finished(folder: Path, epochs: int) -> bool:
    path = folder / "last.json"
    return path.is_file() and json.loads(path.read_text())["epoch"] + 1 >= epochs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train_prostate",
        description="Train the two-stage prostate networks and export a model package.",
        epilog="Example: python -m training.train_prostate --config training/configs/metricunet_demo.yaml "
               "--export Resources/Models/prostate-metricunet-demo",
    )
    parser.add_argument("--config", help="YAML configuration (missing keys take the defaults in this script)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set stage2.epochs=2 (repeatable)")
    parser.add_argument("--output", help="run folder (checkpoints, log.csv, curves.png); default from the config")
    parser.add_argument("--stages", default="stage1,stage2", help="which stages to train (default both)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoints in the run folder")
    parser.add_argument("--restart", action="store_true",
                        help="train again from scratch over an existing run's checkpoints")
    parser.add_argument("--max-epochs", type=int, metavar="N",
                        help="stop each stage after N more epochs (continue later with --resume)")
    parser.add_argument("--export", metavar="FOLDER", help="package folder to export to (default <output>/package)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing exported package")
    parser.add_argument("--device", help="auto, cpu or cuda (default from the config)")
    return parser


def main(argv=None) -> int:
    import torch

    from segcore.prostate import resolve_device

    args = build_parser().parse_args(argv)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        config = load_config(args.config, args.set)
        if args.output:
            config["output"] = args.output
        outdir = Path(config["output"])
        outdir.mkdir(parents=True, exist_ok=True)
        device = resolve_device(args.device or config["device"])
        packaged = adopt_packaged_stages(config)
        torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)

        def log(message):
            print(message, file=sys.stderr, flush=True)

        target = Path(args.export) if args.export else outdir / "package"
        if target.exists() and not args.overwrite:
            raise SegcoreError(f"{target} exists: choose another --export folder or add --overwrite "
                               "(checked before training, so that no training is wasted)")
        settings = pipeline_settings(config)
        train_sources, val_sources, data_text = case_sources(config)
        log(f"preparing {len(train_sources)} training and {len(val_sources)} validation cases")
        train_cases = prepare(train_sources, settings, config, log)
        val_cases = prepare(val_sources, settings, config, log)
        (outdir / "config.json").write_text(json.dumps(config, indent=1))
        for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
            if stage not in STAGES:
                raise SegcoreError(f"unknown stage {stage!r}: choose from {', '.join(STAGES)}")
            if stage in packaged:
                log(f"{stage}: taken from model package {config[stage]['from_package']}, not trained")
                continue
            train_stage(stage, config, train_cases, val_cases, settings, device, outdir, args.resume, log,
                        args.max_epochs, args.restart)
        untrained = [s for s in STAGES if s not in packaged and not _finished(outdir / s, config[s]["epochs"])]
        if untrained:
            log(f"not exporting a package yet: {', '.join(untrained)} not trained in {outdir}")
            return 0
        package = export_package(config, outdir, target, data_text, overwrite=args.overwrite)
        log(f"exported model package {package.name} to {package.path}")
    except SegcoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TypeError as error:  # a wrong key in a free-form section (network arguments, metric, augment)
        print(f"error: bad configuration: {error}", file=sys.stderr)
        return 1
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    return 0


if __name__ == "__main__":
    sys.exit(main())
