"""Train HMR-Net (multi-organ detection and contour regression on axial slices) and export a model package.

    python -m training.train_hmrnet --config training/configs/hmrnet_demo.yaml \\
        --export Resources/Models/organs-hmrnet-demo
    python -m training.train_hmrnet --config ... --resume        # continue an interrupted run

Cases (phantoms or a folder of ``<name>_ct`` / ``<name>_labels`` pairs) are
resampled onto the pipeline's canonical slice grid (`segcore.organs`) with a
border of ``canvas_margin`` pixels. Each training sample is one slice: a random
``size``-pixel window of it (translation and crop), a left-right flip that also
swaps the left and right femoral heads, rotation and scale, Gaussian blur and
SynthSeg-style per-tissue intensity randomisation. Its targets are one instance
per organ (per connected piece for seminal vesicles): class, box and p boundary
points evenly spaced along the contour, starting at the point straight anterior
of the centroid and running counter-clockwise in the image, so that the i-th
point means the same place on every slice. SGD with Nesterov momentum as in the
paper, linear warm-up then poly decay. Validation runs the pipeline's own
slice-to-organ steps on held-out cases: DSC, HD95 and HD per organ on the
canonical grid, and mAP50-95 of the slice detections.

Under torchrun (``torchrun --nproc_per_node=N -m training.train_hmrnet ...``) the run trains with
DistributedDataParallel: each step's ``batch_size`` slices are shared between the N processes, and
rank 0 alone validates and writes the run's files (see `training.distributed`).
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
from segcore.files import atomic_output
from segcore.organs import OrganSettings, OrganTrack, collect_detections, make_consistent, slice_grid
from segcore.pipeline import normalise, settings_to_json
from segcore.postprocess import polygon_mask

from . import data, distributed, runs
from .runs import EpochRecord

ORGANS = anatomy.TARGET_NAMES
CACHE_VERSION = 1

DEFAULTS = {
    "name": "organs-hmrnet",
    "version": "1.0",
    "description": "HMR-Net multi-organ segmentation of the male pelvis (prostate, bladder, rectum, femoral heads, "
                   "seminal vesicles) by slice-wise detection and contour regression.",
    "licence": "Apache-2.0",
    "seed": 0,
    "device": "auto",
    "output": "out/train/organs-hmrnet",
    "cache": "out/cache",
    "workers": 1,
    "data": {"source": "phantom", "seed": 2000, "cases": 40, "validation_seed": 6000, "validation_cases": 4,
             "matrix": 512, "folder": None, "validation_folder": None},
    "pipeline": {},
    "canvas_margin": 16,            # pixels of canonical slice kept around the window, for translation
    "empty_fraction": 0.1,          # share of training slices without any organ
    "architecture": "hmrnet",
    # A package folder or name whose weights training starts from (fine-tuning).
    "init_package": None,
    # The paper's network: ResNet-50, 256-channel pathway, 100/500-filter and 1024-wide heads. Anchors of
    # 8-64 pixels (the paper does not give its own): a seminal vesicle's cross-section is about 9 x 6 pixels
    # (18 x 12 mm) on the 2 mm slices, and with 16 pixels as the smallest anchor every anchor round it
    # overlapped it below the RPN's negative IoU (0.3), so it was learned from the one anchor forced positive
    # per slice and hardly ever found; a full bladder, the largest organ, is about 75 x 55 pixels.
    "arguments": {"num_classes": len(ORGANS), "in_channels": 1, "depth": 50, "points": 50,
                  "anchor_sizes": [8, 16, 32, 64]},
    "loss": {},
    "augment": {},
    "blur_probability": 0.3,
    "iterations": 20000,
    "batch_size": 4,
    "lr": 0.01,
    "warmup": 200,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 1e-4,
    "poly_power": 0.9,
    "validate_every": 1000,
    # checkpoint: which one becomes the package, "best" (validation mean DSC) or "last".
    "export": {"fp16": True, "checkpoint": "best"},
}


# --------------------------------------------------------------------------- data


def settings_of(config: dict) -> OrganSettings:
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in config["pipeline"].items()}
    return OrganSettings(**spec)


def prepare_case(source: data.CaseSource, settings: OrganSettings, margin: int) -> dict:
    return {"case_id": source.case_id, **canonical_arrays(*source.load(), settings, margin)}


def canonical_arrays(ct, labels, settings: OrganSettings, margin: int) -> dict:
    """A CT and its labels on the canonical slice grid grown by ``margin`` pixels: HU (int16) and labels
    (uint8, all of the phantom's tissues kept for intensity randomisation), (z, y, x)."""
    import SimpleITK as sitk

    from segcore import image as imageio

    grown = OrganSettings(**{**asdict(settings), "size": settings.size + 2 * margin})
    reference = slice_grid(ct, grown)
    hu = sitk.GetArrayFromImage(imageio.resample_like(ct, reference, "linear"))
    lab = sitk.GetArrayFromImage(imageio.resample_like(labels, reference, "nearest"))  # fast; 2 mm is coarse anyway
    return {"ct": np.clip(np.round(hu), -1024, 3071).astype(np.int16),
            "labels": lab.astype(np.uint8), "spacing": np.asarray(reference.GetSpacing()[::-1])}


def cached_case(source: data.CaseSource, settings: OrganSettings, margin: int, cache_dir) -> dict:
    import hashlib

    key = json.dumps({"v": CACHE_VERSION, "source": source.describe(), "pixel": settings.pixel_mm,
                      "slice": settings.slice_mm, "size": settings.size, "margin": margin}, sort_keys=True)
    path = Path(cache_dir) / f"hmr-{source.case_id}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return {"case_id": source.case_id, **{k: stored[k] for k in ("ct", "labels", "spacing")}}
    case = prepare_case(source, settings, margin)
    with atomic_output(path, overwrite=True) as tmp:
        np.savez_compressed(tmp, ct=case["ct"], labels=case["labels"], spacing=case["spacing"])
    return case


def prepare(sources, settings, config, log) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    make = partial(cached_case, settings=settings, margin=config["canvas_margin"], cache_dir=config["cache"])
    tick = time.perf_counter()
    workers = max(1, int(config["workers"]))
    if workers == 1 or len(sources) == 1:
        cases = [make(s) for s in sources]
    else:
        with ProcessPoolExecutor(workers) as pool:
            cases = list(pool.map(make, sources))
    log(f"  {len(cases)} cases ready ({time.perf_counter() - tick:.0f} s)")
    return cases


# --------------------------------------------------------------------------- targets


def contour_points(mask: np.ndarray, count: int) -> np.ndarray | None:
    """``count`` points (x, y in pixel coordinates) evenly spaced along the outer contour of a 2-D mask,
    starting straight anterior (smallest y) of the centroid and running counter-clockwise as seen in the
    image (x right, y down). None for a mask too small to have a contour."""
    from skimage import measure

    padded = np.pad(mask.astype(np.float32), 1)
    found = measure.find_contours(padded, 0.5)
    if not found:
        return None
    rc = max(found, key=len) - 1.0                 # (row, column) index coordinates of the mask
    xy = rc[:, ::-1] + 0.5                         # pixel coordinates
    if len(xy) < 4:
        return None
    if np.allclose(xy[0], xy[-1]):
        xy = xy[:-1]
    x, y = xy[:, 0], xy[:, 1]
    area = 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
    if area > 0:  # positive shoelace area with y down is clockwise on screen: reverse it
        xy = xy[::-1]
    closed = np.vstack([xy, xy[:1]])
    lengths = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(lengths)])
    if arc[-1] <= 0:
        return None
    # The start: where the contour crosses the vertical line through the centroid, on the anterior side.
    centre = xy.mean(axis=0)
    angle = np.arctan2(xy[:, 0] - centre[0], centre[1] - xy[:, 1])  # 0 straight anterior
    start = arc[int(np.argmin(np.abs(angle)))]
    positions = (start + np.arange(count) * arc[-1] / count) % arc[-1]
    return np.stack([np.interp(positions, arc, closed[:, 0]), np.interp(positions, arc, closed[:, 1])], axis=1)


