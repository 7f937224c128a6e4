"""Train the guided-correction network (task ``refine``) with simulated clicks and export a model package.

    python -m training.train_refine --config training/configs/refine_demo.yaml --export Resources/Models/refine-demo
    python -m training.train_refine --config ... --resume            # continue an interrupted run

Every phantom organ is a training target (the network is structure-agnostic). A training example is a slab
of axial slices around one organ on the 1 mm grid, an imperfect starting mask (the demo model's own result,
or the truth shifted, grown or shrunk, missing slices, or nothing) and clicks placed where the error is
largest (`training.clicks`). As in RITM (Sofiiuk et al. 2022) and DeepEdit, part of the examples then run
the network itself once or twice without gradients and add the next click on its answer, so that it learns
to correct its own mistakes as a user's clicks accumulate. The loss is cross-entropy plus soft Dice on the
slices the clicks reach. Each epoch is validated on held-out phantoms from deliberately poor masks (shifted
5 mm, eroded 2 mm): DSC after 0, 1 and 3 clicks; the best DSC after 3 clicks is exported. Runs are seeded
and deterministic on the CPU (with ``workers`` 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segcore import anatomy, networks
from segcore.errors import SegcoreError
from segcore.pipeline import normalise, settings_to_json
from segcore.postprocess import bounding_box
from segcore.refinement import RefineSettings, network_input, refine_on_grid, slices_reached

from . import clicks as simulated
from . import data, runs
from .runs import EpochRecord

STAGE = "refine"

DEFAULTS = {
    "name": "refine",
    "version": "1.0",
    "description": "Guided correction: include/exclude clicks refine one structure (2.5-D U-Net).",
    "licence": "Apache-2.0",
    "seed": 0,
    "device": "auto",
    "output": "out/train/refine",
    "cache": "out/cache",
    "data": {"source": "phantom", "seed": 1000, "cases": 24, "validation_seed": 5000, "validation_cases": 4,
             "matrix": 512, "folder": None, "validation_folder": None, "prostate_label": 1},
    "organs": list(anatomy.TARGET_NAMES),
    # A package whose results are starting masks (part of the examples), or null for perturbed truths only.
    "start_model": "organs-hmrnet-demo",
    "start_probability": 0.3,
    "margin_mm": 40.0,            # the prepared region: every organ's box and this much around it
    "pipeline": {},               # RefineSettings overrides (reach_mm, click_radius_mm, ...)
    "architecture": "unet2p5d",
    "arguments": {"in_channels": 8, "num_classes": 2, "widths": [16, 32, 64, 128]},
    "window": 128,                # in-plane size of a training slab (voxels)
    "clicks": {"initial": 3, "iterate_probability": 0.5, "iterations": 2, "spread": 0.3},
    "epochs": 10, "steps_per_epoch": 200, "slabs_per_step": 4, "slices_per_slab": 4,
    "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9,
    "augment": {"contrast": [0.9, 1.1], "shift_hu": 10.0, "noise_hu": 12.0, "flip": True},
    "validation": {"clicks": 3},
    "workers": 1,                 # processes preparing the cases
    "loader_workers": 0,          # processes making training slabs (0: in the training process, deterministic)
    "export": {"fp16": True, "checkpoint": "best"},
}


# --------------------------------------------------------------------------- data


@dataclass
class RefineCase:
    """One case on the 1 mm grid around its organs, (z, y, x): CT in HU, truth and starting label maps."""

    case_id: str
    ct: np.ndarray
    labels: np.ndarray
    starts: np.ndarray | None
    spacing: tuple  # (x, y, z) mm

    def present(self) -> set[int]:
        if not hasattr(self, "_present"):
            self._present = set(np.unique(self.labels).tolist())
        return self._present

    def voxels(self, value: int) -> tuple[np.ndarray, ...]:
        """The (z, y, x) indices of one label's voxels (every 7th: enough to pick centres from), kept."""
        if not hasattr(self, "_voxels"):
            self._voxels = {}
        if value not in self._voxels:
            self._voxels[value] = tuple(v[::7] for v in np.nonzero(self.labels == value))
        return self._voxels[value]


