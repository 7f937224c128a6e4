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

Under torchrun (``torchrun --nproc_per_node=N -m training.train_prostate ...``) the stages train with
DistributedDataParallel: each step's batch of ``batch_size`` patches is shared between the N processes,
and rank 0 alone validates and writes the run's files (see `training.distributed`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segcore import anatomy, metrics, networks
from segcore.errors import SegcoreError
from segcore.pipeline import normalise, settings_to_json
from segcore.prostate import PipelineSettings, predict_slices

from . import data, distributed, runs
from .runs import EpochRecord

STAGES = ("stage1", "stage2")

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
                  "cut_probability": 0.25, "cut_reach": 0.5},
        "epochs": 10, "patches_per_case": 500, "batch_size": 32, "loss": "ce+dice",
        "objective": {},
        "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9,
        # A package folder or name whose trained stage is taken as it is instead of training one.
        "from_package": None,
        # A package folder or name whose stage weights training starts from (fine-tuning).
        "init_package": None,
    },
    "stage2": {
        "architecture": "metricunet",
        "arguments": {"in_channels": 3, "num_classes": 2},
        "metric": {},
        # Background patches reach as far beyond the prostate as inference runs stage 2 (the coarse
        # blob's extent plus slice_margin_mm).
        "patch": {"size": 64, "slices": 3, "foreground_fraction": 0.7, "jitter": 24, "z_margin": 20,
                  "cut_probability": 0.0, "cut_reach": 0.5},
        "epochs": 10, "patches_per_case": 500, "batch_size": 16, "loss": "ce",
        # The network's own loss settings (hfunet: lambdas, sigma, cold_start; hmedn: mu0, mu, delta,
        # delta2, alpha, hr_weight); see the loss functions in training/losses/.
        "objective": {},
        "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9,
        "from_package": None,
        "init_package": None,
    },
    # checkpoint: which one becomes the package, "best" (validation DSC) or "last".
    "export": {"fp16": True, "checkpoint": "best"},
}


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- the loss of a batch


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

    from .losses import hfunet_loss, hmedn_loss, metricunet_loss

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


# --------------------------------------------------------------------------- training one stage


@dataclass
class StageTraining:
    """One stage's training as `setup_stage` prepares it: network, loss, optimiser, patches and schedule."""

    stage: str
    spec: dict
    config: dict
    settings: PipelineSettings
    folder: Path
    seed: int
    network: object
    optimizer: object
    metric: object              # MetricUNet's voxel-metric loss, or None
    patch: data.PatchSpec
    augment: data.AugmentSpec
    per_epoch: int              # iterations per epoch
    total: int                  # iterations of the whole stage
    cold_iterations: int        # HF-UNet's cold start: the first iterations train the segmentation branch alone
    device: object
    use_amp: bool
    scaler: object
    on_iteration: object = None  # called with (iterations done, total) after every step, for progress bars
    model: object = None         # what the steps run: the network, or under torchrun its DDP wrapper


def setup_stage(stage: str, config: dict, train_cases, settings, device, outdir: Path) -> StageTraining:
    """The stage's folder, its seeded network, loss and SGD optimiser, its patch and augmentation specs and
    the length of its schedule."""
    import torch

    from .losses.metricunet import MetricLossConfig, VoxelMetricLoss

    spec = config[stage]
    folder = outdir / stage
    folder.mkdir(parents=True, exist_ok=True)
    seed = int(config["seed"]) + STAGES.index(stage)
    torch.manual_seed(seed)
    network = networks.build(spec["architecture"], spec["arguments"])
    runs.start_from_package(network, spec.get("init_package"), stage)
    network = network.to(device)
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
    # Under torchrun each step's batch is shared between the processes: even the epoch's last, short one.
    distributed.check_batch(len(train_cases) * spec["patches_per_case"] - (per_epoch - 1) * spec["batch_size"],
                            f"{stage}.batch_size")
    cold_iterations = round(total * float(spec["objective"].get("cold_start", 0.1))) \
        if spec["architecture"] == "hfunet" else 0
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    return StageTraining(stage, spec, config, settings, folder, seed, network, optimizer, metric, patch,
                         augment_spec, per_epoch, total, cold_iterations, device, use_amp, scaler)


