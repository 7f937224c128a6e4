"""Fine-tune a model package on a clinic's own cases and export the tuned package.

    python -m training.finetune --model prostate-metricunet-demo --data my_cases --export my_model
    python -m training.finetune --model organs-hmrnet-demo --data my_cases --export my_organs --install
    python -m training.finetune ... --resume          # continue after an interruption

DATASET is a folder in the training-case layout (``<name>_ct.nii.gz`` with
``<name>_labels.nii.gz`` beside it, ProstateSeg's label values), as Slicer's
*Save as training case* and ``prostateseg dataset import`` write it.

1. The cases are split into training and held-out ones: 20 % held out (at least
   2), those whose names hash lowest (a choice that depends on the names alone,
   not on their order or on when they were saved); or the cases of
   ``--validation DIR``.
2. The base package's own training settings are taken from its model.json (the
   same networks, grids, windows, patches and losses), and the chosen stages
   train from its weights, at a fifth of its learning rate, for ``--iterations``
   steps. The last weights are kept: the held-out cases judge the result, they do
   not choose it.
3. Base and tuned model segment every held-out case through the whole pipeline,
   as a user would run them; DSC, ASD, HD95 and surface Dice at 2 mm per case and
   structure go to a table, ``heldout_metrics.csv`` and ``heldout_dsc.png``.
4. The tuned package is exported; its model.json records the lineage (the base's
   name, version and weights' sha256), the dataset (case counts and a hash of the
   sorted case names, nothing else), the settings and both models' held-out
   means. Its version derives from the base's (``0.1`` -> ``0.1+ft.YYYYMMDD``).
   ``--install`` puts it in the user's model folder. The base is never modified.

Progress lines on stderr start with ``[ NN%]``; ``summary.json`` in the run
folder holds the outcome (what Slicer's *Improve the model* reads).

Under torchrun (``torchrun --nproc_per_node=N -m training.finetune ...``) the training step runs on
the N processes with DistributedDataParallel (see `training.distributed`); rank 0 alone scores the base
and tuned models on the held-out cases, writes the run's files, exports and installs.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from segcore import anatomy
from segcore.errors import SegcoreError
from segcore.files import write_json

from . import data, distributed, runs
from .runs import log

HELD_OUT_FRACTION = 0.2
MIN_HELD_OUT = 2
MIN_TRAINING = 1
DEFAULT_ITERATIONS = 600
MONITORED_CASES = 3
# Fine-tuning moves weights that already work: a fifth of the learning rate they were trained with (a choice,
# not a tuned value) keeps the first steps from undoing them, and the poly decay still runs it down to zero.
LR_FACTOR = 0.2
# Architectures each training script trains (and so fine-tunes).
TRAINABLE = {"prostate": {"unet2p5d", "metricunet", "hfunet", "hmedn"}, "organs": {"hmrnet"}}
METRIC_KEYS = ("dsc", "asd", "hd95", "sdsc_2mm")
STAGE_CHOICES = {"prostate": {"stage2": ("stage2",), "all": ("stage1", "stage2")},
                 "organs": {"stage2": ("hmrnet",), "all": ("hmrnet",)}}


class Progress:
    """``[ NN%] message`` lines on stderr, over phases of fixed weight; the training phase moves with its
    iterations (only when the whole percentage changes, so the log stays short)."""

    PHASES: ClassVar[dict] = {"check": (0.0, 0.02), "base": (0.02, 0.1), "prepare": (0.1, 0.2), "train": (0.2, 0.85),
              "tuned": (0.85, 0.95), "export": (0.95, 1.0)}

    def __init__(self):
        self.shown = -1
        self.phase = "check"

    def start(self, phase: str, message: str) -> None:
        self.phase = phase
        self.report(0.0, message)

    def report(self, fraction: float, message: str, force: bool = True) -> None:
        low, high = self.PHASES[self.phase]
        percent = int(100 * (low + (high - low) * min(max(fraction, 0.0), 1.0)))
        if force or percent != self.shown:
            self.shown = percent
            log(f"[{percent:3d}%] {message}")

    def iterations(self, done: int, total: int) -> None:
        self.report(done / max(total, 1), f"training: iteration {done}/{total}", force=False)


# --------------------------------------------------------------------------- the cases


@dataclass
class Split:
    """The cases a fine-tune trains on and the ones it holds out."""

    train: list[data.CaseSource]
    held_out: list[data.CaseSource]

    def names(self) -> dict:
        return {"train": [s.case_id for s in self.train], "held_out": [s.case_id for s in self.held_out]}


def name_rank(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def split_cases(folder: Path, validation: Path | None) -> Split:
    """Training and held-out cases: those of ``validation`` when given, else the 20 % (at least 2) of
    ``folder`` whose names hash lowest. Too few cases are refused."""
    if validation is not None and Path(folder).resolve() == Path(validation).resolve():
        raise SegcoreError("--validation must be another folder than --data: a model cannot be judged on "
                           "the cases it was tuned on")
    sources = data.folder_sources(folder)
    if validation is not None:
        held_out = data.folder_sources(validation)
        names = {s.case_id for s in sources} & {s.case_id for s in held_out}
        train = sources
        if len(held_out) < MIN_HELD_OUT:
            raise SegcoreError(f"{validation} has {len(held_out)} case(s); at least {MIN_HELD_OUT} are needed "
                               "to compare the models")
        if names:
            log(f"note: {len(names)} case name(s) appear in both folders; make sure they are different patients")
    else:
        count = max(MIN_HELD_OUT, round(HELD_OUT_FRACTION * len(sources)))
        if len(sources) < count + MIN_TRAINING:
            raise SegcoreError(
                f"{folder} has {len(sources)} case(s); fine-tuning needs at least {MIN_HELD_OUT + MIN_TRAINING} "
                f"({MIN_HELD_OUT} held out to compare the models, {MIN_TRAINING} to train on). Save more cases "
                "there, or give held-out cases with --validation DIR")
        ranked = sorted(sources, key=lambda s: name_rank(s.case_id))
        held = {s.case_id for s in ranked[:count]}
        train = [s for s in sources if s.case_id not in held]
        held_out = [s for s in sources if s.case_id in held]
    return Split(train, held_out)


def read_labels_json(folder: Path) -> dict[int, str] | None:
    path = Path(folder) / "labels.json"
    if not path.is_file():
        return None
    try:
        return {int(e["value"]): str(e["name"]) for e in json.loads(path.read_text(encoding="utf-8"))["labels"]}
    except (ValueError, KeyError, TypeError) as error:
        raise SegcoreError(f"{path} cannot be read as a labels.json ({error}); fix or remove it") from None


def check_labels(package, split: Split, folders: list[Path]) -> None:
    """Refuse a dataset whose labels.json gives the model's label values other names, or that lacks a label
    the model needs (the prostate in every case of a prostate model, any other label in no case at all);
    note a label some cases lack."""
    import SimpleITK as sitk

    for folder in folders:
        declared = read_labels_json(folder)
        for structure in package.labels:
            if declared is not None and declared.get(structure.value, structure.name) != structure.name:
                raise SegcoreError(
                    f"{folder}/labels.json calls label value {structure.value} {declared[structure.value]!r}, "
                    f"but for model {package.name!r} value {structure.value} is {structure.name!r}: relabel the "
                    "cases with ProstateSeg's values (prostateseg dataset import --map does it for DICOM)")
    cases = split.train + split.held_out
    present = {}
    for source in cases:
        image = sitk.ReadImage(source.labels_path)   # kept in a name: an array view does not keep it alive
        values = np.unique(sitk.GetArrayViewFromImage(image))
        present[source.case_id] = {int(v) for v in values}
    for structure in package.labels:
        lacking = [s.case_id for s in cases if structure.value not in present[s.case_id]]
        if package.task == "prostate" and structure.name == "prostate" and lacking:
            raise SegcoreError(
                f"{len(lacking)} case(s) have no prostate (label value {structure.value}), which a prostate "
                f"model needs in every case: {', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}")
        if len(lacking) == len(cases):
            raise SegcoreError(
                f"no case has {structure.name} (label value {structure.value}), which model {package.name!r} "
                "segments: add it to the cases, or fine-tune a model that does not segment it")
        if lacking:
            log(f"note: {len(lacking)} of {len(cases)} cases have no {structure.name}; the model learns that "
                "it can be absent")


def dataset_record(split: Split) -> dict:
    """What model.json says of the data: counts and a hash of the sorted case names, never the names."""
    names = sorted(s.case_id for s in split.train + split.held_out)
    return {"cases": len(names), "training_cases": len(split.train), "held_out_cases": len(split.held_out),
            "case_names_sha256": hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()}


# --------------------------------------------------------------------------- the base and the settings


def open_base(model: str):
    """The base package, refused when its networks are not ones the training scripts train (its label
    values are ProstateSeg's: opening a package checks them)."""
    from segcore.packages import open_package

    base = open_package(model)
    trainable = TRAINABLE.get(base.task, set())
    for stage in base.stages.values():
        if stage.architecture not in trainable:
            raise SegcoreError(f"model {base.name!r}: its {stage.name} network {stage.architecture!r} cannot be "
                               f"fine-tuned (the training scripts train {', '.join(sorted(trainable)) or 'none'} "
                               f"for {base.task!r} models)")
    return base


def trainer_of(task: str):
    from . import train_hmrnet, train_prostate

    return train_prostate if task == "prostate" else train_hmrnet


def tuned_name(base_name: str) -> str:
    return f"{base_name[:61]}-ft"


def tuned_version(base_version: str, day: datetime.date) -> str:
    """``0.1`` -> ``0.1+ft.20261125``; a tuned version gets ``.ft.<date>`` added."""
    stamp = day.strftime("%Y%m%d")
    return f"{base_version}.ft.{stamp}" if "+" in base_version else f"{base_version}+ft.{stamp}"


def base_settings(base, trainer) -> dict:
    """The trainer's defaults with the base's recorded training configuration over them (keys this version
    does not know are left out)."""
    recorded = base.training.get("config") or {}
    return runs.merge(trainer.DEFAULTS, runs.known_part(recorded, trainer.DEFAULTS))


def finetune_config(base, args, stages: tuple[str, ...], split: Split, outdir: Path) -> dict:
    """The run's configuration: the base's, with its networks and pipeline as packaged, the tuned stages
    starting from its weights at LR_FACTOR of its learning rate for ``args.iterations`` steps, the others
    taken as they are, and the last checkpoint exported."""
    config = base_settings(base, trainer_of(base.task))
    iterations = int(args.iterations)
    config.update(name=args.name or tuned_name(base.name), version=tuned_version(base.version, datetime.date.today()),
                  description=f"{base.description} Fine-tuned from {base.name} {base.version} on "
                              f"{len(split.train)} case(s) of a local dataset.",
                  output=str(outdir), cache=str(outdir / "cache"), device=args.device)
    config["data"] = {**config["data"], "source": "folder", "folder": None, "validation_folder": None,
                      "cases": len(split.train), "validation_cases": len(split.held_out)}
    config["export"] = {**config["export"], "checkpoint": "last"}
    window = {"window": list(base.input.intensity_window)}
    if base.task == "prostate":
        config["pipeline"] = {**base.manifest.get("pipeline", {}), **window,
                              "fine_spacing_mm": list(base.input.spacing_mm)}
        config["organs"] = [s.name for s in base.labels]
        for name in ("stage1", "stage2"):
            spec, packaged = config[name], base.stage(name)
            spec.update(architecture=packaged.architecture, arguments=dict(packaged.arguments))
            spec.update(from_package=None if name in stages else str(base.path),
                        init_package=str(base.path) if name in stages else None)
            if name not in stages:
                continue
            epochs = max(1, min(3, iterations // 200))
            spec.update(epochs=epochs, lr=spec["lr"] * args.lr_factor,
                        patches_per_case=math.ceil(iterations * spec["batch_size"] / (epochs * len(split.train))))
    else:
        packaged = base.stage(None)
        config["pipeline"] = {**base.manifest.get("pipeline", {}), **window}
        config.update(architecture=packaged.architecture, arguments=dict(packaged.arguments),
                      init_package=str(base.path), iterations=iterations, lr=config["lr"] * args.lr_factor,
                      warmup=min(int(config["warmup"]), iterations // 10),
                      validate_every=max(100, math.ceil(iterations / 3)))
    return config


# --------------------------------------------------------------------------- training


def settings_for(config: dict, task: str):
    trainer = trainer_of(task)
    return trainer.pipeline_settings(config) if task == "prostate" else trainer.settings_of(config)


def train(config: dict, task: str, stages, split: Split, device, outdir: Path, resume: bool,
          progress: Progress) -> None:
    """Prepare the cases (cached in the run folder) and train the stages, resuming from their last
    checkpoints when asked."""
    trainer = trainer_of(task)
    settings = settings_for(config, task)
    progress.start("prepare", f"preparing {len(split.train)} training cases")
    train_cases = distributed.main_first(lambda: trainer.prepare(split.train, settings, config, log))
    # The curves in log.csv follow a few held-out cases; the comparison after training scores them all.
    # Under torchrun rank 0 alone validates, and so alone needs them.
    held_out = trainer.prepare(split.held_out[:MONITORED_CASES], settings, config, log) \
        if distributed.is_main() else []
    runs.write_config(outdir, config)
    per_stage = config["iterations"] if task == "organs" else stage_iterations(config[stages[0]], len(split.train))
    progress.start("train", f"training {', '.join(stages)}: {per_stage} iterations each")
    for n, stage in enumerate(stages):
        def step(done, total, n=n):
            progress.iterations(n * total + done, total * len(stages))
        if task == "prostate":
            if runs.checkpoint_reached(outdir / stage, "epoch", config[stage]["epochs"]):
                continue
            trainer.train_stage(stage, config, train_cases, held_out, settings, device, outdir, resume, log,
                                restart=not resume, on_iteration=step)
        elif not runs.checkpoint_reached(outdir / "hmrnet", "iteration", config["iterations"]):
            trainer.train(config, train_cases, held_out, settings, device, outdir, resume, not resume, log,
                          on_iteration=step)


def stage_iterations(spec: dict, cases: int) -> int:
    """The iterations of a prostate stage, as its epochs, patches and batch size make them."""
    return spec["epochs"] * math.ceil(cases * spec["patches_per_case"] / spec["batch_size"])


# --------------------------------------------------------------------------- base against tuned


def segmenter_for(package, device: str):
    if package.task == "prostate":
        from segcore.prostate import ProstateSegmenter

        return ProstateSegmenter(package, device)
    from segcore.organs import OrganSegmenter

    return OrganSegmenter(package, device)


def score_cases(package, cases: list[data.CaseSource], device: str, progress: Progress, label: str) -> list[dict]:
    """One row per held-out case and structure: the package's whole pipeline on the case's CT against its
    labels, on the CT's own grid."""
    from segcore import metrics

    segmenter = segmenter_for(package, device)
    rows = []
    for n, source in enumerate(cases):
        ct, labels = source.load()
        result = segmenter(ct)
        values = [s.value for s in package.labels]
        for m in metrics.evaluate(result.labelmap, labels, values):
            rows.append({"case": source.case_id, "structure": anatomy.structure(m.label).name, "model": label,
                         **{k: getattr(m, k) for k in METRIC_KEYS}})
        progress.report((n + 1) / len(cases), f"{label} model: held-out case {n + 1}/{len(cases)}")
    return rows


def base_scores(base, split: Split, device: str, outdir: Path, progress: Progress) -> list[dict]:
    """The base's held-out rows, kept in the run folder for a resumed run (keyed by the base's weights and
    the cases' files)."""
    key = hashlib.sha256(json.dumps({"files": base.files, "cases": [s.describe() for s in split.held_out]},
                                    sort_keys=True).encode()).hexdigest()
    path = outdir / "heldout_base.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["rows"]
    progress.start("base", f"base model {base.name} on {len(split.held_out)} held-out cases")
    rows = score_cases(base, split.held_out, device, progress, "base")
    write_json(path, {"key": key, "rows": rows}, overwrite=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    """{model: {structure: {metric: {mean, sd}}}} over the held-out cases (undefined values left out)."""
    out: dict = {}
    for row in rows:
        for key in METRIC_KEYS:
            out.setdefault(row["model"], {}).setdefault(row["structure"], {}).setdefault(key, [])
            if row[key] is not None and math.isfinite(row[key]):
                out[row["model"]][row["structure"]][key].append(row[key])
    for per_structure in out.values():
        for scores in per_structure.values():
            for key, values in scores.items():
                scores[key] = {"mean": round(float(np.mean(values)), 4) if values else None,
                               "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None,
                               "cases": len(values)}
    return out


def comparison_table(rows: list[dict]) -> str:
    """Per case and structure, each metric for base and tuned; then the means."""
    def cell(value):
        return "   n/a" if value is None or not math.isfinite(value) else f"{value:6.3f}"

    by_key = {(r["case"], r["structure"], r["model"]): r for r in rows}
    keys = sorted({(r["case"], r["structure"]) for r in rows})
    header = f"{'case':24s} {'structure':18s}" + "".join(f" {k + ' base':>12s} {k + ' tuned':>12s}"
                                                         for k in METRIC_KEYS)
    lines = [header, "-" * len(header)]
    for case, structure in keys:
        base, tuned = by_key.get((case, structure, "base"), {}), by_key.get((case, structure, "tuned"), {})
        lines.append(f"{case[:24]:24s} {structure[:18]:18s}"
                     + "".join(f" {cell(base.get(k)):>12s} {cell(tuned.get(k)):>12s}" for k in METRIC_KEYS))
    summary = summarise(rows)
    for structure in sorted({s for _, s in keys}):
        means = {model: {k: summary.get(model, {}).get(structure, {}).get(k, {}).get("mean") for k in METRIC_KEYS}
                 for model in ("base", "tuned")}
        lines.append(f"{'mean':24s} {structure[:18]:18s}"
                     + "".join(f" {cell(means['base'][k]):>12s} {cell(means['tuned'][k]):>12s}" for k in METRIC_KEYS))
    return "\n".join(lines)


def write_comparison(rows: list[dict], outdir: Path) -> None:
    """heldout_metrics.csv (one row per case, structure and model) and heldout_dsc.png (each case's DSC,
    base to tuned, one panel per structure; skipped without matplotlib)."""
    runs.write_csv(outdir / "heldout_metrics.csv", rows, ["case", "structure", "model", *METRIC_KEYS])
    structures = list(dict.fromkeys(r["structure"] for r in rows))

    def draw(axes):
        for ax, structure in zip(axes, structures):
            by_case: dict = {}
            for r in rows:
                if r["structure"] == structure:
                    by_case.setdefault(r["case"], {})[r["model"]] = r["dsc"]
            for scores in by_case.values():
                ax.plot([0, 1], [scores.get("base", np.nan), scores.get("tuned", np.nan)], "o-", color="0.5",
                        alpha=0.6)
            ax.set(title=structure, xticks=[0, 1], xticklabels=["base", "tuned"], ylim=(0, 1), xlim=(-0.3, 1.3))
        axes[0].set_ylabel("held-out DSC")

    runs.draw_figure(outdir / "heldout_dsc.png", len(structures), draw, (3 * len(structures) + 1, 4))


# --------------------------------------------------------------------------- export


def lineage(base, split: Split, config: dict, stages) -> dict:
    """model.json's ``lineage``: the base (name, version, weights' sha256, its own lineage), the dataset
    and the fine-tuning settings."""
    record = {"name": base.name, "version": base.version, "files": dict(base.files)}
    if "lineage" in base.manifest:
        record["lineage"] = base.manifest["lineage"]
    if base.task == "prostate":
        settings = {s: {k: config[s][k] for k in ("epochs", "patches_per_case", "batch_size", "lr")} for s in stages}
    else:
        settings = {k: config[k] for k in ("iterations", "batch_size", "lr", "warmup")}
    return {"method": "fine-tune", "base": record, "dataset": dataset_record(split), "stages": list(stages),
            "settings": settings, "date": datetime.date.today().isoformat()}


def tuned_manifest(base, config: dict, outdir: Path, split: Split, stages) -> tuple[dict, dict]:
    """The tuned package's model.json (without files) and weights; the base's package paths in the
    recorded configuration are replaced by its name (model.json names no folder of this machine)."""
    trainer = trainer_of(base.task)
    text = (f"fine-tuned from {base.name} {base.version} on {len(split.train)} case(s) of a local dataset "
            f"({len(split.held_out)} more held out)")
    manifest, weights = trainer.package_contents(config, outdir, text)
    recorded = manifest["training"]["config"]
    for section in [recorded, *(recorded.get(s, {}) for s in ("stage1", "stage2"))]:
        for key in ("from_package", "init_package"):
            if section.get(key):
                section[key] = base.name
    manifest["lineage"] = lineage(base, split, config, stages)
    return manifest, weights


def export(base, config: dict, outdir: Path, split: Split, stages, target: Path, overwrite: bool,
           device: str, base_rows: list[dict], progress: Progress) -> tuple[object, list[dict]]:
    """Make the tuned package in the run folder, score it on the held-out cases, and write the final package
    (with both models' held-out means) at ``target``. The package and the rows of both models."""
    from segcore.packages import create_package

    manifest, weights = tuned_manifest(base, config, outdir, split, stages)
    candidate = create_package(outdir / "candidate", manifest, weights, overwrite=True)
    progress.start("tuned", f"tuned model on {len(split.held_out)} held-out cases")
    rows = base_rows + score_cases(candidate, split.held_out, device, progress, "tuned")
    summary = summarise(rows)
    manifest["validation"]["held_out"] = {"cases": len(split.held_out), "metric_grid": "each case's own grid",
                                          "base": summary.get("base", {}), "tuned": summary.get("tuned", {})}
    progress.start("export", f"exporting {manifest['name']} {manifest['version']} to {target}")
    package = create_package(target, manifest, weights, overwrite=overwrite)
    return package, rows


def install(package, outdir: Path, overwrite: bool):
    """Install the exported package into the user's model folder, through its archive and that archive's
    sha256 as any package is installed."""
    from segcore.packages import install_package, sha256_file, zip_package

    archive = zip_package(package.path, outdir / f"{package.name}-{package.version}.zip", overwrite=True)
    return install_package(archive, sha256_file(archive), force=overwrite, progress=False)


def check_install_target(name: str, overwrite: bool) -> None:
    """Before any training: the name must not be bundled, nor installed already unless ``--overwrite``."""
    from segcore.packages import bundled_models_dir, user_models_dir

    if (bundled_models_dir() / name).exists():
        raise SegcoreError(f"{name!r} is the name of a bundled model: choose another --name")
    if (user_models_dir() / name).exists() and not overwrite:
        raise SegcoreError(f"a model called {name!r} is installed already: choose another --name, or add "
                           "--overwrite to replace it")


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.finetune",
        description="Fine-tune a model package on your own cases (the folder Slicer's 'Save as training case' or "
                    "'prostateseg dataset import' writes), compare base and tuned models on held-out cases, and "
                    "export (and install) the tuned package.",
        epilog="Example: python -m training.finetune --model prostate-metricunet-demo --data my_cases "
               "--export my_prostate_model --install",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="base model package: a name (prostateseg models list) or a folder")
    parser.add_argument("--data", required=True, type=Path, help="dataset folder: <name>_ct.nii.gz + <name>_labels.nii.gz")
    parser.add_argument("--export", required=True, type=Path, help="folder to write the tuned package to")
    parser.add_argument("--stages", choices=("stage2", "all"), default="stage2",
                        help="prostate models: tune stage 2 only, or the stage-1 localiser too (organs models have one)")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="training steps per stage")
    parser.add_argument("--validation", type=Path, metavar="DIR",
                        help="held-out cases from this folder instead of 20%% of --data")
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda")
    parser.add_argument("--name", help="name of the tuned package (default: the base's name + '-ft')")
    parser.add_argument("--lr-factor", type=float, default=LR_FACTOR, help="learning rate as a share of the base's")
    parser.add_argument("--output", type=Path,
                        help="run folder: checkpoints, cache, logs and comparisons (default out/finetune/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in the run folder")
    parser.add_argument("--install", action="store_true", help="install the tuned package into your model folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --export folder (and, with --install, an installed package of that name)")
    return parser


def check_args(args) -> None:
    if args.iterations < 1:
        raise SegcoreError("--iterations must be 1 or more")
    if not 0 < args.lr_factor <= 1:
        raise SegcoreError("--lr-factor must be more than 0 and at most 1")
    if args.export.exists() and not args.overwrite:
        raise SegcoreError(f"{args.export} exists: choose another --export folder or add --overwrite (checked "
                           "before training, so that no training is wasted)")


def prepare_run(args) -> tuple:
    """Everything checked before any training: the base, the split (kept in the run folder, the same when
    resuming), the labels, the run folder and the configuration."""
    check_args(args)
    base = open_base(args.model)
    stages = STAGE_CHOICES[base.task][args.stages]
    split = split_cases(args.data, args.validation)
    check_labels(base, split, [args.data] + ([args.validation] if args.validation else []))
    name = args.name or tuned_name(base.name)
    if args.install:
        check_install_target(name, args.overwrite)
    outdir = Path(args.output or Path("out/finetune") / name)
    split_path = outdir / "split.json"
    if split_path.is_file() and args.resume and json.loads(split_path.read_text()) != split.names():
        raise SegcoreError(f"the cases differ from those of the run in {outdir}: start again without --resume "
                           "(or choose another --output)")
    if split_path.is_file() and not args.resume:
        raise SegcoreError(f"{outdir} holds a fine-tuning run: continue it with --resume, or choose another "
                           "--output to start afresh")
    outdir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()   # under torchrun every rank has checked the run folder before rank 0 writes to it
    if distributed.is_main():
        write_json(split_path, split.names(), overwrite=True, indent=1)
    config = finetune_config(base, args, stages, split, outdir)
    return base, stages, split, outdir, config


def finetune(args) -> int:
    import torch

    from segcore.pipeline import resolve_device

    tick = time.perf_counter()
    progress = Progress()
    progress.start("check", f"checking the dataset {args.data} and the model {args.model}")
    several = distributed.from_environment().distributed
    if several:   # under torchrun: join the other processes first (the device is then this rank's GPU)
        device = distributed.start(resolve_device(args.device))
    base, stages, split, outdir, config = prepare_run(args)
    log(f"base {base.name} {base.version}; {len(split.train)} training and {len(split.held_out)} held-out cases; "
        f"tuning {', '.join(stages)}; run folder {outdir}")
    if not several:
        device = resolve_device(args.device)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    base_rows = base_scores(base, split, args.device, outdir, progress) if distributed.is_main() else []
    train(config, base.task, stages, split, device, outdir, args.resume, progress)
    if not distributed.is_main():
        return 0        # rank 0 scores the tuned model, exports and installs it
    package, rows = export(base, config, outdir, split, stages, args.export, args.overwrite, args.device,
                           base_rows, progress)
    write_comparison(rows, outdir)
    installed = install(package, outdir, args.overwrite) if args.install else None
    print(comparison_table(rows))
    summary = {"package": package.name, "version": package.version, "path": str(package.path),
               "installed": str(installed.path) if installed else None, "base": f"{base.name} {base.version}",
               "held_out": package.manifest["validation"]["held_out"], "rows": rows,
               "seconds": round(time.perf_counter() - tick, 1)}
    write_json(outdir / "summary.json", summary, overwrite=True, indent=1)
    progress.report(1.0, f"done in {summary['seconds']:.0f} s: {package.name} {package.version} at {package.path}"
                         + (f", installed as {installed.name}" if installed else ""))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return runs.run_deterministic_command(lambda: finetune(args))


if __name__ == "__main__":
    sys.exit(main())