def prepare_case(source: data.CaseSource, config: dict, settings: RefineSettings) -> RefineCase:
    """Resample one case onto the refinement grid around all its target organs; the start model's result
    beside it."""
    import SimpleITK as sitk

    from segcore import image as imageio

    ct, labels = source.load()
    array = sitk.GetArrayFromImage(labels)
    values = [anatomy.structure(name).value for name in config["organs"]]
    k, j, i = np.nonzero(np.isin(array, values))
    if not len(k):
        raise SegcoreError(f"case {source.case_id} holds none of the organs {', '.join(config['organs'])}")
    corners = [labels.TransformContinuousIndexToPhysicalPoint([float(a), float(b), float(c)])
               for a in (i.min(), i.max()) for b in (j.min(), j.max()) for c in (k.min(), k.max())]
    low = np.min(corners, axis=0) - config["margin_mm"]
    high = np.max(corners, axis=0) + config["margin_mm"]
    spacing = np.asarray(settings.spacing_mm, float)
    grid = imageio.centred_grid((low + high) / 2, spacing, np.ceil((high - low) / spacing).astype(int))
    starts = None
    if config["start_model"]:
        from segcore.organs import OrganSegmenter

        result = OrganSegmenter(config["start_model"], device="cpu")(ct)
        starts = sitk.GetArrayFromImage(imageio.resample_like(result.labelmap, grid, "label")).astype(np.uint8)
    return RefineCase(source.case_id,
                      np.clip(np.rint(sitk.GetArrayFromImage(imageio.resample_like(ct, grid, "linear"))),
                              -1024, 3071).astype(np.int16),
                      sitk.GetArrayFromImage(imageio.resample_like(labels, grid, "label")).astype(np.uint8),
                      starts, grid.GetSpacing())


def cached_case(source: data.CaseSource, config: dict, settings: RefineSettings) -> RefineCase:
    """`prepare_case`, cached on disk under a key of everything that shapes the arrays."""
    from segcore.files import atomic_output

    key = json.dumps({"source": source.describe(), "organs": config["organs"], "start": config["start_model"],
                      "margin": config["margin_mm"], "spacing": list(settings.spacing_mm)}, sort_keys=True)
    path = Path(config["cache"]) / f"refine-{source.case_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return RefineCase(source.case_id, stored["ct"], stored["labels"],
                              stored.get("starts"), tuple(stored["spacing"]))
    case = prepare_case(source, config, settings)
    arrays = {"ct": case.ct, "labels": case.labels, "spacing": np.asarray(case.spacing)}
    if case.starts is not None:
        arrays["starts"] = case.starts
    with atomic_output(path, overwrite=True) as tmp:
        np.savez(tmp, **arrays)
    return case


def prepare(sources, config: dict, settings: RefineSettings, log) -> list[RefineCase]:
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    make = partial(cached_case, config=config, settings=settings)
    tick = time.perf_counter()
    if int(config["workers"]) <= 1 or len(sources) == 1:
        cases = [make(source) for source in sources]
    else:
        with ProcessPoolExecutor(int(config["workers"]), initializer=_share_cores,
                                 initargs=(int(config["workers"]),)) as pool:
            cases = list(pool.map(make, sources))
    log(f"  {len(cases)} cases ready ({time.perf_counter() - tick:.0f} s)")
    return cases