def epoch_patches(run: StageTraining, train_cases, rng):
    """The epoch's patches (HU, tissue labels, targets), sampled case by case, and the order that shuffles
    them across cases."""
    images, tissues, targets = [], [], []
    for case in train_cases:
        ct, tissue, target, _ = stage_arrays(case, run.stage, run.config)
        i, t, y = data.sample_patches(ct, tissue, target, run.spec["patches_per_case"], run.patch, rng,
                                      inference_region(case, run.stage, run.config))
        images.append(i), tissues.append(t), targets.append(y)
    images, tissues, targets = map(np.concatenate, (images, tissues, targets))
    return images, tissues, targets, rng.permutation(len(images))


def train_iteration(run: StageTraining, batch, iteration: int, rng, generator,
                    weight: float = 1.0) -> tuple[dict, float]:
    """One SGD step on a batch of patches: poly learning rate, augmentation, the network's loss (AMP on
    CUDA; HF-UNet's cold start while it lasts), times ``weight`` under torchrun (`distributed.share_weight`).
    The loss terms and the learning rate."""
    import torch

    spec = run.spec
    lr = spec["lr"] * (1 - iteration / run.total) ** spec["poly_power"]
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    hu, y = data.augment(*batch, run.augment, rng)
    x = torch.from_numpy(normalise(hu.numpy(), run.settings.window)).to(run.device)
    y = y.to(run.device)
    cold = iteration < run.cold_iterations
    if run.cold_iterations:
        run.network.cold_start(cold)
    with torch.autocast(run.device.type, dtype=torch.float16, enabled=run.use_amp):
        terms = stage_loss(run.network if run.model is None else run.model, spec, x, y, run.metric, generator, cold)
    total = terms["total"] * weight if weight != 1.0 else terms["total"]
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(total).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        total.backward()
        run.optimizer.step()
    return terms, lr


def train_epoch(run: StageTraining, train_cases, epoch: int, log) -> tuple[dict, float]:
    """One epoch, seeded by (seed, epoch) so that a resumed run repeats it exactly: the mean of each loss
    term (over all ranks under torchrun) and the last learning rate."""
    import torch

    rng = np.random.default_rng([run.seed, epoch])
    torch.manual_seed(run.seed * 1000 + epoch)
    generator = torch.Generator().manual_seed(run.seed * 1000 + epoch)
    images, tissues, targets, order = epoch_patches(run, train_cases, rng)
    # Under torchrun every rank draws the same patches and order from the shared epoch rng, so that the
    # ranks' shares of each batch make up exactly the single-process batch; the augmentation (and the
    # metric loss's sampling) then draws from the rank's own stream, so that no two ranks augment alike.
    # A single process keeps the one stream for both, as it always has.
    own = distributed.rank_seed(run.seed, epoch)
    if own is not None:
        rng = np.random.default_rng(own)
        torch.manual_seed(run.seed * 1000 + epoch + 1_000_003 * own[-1])
        generator = torch.Generator().manual_seed(run.seed * 1000 + epoch + 1_000_003 * own[-1])
    run.network.train()
    batch_size = run.spec["batch_size"]
    sums: dict[str, float] = {}
    for b in range(run.per_epoch):
        pick = order[(b * batch_size) % len(order):][:batch_size]
        mine = distributed.share(pick)
        terms, lr = train_iteration(run, (images[mine], tissues[mine], targets[mine]), epoch * run.per_epoch + b,
                                    rng, generator, distributed.share_weight(len(mine), len(pick)))
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        if run.on_iteration is not None:
            run.on_iteration(epoch * run.per_epoch + b + 1, run.total)
        if (b + 1) % 50 == 0 or b + 1 == run.per_epoch:
            log(f"{run.stage} epoch {epoch + 1}/{run.spec['epochs']} batch {b + 1}/{run.per_epoch} "
                f"loss {sums['total'] / (b + 1):.4f} lr {lr:.5f}")
    return distributed.mean_across({k: v / run.per_epoch for k, v in sums.items()}), lr