def slice_targets(labels: np.ndarray, points: int, min_pixels: int = 6) -> dict:
    """Instances on one label slice: boxes (n, 4), labels (n,) as class indices 1..K, points (n, p, 2)."""
    from scipy import ndimage

    boxes, classes, shapes = [], [], []
    for index, name in enumerate(ORGANS, start=1):
        mask = labels == anatomy.structure(name).value
        if mask.sum() < min_pixels:
            continue
        pieces, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(pieces.ravel())[1:]
        order = np.argsort(sizes)[::-1]
        keep = order[:1] if name in ("prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right") \
            else order
        for piece in keep:
            if sizes[piece] < min_pixels:
                continue
            part = pieces == piece + 1
            shape = contour_points(part, points)
            if shape is None:
                continue
            rows, cols = np.nonzero(part)
            boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            classes.append(index)
            shapes.append(shape)
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(classes, np.int64),
            "points": np.asarray(shapes, np.float32).reshape(-1, points, 2)}


_SWAP = np.arange(256, dtype=np.uint8)
_SWAP[[4, 5]] = [5, 4]  # a left-right flip turns the left femoral head into the right one
_SWAP[[7, 8]] = [8, 7]
_SWAP[[10, 11]] = [11, 10]


def make_batch(cases, picks, config, settings, rng, augment_spec, train: bool = True):
    """Network input (B, 1, size, size) normalised, and targets (torch) for (case, slice) picks."""
    import torch
    from scipy import ndimage

    margin, size = config["canvas_margin"], settings.size
    hu, tissue = [], []
    for c, k in picks:
        case = cases[c]
        dy, dx = (rng.integers(0, 2 * margin + 1, 2) if train else (margin, margin))
        image = case["ct"][k, dy:dy + size, dx:dx + size].astype(np.float32)
        labels = case["labels"][k, dy:dy + size, dx:dx + size]
        if train and rng.random() < 0.5:
            image, labels = image[:, ::-1], _SWAP[labels[:, ::-1]]
        if train and rng.random() < config["blur_probability"]:
            image = ndimage.gaussian_filter(image, rng.uniform(0.3, 1.0))
        hu.append(image)
        tissue.append(labels)
    hu, tissue = np.stack(hu)[:, None], np.stack(tissue)[:, None]
    if train:
        x, y = data.augment(hu, tissue, tissue[:, 0], augment_spec, rng)
        x, y = x.numpy(), y.numpy()
    else:
        x, y = hu, tissue[:, 0]
    points = config["arguments"].get("points", 50)
    targets = []
    for slice_labels in y:
        t = slice_targets(slice_labels.astype(np.uint8), points)
        targets.append({k: torch.from_numpy(v) for k, v in t.items()})
    return torch.from_numpy(normalise(np.ascontiguousarray(x), settings.window)), targets