def _share_cores(workers: int) -> None:
    """A preparing process uses its share of the cores (the start model runs in each)."""
    import torch

    from segcore.pipeline import available_cores

    torch.set_num_threads(max(1, available_cores() // workers))


# --------------------------------------------------------------------------- examples


@dataclass
class Slab:
    """A training example's slices: CT in HU, truth, current mask, clicks (z, y, x, kind) in slab indices."""

    ct: np.ndarray
    truth: np.ndarray
    mask: np.ndarray
    clicks: list


def sample_slab(case: RefineCase, value: int, config: dict, settings: RefineSettings, rng) -> Slab:
    """Slices around one organ (as far as clicks reach), centred in-plane near the organ, with an imperfect
    starting mask and its first clicks."""
    zs, ys, xs = case.voxels(value)
    half_z = math.ceil(settings.reach_mm / case.spacing[2]) + settings.slices // 2 + 1
    pick = int(rng.integers(len(zs)))
    half = int(config["window"]) // 2
    yc, xc = (int(v + rng.integers(-half // 4, half // 4 + 1)) for v in (ys[pick], xs[pick]))
    where = (slice(zs[pick] - half_z, zs[pick] + half_z + 1), slice(yc - half, yc + half), slice(xc - half, xc + half))
    ct = _cut(case.ct, where, -1024)
    truth = _cut(case.labels, where, 0) == value
    spacing_zyx = case.spacing[::-1]
    if case.starts is not None and rng.random() < config["start_probability"]:
        mask = _cut(case.starts, where, 0) == value
    else:
        mask = simulated.perturbed_mask(truth, spacing_zyx, rng)
    return Slab(ct, truth, mask, initial_clicks(mask, truth, spacing_zyx, config, settings, rng))


def slab_stream(cases, values, config: dict, settings: RefineSettings, seed, device):
    """Endless training slabs: made by ``loader_workers`` processes (each with its own seeded stream) when
    there are any, else here (deterministic)."""
    import torch

    class Slabs(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng([*seed, info.id if info else 0])
            while True:
                case = cases[int(rng.integers(len(cases)))]
                present = [v for v in values if v in case.present()]
                yield sample_slab(case, present[int(rng.integers(len(present)))], config, settings, rng)

    workers = int(config["loader_workers"])
    return iter(torch.utils.data.DataLoader(Slabs(), batch_size=None, num_workers=workers, collate_fn=_same,
                                            prefetch_factor=8 if workers else None, persistent_workers=False))


def _same(item):
    return item


def _cut(array: np.ndarray, where, fill) -> np.ndarray:
    """``array[where]`` for slices that may reach beyond the array (filled with ``fill`` there)."""
    out = np.full([s.stop - s.start for s in where], fill, array.dtype)
    source = tuple(slice(max(0, s.start), min(n, s.stop)) for s, n in zip(where, array.shape))
    target = tuple(slice(a.start - s.start, a.stop - s.start) for a, s in zip(source, where))
    if all(a.stop > a.start for a in source):
        out[target] = array[source]
    return out


def initial_clicks(mask, truth, spacing_zyx, config: dict, settings: RefineSettings, rng) -> list:
    """1 to ``clicks.initial`` clicks, each at the largest error left once the earlier clicks' disks are
    taken as corrected (a user works through the errors one by one)."""
    clicks, seen = [], mask.astype(bool).copy()
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
    for _ in range(int(rng.integers(1, config["clicks"]["initial"] + 1))):
        click = simulated.next_click(seen, truth, spacing_zyx, rng, config["clicks"]["spread"])
        if click is None:
            break
        (z, y, x), kind = click
        clicks.append((z, y, x, kind))
        ball = ((zz - z) * spacing_zyx[0]) ** 2 + ((yy - y) * spacing_zyx[1]) ** 2 + ((xx - x) * spacing_zyx[2]) ** 2
        near = ball <= settings.click_radius_mm ** 2
        seen[near] = truth[near]
    return clicks


def iterate_clicks(network, slab: Slab, spacing, settings: RefineSettings, device, rng, config) -> None:
    """RITM's iterative training: the network's own answer becomes the mask and the next click goes to its
    largest error (0 to ``clicks.iterations`` times, with probability ``clicks.iterate_probability``)."""
    if not slab.clicks or rng.random() >= config["clicks"]["iterate_probability"]:
        return
    for _ in range(int(rng.integers(1, config["clicks"]["iterations"] + 1))):
        refined, _ = refine_on_grid(network, normalise(slab.ct, settings.window), slab.mask, slab.clicks, spacing,
                                    settings, device)
        click = simulated.next_click(refined, slab.truth, spacing[::-1], rng, config["clicks"]["spread"])
        slab.mask = refined
        if click is None:
            return
        slab.clicks.append((*click[0], click[1]))


def training_batch(network, slabs, config: dict, settings: RefineSettings, spacing, device, rng):
    """One step's inputs (n, channels, y, x) in the network's units and targets (n, y, x)."""
    import torch

    inputs, targets = [], []
    network.eval()
    while len(inputs) < int(config["slabs_per_step"]):
        slab = next(slabs)
        if not slab.clicks:
            continue
        iterate_clicks(network, slab, spacing, settings, device, rng, config)
        reached = slices_reached(slab.clicks, slab.ct.shape[0], spacing[2], settings)
        chosen = rng.choice(reached, size=min(len(reached), int(config["slices_per_slab"])), replace=False)
        hu = augmented(slab.ct, config["augment"], rng)
        inputs.append(network_input(normalise(hu, settings.window), slab.mask, slab.clicks, chosen, spacing,
                                    settings))
        targets.append(slab.truth[chosen].astype(np.int64))
    network.train()
    x, y = np.concatenate(inputs), np.concatenate(targets)
    if config["augment"].get("flip") and rng.random() < 0.5:
        x, y = x[..., ::-1], y[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(np.ascontiguousarray(y)).to(device)


def augmented(hu: np.ndarray, spec: dict, rng) -> np.ndarray:
    """Contrast, brightness and noise as scanners differ (air stays air)."""
    out = hu.astype(np.float32)
    body = out > -500
    out[body] = out[body] * rng.uniform(*spec["contrast"]) + rng.standard_normal() * spec["shift_hu"]
    return out + rng.standard_normal(out.shape).astype(np.float32) * rng.uniform(0, spec["noise_hu"])


# --------------------------------------------------------------------------- validation


def validate(network, cases, values, config: dict, settings: RefineSettings, device) -> dict:
    """Mean DSC over the validation cases' organs from poor masks (shifted 5 mm, eroded 2 mm, seeded per
    case and organ) after 0, 1 and ``validation.clicks`` simulated clicks; ``dsc`` is the last of them."""
    rounds = int(config["validation"]["clicks"])
    scores = {n: [] for n in sorted({0, 1, rounds})}
    network.eval()
    for c, case in enumerate(cases):
        spacing_zyx = case.spacing[::-1]
        for value in values:
            box = bounding_box(case.labels == value, margin=int(config["window"]) // 2)
            if box is None:
                continue
            truth, normalised = case.labels[box] == value, normalise(case.ct[box], settings.window)
            mask, clicks = simulated.poor_mask(truth, spacing_zyx, np.random.default_rng([c, value])), []
            after = [simulated.dice(mask, truth)]   # DSC after 0, 1, ... clicks
            for _ in range(rounds):
                click = simulated.next_click(mask, truth, spacing_zyx)
                if click is None:
                    break
                clicks.append((*click[0], click[1]))
                mask, _ = refine_on_grid(network, normalised, mask, clicks, case.spacing, settings, device)
                after.append(simulated.dice(mask, truth))
            after += [after[-1]] * (rounds + 1 - len(after))   # a perfect mask needs no more clicks
            for n, values_after in scores.items():
                values_after.append(after[n])
    network.train()
    out = {f"dsc_{n}_clicks": float(np.mean(v)) if v else math.nan for n, v in scores.items()}
    out["dsc"] = out[f"dsc_{rounds}_clicks"]
    return out


# --------------------------------------------------------------------------- training


def refine_settings(config: dict) -> RefineSettings:
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in config["pipeline"].items()}
    spec.setdefault("slices", (int(config["arguments"]["in_channels"]) - 2) // 2)
    return RefineSettings(**spec)


def train_network(config: dict, cases, val_cases, settings: RefineSettings, device, outdir: Path, resume: bool,
                  restart: bool, log, max_epochs: int | None = None) -> list[EpochRecord]:
    """The seeded training loop: SGD with poly decay, a validation and checkpoints after every epoch (at most
    ``max_epochs`` more of them)."""
    import torch
    from torch.nn import functional as F

    from .train_prostate import soft_dice_loss

    folder = outdir / STAGE
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(config["seed"]))
    network = networks.build(config["architecture"], config["arguments"]).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=config["lr"], momentum=config["momentum"],
                                weight_decay=config["weight_decay"])
    history, start, best = [], 0, -1.0
    state = runs.resume_checkpoint(folder, network, optimizer, resume, restart, "refine run")
    if state is not None:
        start, best, history = state["epoch"] + 1, state["best_dsc"], [EpochRecord(**r) for r in state["history"]]
    values = [anatomy.structure(name).value for name in config["organs"]]
    total = int(config["epochs"]) * int(config["steps_per_epoch"])
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    stop = int(config["epochs"]) if max_epochs is None else min(int(config["epochs"]), start + max_epochs)
    for epoch in range(start, stop):
        tick, rng, sums = time.perf_counter(), np.random.default_rng([int(config["seed"]), epoch]), {}
        torch.manual_seed(int(config["seed"]) * 1000 + epoch)
        slabs = slab_stream(cases, values, config, settings, (int(config["seed"]), epoch), device)
        for step in range(int(config["steps_per_epoch"])):
            iteration = epoch * int(config["steps_per_epoch"]) + step
            lr = config["lr"] * (1 - iteration / total) ** config["poly_power"]
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = training_batch(network, slabs, config, settings, settings.spacing_mm, device, rng)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = network(x)
            terms = {"ce": F.cross_entropy(logits.float(), y), "dice": soft_dice_loss(logits, y)}
            terms["total"] = terms["ce"] + terms["dice"]
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(terms["total"]) if scaler else terms["total"]).backward()
            scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
            sums = {k: sums.get(k, 0.0) + float(v.detach()) for k, v in terms.items()}
            if (step + 1) % 50 == 0:
                log(f"epoch {epoch + 1}/{config['epochs']} step {step + 1}/{config['steps_per_epoch']} "
                    f"loss {sums['total'] / (step + 1):.4f} lr {lr:.5f}")
        validation = validate(network, val_cases, values, config, settings, device)
        history.append(EpochRecord(STAGE, epoch + 1, (epoch + 1) * int(config["steps_per_epoch"]), lr,
                                   time.perf_counter() - tick, {k: v / config["steps_per_epoch"] for k, v in sums.items()},
                                   validation))
        log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in validation.items()))
        dsc = runs.finite_dsc(validation)
        state = {"epoch": epoch, "best_dsc": max(best, dsc), "history": [asdict(r) for r in history], "config": config}
        runs.keep_checkpoints(folder, network, optimizer, state, dsc > best)
        best = max(best, dsc)
        runs.write_log(outdir, history, lambda axes: _draw(axes, history))
    return history


def _draw(axes, history: list[EpochRecord]) -> None:
    epochs = [r.epoch for r in history]
    axes[0].plot(epochs, [r.losses.get("total", math.nan) for r in history], label="training loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for key in history[-1].validation:
        if key != "dsc":
            axes[1].plot(epochs, [r.validation.get(key, math.nan) for r in history], label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation DSC from poor masks")
    axes[1].legend()


def package_contents(config: dict, outdir: Path, data_text: str, settings: RefineSettings) -> tuple[dict, dict]:
    """model.json (without ``files``) and the weights of the package the run makes."""
    weights, state = runs.best_weights(config["architecture"], config["arguments"], outdir / STAGE,
                                       config["export"].get("fp16"), config["export"].get("checkpoint", "best"))
    kept = runs.exported_record(state["history"], config["export"].get("checkpoint", "best"))
    manifest = {
        **runs.package_header(config, "refine"),
        "stages": {STAGE: {"architecture": config["architecture"], "arguments": config["arguments"],
                           "weights": f"{STAGE}.safetensors"}},
        "input": {"spacing_mm": list(settings.spacing_mm), "intensity_window": list(settings.window),
                  "normalisation": "clip to intensity_window, scale to [0, 1]"},
        "pipeline": {k: v for k, v in settings_to_json(settings).items() if k not in ("window", "spacing_mm")},
        "labels": [anatomy.structure(name) for name in config["organs"]],
        "training": runs.training_record(config, data_text, epochs=state["epoch"] + 1),
        "validation": {STAGE: {"epoch": kept["epoch"], **runs.rounded(kept["validation"])}},
    }
    return manifest, {f"{STAGE}.safetensors": weights}


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train_refine",
        description="Train the guided-correction network with simulated clicks and export a model package.",
        epilog="Example: python -m training.train_refine --config training/configs/refine_demo.yaml "
               "--export Resources/Models/refine-demo",
    )
    runs.add_run_options(parser, "epochs=2")
    parser.add_argument("--max-epochs", type=int, metavar="N",
                        help="stop after N more epochs (continue later with --resume)")
    return parser


def train(args: argparse.Namespace) -> int:
    import torch

    from segcore.packages import create_package

    run = runs.start_run(args, DEFAULTS, "training/train_refine.py")
    config, outdir, log = run.config, run.outdir, runs.log
    torch.use_deterministic_algorithms(run.device.type == "cpu", warn_only=True)
    settings = refine_settings(config)
    train_sources, val_sources, data_text = data.case_sources(config)
    log(f"preparing {len(train_sources)} training and {len(val_sources)} validation cases")
    cases = prepare(train_sources, config, settings, log)
    val_cases = prepare(val_sources, config, settings, log)
    runs.write_config(outdir, config)
    train_network(config, cases, val_cases, settings, run.device, outdir, args.resume, args.restart, log,
                  args.max_epochs)
    if not runs.checkpoint_reached(outdir / STAGE, "epoch", int(config["epochs"])):
        log(f"not exporting a package yet: {config['epochs']} epochs not trained in {outdir}")
        return 0
    package = create_package(run.target, *package_contents(config, outdir, data_text, settings),
                             overwrite=args.overwrite)
    log(f"exported model package {package.name} to {package.path}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return runs.run_deterministic_command(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