def end_epoch(run: StageTraining, epoch: int, history: list[EpochRecord], best: float, writer,
              outdir: Path) -> float:
    """After an epoch's validation: its TensorBoard scalars, the ``last`` (and, when it improved, ``best``)
    checkpoint, log.csv and curves.png. The best validation DSC so far."""
    record = history[-1]
    runs.write_scalars(writer, record.losses, record.validation, record.iterations)
    dsc = runs.finite_dsc(record.validation)
    state = {"epoch": epoch, "best_dsc": max(best, dsc), "history": [asdict(r) for r in history],
             "config": run.config}
    runs.keep_checkpoints(run.folder, run.network, run.optimizer, state, dsc > best)
    write_log(outdir)
    return max(best, dsc)


def train_stage(stage: str, config: dict, train_cases, val_cases, settings, device, outdir: Path,
                resume: bool, log, max_epochs: int | None = None, restart: bool = False,
                on_iteration=None) -> list[EpochRecord]:
    """Train one stage (from its last checkpoint with ``resume``; at most ``max_epochs`` more epochs),
    validating and keeping checkpoints after every epoch; ``on_iteration(done, total)`` follows the steps.
    The stage's history. Under torchrun every rank trains and loads the last checkpoint, rank 0 alone
    validates and writes (its history is the whole one; the others' lack the validations)."""
    run = setup_stage(stage, config, train_cases, settings, device, outdir)
    run.on_iteration = on_iteration
    history: list[EpochRecord] = []
    start_epoch, best = 0, -1.0
    state = runs.resume_checkpoint(run.folder, run.network, run.optimizer, resume, restart, f"{stage} run")
    if state is not None:
        start_epoch, best = state["epoch"] + 1, state["best_dsc"]
        history = [EpochRecord(**r) for r in state["history"]]
        log(f"{stage}: resuming after epoch {state['epoch'] + 1}")
    # HF-UNet's cold start freezes parameters for a while: DDP must then look for the unused ones.
    run.model = distributed.wrap(run.network, device, find_unused=run.cold_iterations > 0)
    writer = runs.tensorboard_writer(run.folder)
    stop = run.spec["epochs"] if max_epochs is None else min(run.spec["epochs"], start_epoch + max_epochs)
    for epoch in range(start_epoch, stop):
        tick = time.perf_counter()
        losses, lr = train_epoch(run, train_cases, epoch, log)
        distributed.sync_buffers(run.network)
        if distributed.is_main():
            validation = validate(run.network, val_cases, stage, settings, config, device)
            history.append(EpochRecord(stage, epoch + 1, (epoch + 1) * run.per_epoch, lr,
                                       time.perf_counter() - tick, losses, validation))
            log(f"{stage} epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in validation.items()))
            best = end_epoch(run, epoch, history, best, writer, outdir)
        distributed.barrier()   # the others wait for rank 0's validation and checkpoints
    if writer is not None:
        writer.close()
    distributed.check_weights(run.network, stage)
    return history


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

    def draw(axes):
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

    runs.write_log(outdir, records, draw)


# --------------------------------------------------------------------------- export


def export_package(config: dict, outdir: Path, target: Path, data_text: str, overwrite: bool = False):
    """A model package from the best checkpoint of each stage; model.json records provenance and validation."""
    from segcore.packages import create_package

    return create_package(target, *package_contents(config, outdir, data_text), overwrite=overwrite)


def package_contents(config: dict, outdir: Path, data_text: str) -> tuple[dict, dict]:
    """model.json (without ``files``) and the weights files of the package the run makes: each trained
    stage's ``export.checkpoint``, each packaged stage as it is."""
    settings = pipeline_settings(config)
    weights, stages, validation, epochs = {}, {}, {}, 0
    for stage in STAGES:
        spec = config[stage]
        stages[stage] = {"architecture": spec["architecture"], "arguments": spec["arguments"],
                         "weights": f"{stage}.safetensors"}
        if spec["from_package"]:
            package = open_packaged_stage(spec["from_package"], stage)
            weights[f"{stage}.safetensors"] = package.load_weights(stage)
            validation[stage] = {**package.manifest.get("validation", {}).get(stage, {}),
                                 "from_package": f"{package.name} {package.version}"}
            continue
        weights[f"{stage}.safetensors"], state = runs.best_weights(
            spec["architecture"], spec["arguments"], outdir / stage, config["export"].get("fp16"),
            config["export"].get("checkpoint", "best"))
        kept = runs.exported_record(state["history"], config["export"].get("checkpoint", "best"))
        validation[stage] = {"epoch": kept["epoch"], **runs.rounded(kept["validation"])}
        epochs += json.loads((outdir / stage / "last.json").read_text())["epoch"] + 1
    manifest = {
        **runs.package_header(config, "prostate"),
        "stages": stages,
        "input": {"spacing_mm": list(settings.fine_spacing_mm), "intensity_window": list(settings.window),
                  "normalisation": "clip to intensity_window, scale to [0, 1]"},
        "pipeline": {k: v for k, v in settings_to_json(settings).items() if k not in ("window", "fine_spacing_mm")},
        "labels": [anatomy.structure(name) for name in config["organs"]],
        "training": runs.training_record(
            config, data_text, epochs=epochs,
            epochs_per_stage={s: config[s]["epochs"] for s in STAGES if not config[s]["from_package"]}),
        "validation": validation,
    }
    return manifest, weights


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train_prostate",
        description="Train the two-stage prostate networks and export a model package.",
        epilog="Example: python -m training.train_prostate --config training/configs/metricunet_demo.yaml "
               "--export Resources/Models/prostate-metricunet-demo",
    )
    runs.add_run_options(parser, "stage2.epochs=2")
    parser.add_argument("--stages", default="stage1,stage2", help="which stages to train (default both)")
    parser.add_argument("--max-epochs", type=int, metavar="N",
                        help="stop each stage after N more epochs (continue later with --resume)")
    return parser