def training_slices(cases, empty_fraction: float, rng) -> list[tuple[int, int]]:
    """(case, slice) pairs: every slice with an organ, plus a share of slices without."""
    target_values = [anatomy.structure(n).value for n in ORGANS]
    full, empty = [], []
    for c, case in enumerate(cases):
        has = np.isin(case["labels"], target_values).any(axis=(1, 2))
        full += [(c, int(k)) for k in np.flatnonzero(has)]
        empty += [(c, int(k)) for k in np.flatnonzero(~has)]
    count = min(len(empty), round(len(full) * empty_fraction / max(1e-6, 1 - empty_fraction)))
    if count:
        chosen = rng.choice(len(empty), count, replace=False)
        full += [empty[i] for i in chosen]
    return full


# --------------------------------------------------------------------------- validation


def average_precision(scores, matched, total: int) -> float:
    """Area under the precision-recall curve (all points, precision made monotone)."""
    if total == 0:
        return float("nan")
    if not len(scores):
        return 0.0
    order = np.argsort(-np.asarray(scores))
    hits = np.asarray(matched, float)[order]
    tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
    recall, precision = tp / total, tp / np.maximum(tp + fp, 1e-9)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def detection_map(found: list, truth: list, classes: int) -> float:
    """COCO-style mAP50-95 of slice detections: per class and IoU threshold 0.50:0.05:0.95, each true box
    matched at most once, best score first; averaged over the classes present."""
    from segcore.networks.hmrnet import box_iou

    values = []
    for cls in range(1, classes + 1):
        total = sum(int((t["labels"] == cls).sum()) for t in truth)
        if total == 0:
            continue
        per_threshold = []
        for threshold in np.arange(0.5, 0.96, 0.05):
            scores, matched = [], []
            for d, t in zip(found, truth):
                boxes = d.boxes[d.labels == cls].cpu()
                s = d.scores[d.labels == cls].cpu().numpy()
                gt = t["boxes"][t["labels"] == cls]
                used = np.zeros(len(gt), bool)
                iou = box_iou(boxes, gt).numpy() if len(gt) and len(boxes) else np.zeros((len(boxes), len(gt)))
                for i in np.argsort(-s):
                    j = int(np.argmax(iou[i])) if len(gt) else -1
                    hit = j >= 0 and iou[i, j] >= threshold and not used[j]
                    if hit:
                        used[j] = True
                    scores.append(float(s[i]))
                    matched.append(hit)
            per_threshold.append(average_precision(scores, matched, total))
        values.append(float(np.mean(per_threshold)))
    return float(np.mean(values)) if values else float("nan")