def train(args: argparse.Namespace) -> int:
    """Prepare the cases, train the asked stages, export the package once every stage is trained."""
    import torch

    run = runs.start_run(args, DEFAULTS, "training/train_prostate.py")
    config, outdir, log = run.config, run.outdir, runs.log
    packaged = adopt_packaged_stages(config)
    torch.use_deterministic_algorithms(run.device.type == "cpu", warn_only=True)
    settings = pipeline_settings(config)
    train_sources, val_sources, data_text = data.case_sources(config)
    log(f"preparing {len(train_sources)} training and {len(val_sources)} validation cases")
    # Under torchrun rank 0 prepares (and caches) the cases first, and alone needs the validation ones.
    train_cases = distributed.main_first(lambda: prepare(train_sources, settings, config, log))
    val_cases = prepare(val_sources, settings, config, log) if distributed.is_main() else []
    runs.write_config(outdir, config)
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        if stage not in STAGES:
            raise SegcoreError(f"unknown stage {stage!r}: choose from {', '.join(STAGES)}")
        if stage in packaged:
            log(f"{stage}: taken from model package {config[stage]['from_package']}, not trained")
            continue
        train_stage(stage, config, train_cases, val_cases, settings, run.device, outdir, args.resume, log,
                    args.max_epochs, args.restart)
    untrained = [s for s in STAGES if s not in packaged and not runs.checkpoint_reached(outdir / s, "epoch", config[s]["epochs"])]
    if untrained:
        log(f"not exporting a package yet: {', '.join(untrained)} not trained in {outdir}")
        return 0
    if not distributed.is_main():
        return 0        # rank 0 exports the package
    package = export_package(config, outdir, run.target, data_text, overwrite=args.overwrite)
    log(f"exported model package {package.name} to {package.path}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return runs.run_deterministic_command(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