def validate(network, cases, config, settings: OrganSettings, device) -> dict:
    """Per-organ DSC / HD95 / HD on the canonical grid and mAP50-95, the pipeline's slice-to-organ steps."""
    import torch

    network.eval()
    per_organ = {name: [] for name in ORGANS}
    found_all, truth_all = [], []
    for c, case in enumerate(cases):
        tracks = {name: OrganTrack(name) for name in ORGANS}
        slices = case["ct"].shape[0]
        rng = np.random.default_rng(0)
        for start in range(0, slices, settings.batch_size):
            picks = [(c, k) for k in range(start, min(slices, start + settings.batch_size))]
            x, targets = make_batch(cases, picks, config, settings, rng, None, train=False)
            with torch.inference_mode():
                found = network(x.to(device))
            collect_detections(found, start, tracks, settings)
            found_all += found
            truth_all += targets
        margin, size = config["canvas_margin"], settings.size
        labels = case["labels"][:, margin:margin + size, margin:margin + size]
        spacing = case["spacing"]
        for name in ORGANS:
            track = make_consistent(tracks[name], settings.min_slices)
            predicted = np.zeros(labels.shape, bool)
            for k, kept in track.slices.items():
                for _, shape in kept:
                    predicted[k] |= polygon_mask(shape, labels.shape[1:])
            reference = labels == anatomy.structure(name).value
            if reference.any():
                per_organ[name].append(metrics.mask_metrics(predicted, reference, spacing))
    network.train()
    out = {"map50_95": detection_map(found_all, truth_all, len(ORGANS))}
    for name, scores in per_organ.items():
        for key in ("dsc", "hd95", "hd"):
            values = [getattr(s, key) for s in scores if getattr(s, key) is not None]
            out[f"{name}_{key}"] = float(np.mean(values)) if values else float("nan")
    dscs = [out[f"{n}_dsc"] for n in ORGANS if math.isfinite(out[f"{n}_dsc"])]
    out["dsc"] = float(np.mean(dscs)) if dscs else float("nan")
    return out


# --------------------------------------------------------------------------- training


@dataclass
class HMRTraining:
    """The run as `setup_training` prepares it: network, loss settings, optimiser, augmentation, schedule."""

    config: dict
    settings: OrganSettings
    folder: Path
    seed: int
    network: object
    loss: object                # training.losses.hmrnet.LossConfig
    optimizer: object
    augment: data.AugmentSpec
    total: int                  # iterations of the whole run
    batch_size: int
    device: object
    model: object = None        # the loss as one forward: under torchrun in DDP (`distributed.objective`)


def setup_training(config: dict, settings, device, outdir: Path) -> HMRTraining:
    """The run's folder, its seeded network, loss settings and SGD optimiser (Nesterov momentum)."""
    import torch

    from .losses.hmrnet import LossConfig

    folder = outdir / "hmrnet"
    folder.mkdir(parents=True, exist_ok=True)
    seed = int(config["seed"])
    torch.manual_seed(seed)
    network = networks.build(config["architecture"], config["arguments"])
    runs.start_from_package(network, config.get("init_package"), None)
    network = network.to(device)
    loss_config = LossConfig(**config["loss"])
    optimizer = torch.optim.SGD(network.parameters(), lr=config["lr"], momentum=config["momentum"],
                                nesterov=bool(config["nesterov"]), weight_decay=config["weight_decay"])
    augment_spec = data.AugmentSpec(**{**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in config["augment"].items()}, "flip": False})
    distributed.check_batch(int(config["batch_size"]), "batch_size")   # under torchrun: a share for each rank
    return HMRTraining(config, settings, folder, seed, network, loss_config, optimizer, augment_spec,
                       int(config["iterations"]), int(config["batch_size"]), device)


def learning_rate(config: dict, iteration: int, total: int) -> float:
    """Linear warm-up over ``warmup`` iterations, then poly decay."""
    if iteration < config["warmup"]:
        return config["lr"] * (iteration + 1) / config["warmup"]
    return config["lr"] * (1 - iteration / total) ** config["poly_power"]


def train_iteration(run: HMRTraining, train_cases, pool, iteration: int) -> tuple[dict, float]:
    """One SGD step on a batch of slices drawn from ``pool``, seeded by (seed, iteration) so that a resumed
    run repeats it exactly. The loss terms and the learning rate. Under torchrun every rank draws the same
    picks and trains on its share of them (`distributed.share`), augmented from its own stream."""
    import torch

    from .losses.hmrnet import hmrnet_loss

    rng = np.random.default_rng([run.seed, iteration])
    generator = torch.Generator().manual_seed(run.seed * 100003 + iteration)
    lr = learning_rate(run.config, iteration, run.total)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    picks = [pool[i] for i in rng.integers(0, len(pool), run.batch_size)]
    mine = distributed.share(picks)
    own = distributed.rank_seed(run.seed, iteration)
    if own is not None:
        rng = np.random.default_rng(own)
        generator = torch.Generator().manual_seed(run.seed * 100003 + iteration + 1_000_003 * own[-1])
    x, targets = make_batch(train_cases, mine, run.config, run.settings, rng, run.augment)
    if run.model is None:
        terms = hmrnet_loss(run.network, x.to(run.device), targets, run.loss, generator)
    else:
        terms = run.model(x.to(run.device), targets, run.loss, generator)
    weight = distributed.share_weight(len(mine), len(picks))
    run.optimizer.zero_grad(set_to_none=True)
    (terms["total"] * weight if weight != 1.0 else terms["total"]).backward()
    torch.nn.utils.clip_grad_norm_(run.network.parameters(), 10.0)  # early RPN steps can spike
    run.optimizer.step()
    return terms, lr


def validate_and_keep(run: HMRTraining, val_cases, state: dict, iteration: int, lr: float, losses: dict,
                      tick: float, writer, outdir: Path, log) -> None:
    """Validate after ``iteration`` iterations and add the record (``losses``: their means since the last
    one, which ended at ``tick``) to the history; log it, keep the checkpoints (``best`` when the mean DSC
    improved), log.csv and curves.png. Rank 0's work: the other ranks do not call it."""
    validation = validate(run.network, val_cases, run.config, run.settings, run.device)
    record = EpochRecord("hmrnet", iteration // run.config["validate_every"], iteration, lr,
                         time.perf_counter() - tick, losses, validation)
    state["history"].append(asdict(record))
    log(f"validation at {iteration}: mean DSC {validation['dsc']:.4f}, mAP50-95 "
        f"{validation['map50_95']:.4f}; " + ", ".join(f"{n} {validation[f'{n}_dsc']:.3f}" for n in ORGANS))
    runs.write_scalars(writer, record.losses, validation, iteration)
    dsc = runs.finite_dsc(validation)
    state.update(iteration=iteration, config=run.config)
    improved = dsc > state["best_dsc"]
    if improved:
        state["best_dsc"] = dsc
    runs.keep_checkpoints(run.folder, run.network, run.optimizer, state, improved)
    write_log(outdir, state["history"])


def train(config: dict, train_cases, val_cases, settings, device, outdir: Path, resume: bool, restart: bool,
          log, max_iterations: int | None = None, on_iteration=None) -> dict:
    """Train (from the last checkpoint with ``resume``; at most ``max_iterations`` more iterations),
    validating every ``validate_every`` iterations and at the end; ``on_iteration(done, total)`` follows
    the steps. The run's state (under torchrun, rank 0 validates and keeps the history)."""
    from .losses.hmrnet import hmrnet_loss

    run = setup_training(config, settings, device, outdir)
    state = {"iteration": 0, "best_dsc": -1.0, "history": []}
    resumed = runs.resume_checkpoint(run.folder, run.network, run.optimizer, resume, restart, "run")
    if resumed is not None:
        state = resumed
        log(f"resuming after iteration {state['iteration']}")
    if distributed.world().distributed:
        # The loss calls the network's parts, not its forward: DDP wraps the loss as one forward. Some
        # parameters take no part in a step (no positive box, no shape target): DDP looks for them.
        run.model = distributed.wrap(distributed.objective(run.network, hmrnet_loss), device, find_unused=True)
    writer = runs.tensorboard_writer(run.folder)
    stop = run.total if max_iterations is None else min(run.total, state["iteration"] + max_iterations)
    pool = training_slices(train_cases, config["empty_fraction"], np.random.default_rng(run.seed))
    log(f"{len(pool)} training slices from {len(train_cases)} cases")
    state["slices"] = len(pool)
    run.network.train()
    sums, count, tick = {}, 0, time.perf_counter()
    iteration = state["iteration"]
    while iteration < stop:
        terms, lr = train_iteration(run, train_cases, pool, iteration)
        iteration += 1
        if on_iteration is not None:
            on_iteration(iteration, run.total)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        count += 1
        if iteration % 25 == 0:
            log(f"iteration {iteration}/{run.total} lr {lr:.5f} "
                + " ".join(f"{k} {v / count:.4f}" for k, v in sums.items()))
        if iteration % config["validate_every"] == 0 or iteration == stop:
            losses = distributed.mean_across({k: v / max(count, 1) for k, v in sums.items()})
            distributed.sync_buffers(run.network)
            if distributed.is_main():
                validate_and_keep(run, val_cases, state, iteration, lr, losses, tick, writer, outdir, log)
            distributed.barrier()   # the others wait for rank 0's validation and checkpoints
            sums, count, tick = {}, 0, time.perf_counter()
    if writer is not None:
        writer.close()
    state["iteration"] = iteration
    distributed.check_weights(run.network, "hmrnet")
    return state


def write_log(outdir: Path, history: list[dict]) -> None:
    """log.csv (one row per validation) and curves.png (loss, mean DSC and mAP over iterations)."""
    records = [EpochRecord(**r) for r in history]

    def draw(axes):
        its = [r.iterations for r in records]
        axes[0].plot(its, [r.losses.get("total", np.nan) for r in records], marker="o")
        axes[0].set(title="training loss", xlabel="iteration")
        for name in ORGANS:
            axes[1].plot(its, [r.validation.get(f"{name}_dsc", np.nan) for r in records], marker="o", label=name)
        axes[1].plot(its, [r.validation.get("map50_95", np.nan) for r in records], "k--", label="mAP50-95")
        axes[1].set(title="validation", xlabel="iteration", ylim=(0, 1))
        axes[1].legend(fontsize=7)

    runs.write_log(outdir, records, draw)


# --------------------------------------------------------------------------- export


def export_package(config: dict, outdir: Path, target: Path, data_text: str, overwrite: bool = False):
    """A model package from the best checkpoint; model.json records provenance and validation."""
    from segcore.packages import create_package

    return create_package(target, *package_contents(config, outdir, data_text), overwrite=overwrite)


def package_contents(config: dict, outdir: Path, data_text: str) -> tuple[dict, dict]:
    """model.json (without ``files``) and the weights file of the package the run makes, from its
    ``export.checkpoint``."""
    settings = settings_of(config)
    checkpoint = config["export"].get("checkpoint", "best")
    weights, state = runs.best_weights(config["architecture"], config["arguments"], outdir / "hmrnet",
                                       config["export"].get("fp16"), checkpoint)
    last = json.loads((outdir / "hmrnet" / "last.json").read_text())
    best = runs.exported_record(state["history"], checkpoint)
    manifest = {
        **runs.package_header(config, "organs"),
        "stages": {"hmrnet": {"architecture": config["architecture"], "arguments": config["arguments"],
                              "weights": "hmrnet.safetensors"}},
        "input": {"spacing_mm": [settings.pixel_mm, settings.pixel_mm, settings.slice_mm],
                  "intensity_window": list(settings.window),
                  "normalisation": "clip to intensity_window, scale to [0, 1]"},
        "pipeline": {k: v for k, v in settings_to_json(settings).items() if k != "window"},
        "labels": [anatomy.structure(name) for name in settings.organ_classes],
        "training": runs.training_record(
            config, data_text, iterations=int(last["iteration"]), batch_size=int(config["batch_size"]),
            # complete passes over the training slices (iterations x batch // slices)
            epochs=int(last["iteration"]) * int(config["batch_size"]) // max(1, int(last["slices"]))),
        "validation": {"hmrnet": {"iteration": best["iterations"], **runs.rounded(best["validation"])}},
    }
    return manifest, {"hmrnet.safetensors": weights}


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train_hmrnet",
        description="Train HMR-Net for multi-organ segmentation and export a model package.",
        epilog="Example: python -m training.train_hmrnet --config training/configs/hmrnet_demo.yaml "
               "--export Resources/Models/organs-hmrnet-demo",
    )
    runs.add_run_options(parser, "iterations=100")
    parser.add_argument("--max-iterations", type=int, metavar="N",
                        help="stop after N more iterations (continue later with --resume)")
    return parser


def train_and_export(args: argparse.Namespace) -> int:
    """Prepare the cases, train, export the package once every iteration is done."""
    run = runs.start_run(args, DEFAULTS, "training/train_hmrnet.py")
    config, outdir, log = run.config, run.outdir, runs.log
    settings = settings_of(config)
    if config["arguments"].get("num_classes", len(ORGANS)) != len(settings.organ_classes):
        raise SegcoreError("arguments.num_classes must equal the number of pipeline.organ_classes")
    train_sources, val_sources, data_text = data.case_sources(config)
    log(f"preparing {len(train_sources)} training and {len(val_sources)} validation cases")
    # Under torchrun rank 0 prepares (and caches) the cases first, and alone needs the validation ones.
    train_cases = distributed.main_first(lambda: prepare(train_sources, settings, config, log))
    val_cases = prepare(val_sources, settings, config, log) if distributed.is_main() else []
    runs.write_config(outdir, config)
    state = train(config, train_cases, val_cases, settings, run.device, outdir, args.resume, args.restart, log,
                  args.max_iterations)
    if state["iteration"] < int(config["iterations"]):
        log(f"not exporting a package yet: {state['iteration']} of {config['iterations']} iterations done")
        return 0
    if not distributed.is_main():
        return 0        # rank 0 exports the package
    package = export_package(config, outdir, run.target, data_text, overwrite=args.overwrite)
    log(f"exported model package {package.name} to {package.path}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return runs.run_command(lambda: train_and_export(args))


if __name__ == "__main__":
    sys.exit(main())
