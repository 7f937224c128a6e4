"""Model packages: the on-disk format, the registry of installed packages, and
install / verify / remove.

A model package is a folder (shipped as a ``.zip``) holding ``model.json`` and
the network weights as ``.safetensors`` files. Nothing in a package can run
code: weights are never unpickled, and a package that references or carries a
pickle or code file is refused.

Packages are looked up in the bundled folder ``Resources/Models/`` first, then
in the user's folder ``<PROSTATESEG_HOME>/models/``. Installing a package whose
name is bundled is refused (the bundled one would always win); replacing a user
package needs ``force=True``.

Importing this module is cheap: torch, safetensors, tqdm and urllib are imported
inside the functions that need them, and nothing touches the network unless an
install from a URL is asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from segcore import anatomy
from segcore.errors import ChecksumError, InputNotFoundError, ModelPackageError, OutputExistsError

SCHEMA_VERSION = 1
MANIFEST_NAME = "model.json"
WEIGHTS_SUFFIX = ".safetensors"
TASKS = ("prostate", "organs")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
HOME_ENV = "PROSTATESEG_HOME"

# Sanity limits: a manifest is a small text file; archives and downloads are
# capped so a hostile or broken source cannot fill the disk.
MAX_MANIFEST_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 4 << 30
MAX_ARCHIVE_ENTRIES = 10_000
DEFAULT_TIMEOUT_S = 60.0

# Files that can carry executable content (pickles, native code, scripts).
UNSAFE_SUFFIXES = frozenset(
    {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npy", ".npz", ".h5", ".py",
     ".pyc", ".pyd", ".so", ".dll", ".dylib", ".exe", ".sh", ".bat", ".cmd", ".ps1", ".onnx"}
)
# Clutter that archivers add; silently skipped on extraction.
_ARCHIVE_JUNK = ("__MACOSX", ".DS_Store", "Thumbs.db")

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class Stage:
    """One network of a pipeline: which architecture, built how, with which weights."""

    name: str
    architecture: str
    arguments: dict
    weights: str


@dataclass(frozen=True)
class InputSpec:
    """How a CT must be prepared for the networks."""

    spacing_mm: tuple[float, float, float]
    intensity_window: tuple[float, float]
    normalisation: str


@dataclass
class ModelPackage:
    """A validated model package folder (manifest checked, weights files present).

    Weights hashes are checked when weights are loaded (`load_weights`) and by
    `verify`, not on every load, so listing packages stays fast.
    """

    path: Path
    schema_version: int
    name: str
    version: str
    task: str
    description: str
    stages: dict[str, Stage]
    input: InputSpec
    labels: list[anatomy.Structure]
    training: dict
    validation: dict
    licence: str
    files: dict[str, str]
    manifest: dict = field(repr=False)
    where: str = "path"  # "bundled", "user" or "path" (opened straight from a folder)

    @classmethod
    def load(cls, path: str | Path, where: str = "path") -> ModelPackage:
        """Read and validate ``<path>/model.json``; check every listed file exists."""
        path = Path(path)
        data = read_manifest(path)
        validate_manifest(data, source=str(path / MANIFEST_NAME))
        missing = [name for name in data["files"] if not (path / name).is_file()]
        if missing:
            raise ModelPackageError(
                f"model package {path} is incomplete: missing {', '.join(sorted(missing))}. "
                "Reinstall the package from its archive."
            )
        return cls._from_manifest(path, data, where)

    @classmethod
    def _from_manifest(cls, path: Path, data: dict, where: str) -> ModelPackage:
        spec = data["input"]
        return cls(
            path=path,
            schema_version=data["schema_version"],
            name=data["name"],
            version=data["version"],
            task=data["task"],
            description=data["description"],
            stages=_parse_stages(data["stages"]),
            input=InputSpec(
                spacing_mm=tuple(float(v) for v in spec["spacing_mm"]),
                intensity_window=tuple(float(v) for v in spec["intensity_window"]),
                normalisation=spec["normalisation"],
            ),
            labels=[anatomy.Structure.from_json(entry) for entry in data["labels"]],
            training=dict(data["training"]),
            validation=dict(data["validation"]),
            licence=data["licence"],
            files=dict(data["files"]),
            manifest=data,
            where=where,
        )

    def stage(self, name: str | None = None) -> Stage:
        """The named stage; without a name, the only stage of a one-stage package."""
        if name is None:
            if len(self.stages) == 1:
                return next(iter(self.stages.values()))
            raise ModelPackageError(
                f"model package {self.name!r} has stages {', '.join(self.stages)}: say which one to load."
            )
        try:
            return self.stages[name]
        except KeyError:
            raise ModelPackageError(
                f"model package {self.name!r} has no stage {name!r}; its stages are {', '.join(self.stages)}."
            ) from None

    def load_weights(self, stage: str | None = None) -> dict:
        """A stage's weights as ``{name: torch.Tensor}`` on the CPU, after checking their sha256."""
        return load_stage_weights(self, stage)

    def verify(self) -> VerifyReport:
        """Re-validate the manifest and recompute every sha256."""
        return verify_package(self.path)

    def describe(self) -> str:
        """A human-readable summary (what `prostateseg models info` prints)."""
        lines = [
            f"{self.name} {self.version}  ({self.task}, {self.where})",
            f"  path:        {self.path}",
            f"  description: {self.description}",
            f"  licence:     {self.licence}",
            (
                f"  input:       spacing {' x '.join(f'{v:g}' for v in self.input.spacing_mm)} mm, "
                f"window [{self.input.intensity_window[0]:g}, {self.input.intensity_window[1]:g}] HU, "
                f"normalisation {self.input.normalisation}"
            ),
            "  stages:",
        ]
        lines += [f"    {s.name}: {s.architecture} ({s.weights})" for s in self.stages.values()]
        lines.append("  labels:")
        lines += [f"    {s.value}: {s.name}" for s in self.labels]
        if self.training:
            lines.append("  training:")
            lines += [f"    {k}: {v}" for k, v in self.training.items()]
        if self.validation:
            lines.append("  validation:")
            lines += [f"    {k}: {v}" for k, v in self.validation.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class PackageEntry:
    """One line of `list_packages`."""

    name: str
    version: str
    task: str
    where: str  # "bundled" or "user"
    path: Path
    ok: bool
    problem: str = ""  # why it is damaged, when it is
    shadowed: bool = False  # a user package hidden by a bundled one of the same name


@dataclass
class VerifyReport:
    """The outcome of `verify_package`: empty `problems` means the package is sound."""

    path: Path
    name: str
    problems: list[str] = field(default_factory=list)
    checked_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"{self.name}: OK ({len(self.checked_files)} weights files checked) at {self.path}"
        return "\n".join([f"{self.name}: DAMAGED at {self.path}"] + [f"  - {p}" for p in self.problems])


# --------------------------------------------------------------------------- manifest


def read_manifest(folder: str | Path) -> dict:
    """The parsed ``model.json`` of a package folder (not yet validated)."""
    folder = Path(folder)
    if not folder.exists():
        raise InputNotFoundError(f"model package folder {folder} does not exist.")
    if not folder.is_dir():
        raise ModelPackageError(f"{folder} is not a model package folder (expected a folder with {MANIFEST_NAME}).")
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise ModelPackageError(
            f"{folder} holds no {MANIFEST_NAME}: it is not a model package, or it is damaged. "
            "Reinstall it from its archive."
        )
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise ModelPackageError(f"{manifest} is larger than {MAX_MANIFEST_BYTES} bytes: not a model manifest.")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ModelPackageError(f"{manifest} is not UTF-8 text ({error}).") from None
    except json.JSONDecodeError as error:
        raise ModelPackageError(
            f"{manifest} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    if not isinstance(data, dict):
        raise ModelPackageError(f"{manifest} must hold a JSON object, not {type(data).__name__}.")
    return data


def validate_manifest(data: dict, source: str = MANIFEST_NAME) -> None:
    """Raise ModelPackageError listing every problem of a manifest; return if it is valid."""
    problems = manifest_problems(data)
    if problems:
        raise ModelPackageError(
            f"{source} is not a valid model manifest:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nFix model.json, or re-export the package with the training kit."
        )


def manifest_problems(data: dict) -> list[str]:
    """Every problem of a manifest, one sentence each. Raises for a foreign schema version."""
    if not isinstance(data, dict):
        return [f"the manifest must be a JSON object, not {type(data).__name__}"]
    _check_schema_version(data.get("schema_version"))
    problems: list[str] = []

    def need(key, kind, what):
        value = data.get(key)
        if key not in data:
            problems.append(f"field {key!r} is missing (expected {what})")
            return None
        if not isinstance(value, kind) or isinstance(value, bool):
            problems.append(f"field {key!r} must be {what}, got {_show(value)}")
            return None
        return value

    name = need("name", str, "a lower-case identifier such as 'prostate-demo'")
    if name is not None and not NAME_PATTERN.fullmatch(name):
        problems.append(
            f"field 'name' is {name!r}: use 1-64 characters from a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    version = need("version", str, "a version string such as '1.0'")
    if version is not None and (not version.strip() or len(version) > 64):
        problems.append("field 'version' must be a non-empty string of at most 64 characters")
    task = need("task", str, f"one of {', '.join(map(repr, TASKS))}")
    if task is not None and task not in TASKS:
        problems.append(f"field 'task' is {task!r}: expected one of {', '.join(map(repr, TASKS))}")
    need("description", str, "a text")
    licence = need("licence", str, "the licence of the weights, e.g. 'Apache-2.0'")
    if licence is not None and not licence.strip():
        problems.append("field 'licence' is empty: say under which licence the weights are distributed")
    training = need("training", dict, "an object with data, seed, commit and epochs")
    if training is not None:
        problems += _training_problems(training)
    need("validation", dict, "an object of validation metrics (may be empty)")

    files = need("files", dict, "an object mapping each weights file name to its sha256")
    if files is not None:
        for fname, digest in files.items():
            problems += _file_name_problems(fname, "field 'files'")
            if not isinstance(digest, str) or not _SHA256_PATTERN.fullmatch(digest):
                problems.append(f"files[{fname!r}] must be a sha256 of 64 lower-case hex digits, got {_show(digest)}")

    if "stages" not in data:
        problems.append("field 'stages' is missing (expected a list or object of stages)")
    else:
        problems += _stages_problems(data["stages"], files if files is not None else {})

    spec = need("input", dict, "an object with spacing_mm, intensity_window and normalisation")
    if spec is not None:
        problems += _input_problems(spec)

    labels = need("labels", list, "a list of structure records (value, name, color, category, type, modifier)")
    if labels is not None:
        problems += _labels_problems(labels)
    return problems


def _check_schema_version(version) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelPackageError(
            f"model.json field 'schema_version' must be an integer (this ProstateSeg reads {SCHEMA_VERSION}), "
            f"got {_show(version)}: the file is not a ProstateSeg model manifest or is damaged."
        )
    if version > SCHEMA_VERSION:
        raise ModelPackageError(
            f"this model package has schema version {version}: it was made for a newer ProstateSeg "
            f"(this one reads schema {SCHEMA_VERSION}). Upgrade ProstateSeg to use it."
        )
    if version < SCHEMA_VERSION:
        raise ModelPackageError(
            f"this model package has schema version {version}: it was made for an older ProstateSeg "
            f"(this one reads schema {SCHEMA_VERSION}). Re-export it with the current training kit."
        )


def _training_problems(training: dict) -> list[str]:
    problems = []
    for key in ("data", "seed", "commit", "epochs"):
        if key not in training:
            problems.append(f"training.{key} is missing (provenance: write null if it is unknown)")
    if training.get("data") is not None and not isinstance(training["data"], str):
        problems.append(f"training.data must be a text describing the training data, got {_show(training['data'])}")
    for key in ("seed", "epochs"):
        value = training.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            problems.append(f"training.{key} must be a non-negative integer or null, got {_show(value)}")
    if training.get("commit") is not None and not isinstance(training["commit"], str):
        problems.append(f"training.commit must be a text (e.g. a git commit), got {_show(training['commit'])}")
    return problems


def _file_name_problems(fname, where: str) -> list[str]:
    if not isinstance(fname, str) or not fname:
        return [f"{where}: file names must be non-empty texts, got {_show(fname)}"]
    if "/" in fname or "\\" in fname or fname in (".", "..") or fname.startswith(".") or ":" in fname:
        return [f"{where}: {fname!r} must be a plain file name inside the package (no folders, no leading dot)"]
    if not fname.endswith(WEIGHTS_SUFFIX):
        return [(
            f"{where}: {fname!r} is not a {WEIGHTS_SUFFIX} file; packages hold weights only as safetensors "
            "(pickled .pt/.pth/.ckpt files can run code and are refused). Convert the weights with "
            "safetensors.torch.save_file."
        )]
    return []


def _parse_stages(stages) -> dict[str, Stage]:
    items = stages.items() if isinstance(stages, dict) else (
        (entry.get("name", f"stage{i + 1}"), entry) for i, entry in enumerate(stages)
    )
    return {
        name: Stage(name=name, architecture=entry["architecture"], arguments=dict(entry["arguments"]),
                    weights=entry["weights"])
        for name, entry in items
    }


def _stages_problems(stages, files: dict) -> list[str]:
    if isinstance(stages, dict):
        items = list(stages.items())
    elif isinstance(stages, list):
        items = [(e.get("name", f"stage{i + 1}") if isinstance(e, dict) else f"stage{i + 1}", e)
                 for i, e in enumerate(stages)]
    else:
        return [f"field 'stages' must be a list or an object of stages, got {_show(stages)}"]
    if not items:
        return ["field 'stages' is empty: a package needs at least one network"]
    problems = []
    seen = set()
    for name, entry in items:
        where = f"stage {name!r}"
        if not isinstance(name, str) or not name:
            problems.append(f"stage names must be non-empty texts, got {_show(name)}")
        elif name in seen:
            problems.append(f"stage name {name!r} is used twice")
        seen.add(name)
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object with architecture, arguments and weights")
            continue
        arch = entry.get("architecture")
        if not isinstance(arch, str) or not arch.strip():
            problems.append(f"{where}: 'architecture' must be the name of a network, got {_show(arch)}")
        if not isinstance(entry.get("arguments"), dict):
            problems.append(f"{where}: 'arguments' must be an object of constructor arguments, "
                            f"got {_show(entry.get('arguments'))}")
        weights = entry.get("weights")
        name_problems = _file_name_problems(weights, f"{where} 'weights'")
        problems += name_problems
        if not name_problems and weights not in files:
            problems.append(f"{where}: weights file {weights!r} has no sha256 in field 'files'")
    return problems


def _input_problems(spec: dict) -> list[str]:
    problems = []
    spacing = spec.get("spacing_mm")
    if not (_numbers(spacing, 3) and all(v > 0 for v in spacing)):
        problems.append(f"input.spacing_mm must be three positive numbers [x, y, z] in mm, got {_show(spacing)}")
    window = spec.get("intensity_window")
    if not (_numbers(window, 2) and window[0] < window[1]):
        problems.append(f"input.intensity_window must be [low, high] in HU with low < high, got {_show(window)}")
    norm = spec.get("normalisation")
    if not isinstance(norm, str) or not norm.strip():
        problems.append(f"input.normalisation must name the intensity normalisation, got {_show(norm)}")
    return problems


def _labels_problems(labels: list) -> list[str]:
    if not labels:
        return ["field 'labels' is empty: list the structures the package segments"]
    problems = []
    values, names = set(), set()
    for i, entry in enumerate(labels):
        where = f"labels[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be a structure record object, got {_show(entry)}")
            continue
        value, name, color = entry.get("value"), entry.get("name"), entry.get("color")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            problems.append(f"{where}.value must be an integer label from 1 to 255 (0 is background), got {_show(value)}")
            value = None
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}.name must be a non-empty text, got {_show(name)}")
            name = None
        if not (isinstance(color, list) and len(color) == 3
                and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)):
            problems.append(f"{where}.color must be [r, g, b] with integers 0-255, got {_show(color)}")
        for key in ("category", "type", "modifier"):
            code = entry.get(key)
            if code is None:
                continue
            if not (isinstance(code, dict) and all(isinstance(code.get(k), str) for k in ("scheme", "code", "meaning"))):
                problems.append(f"{where}.{key} must be an object with scheme, code and meaning texts, got {_show(code)}")
        if value is not None:
            if value in values:
                problems.append(f"{where}: label value {value} is used twice")
            values.add(value)
        if name is not None:
            if name in names:
                problems.append(f"{where}: structure name {name!r} is used twice")
            names.add(name)
        # Label values are fixed project-wide; a package must not renumber known structures.
        if value is not None and name is not None:
            known = anatomy.BY_NAME.get(name)
            if known is not None and known.value != value:
                problems.append(f"{where}: {name!r} has label value {known.value} in ProstateSeg, not {value}")
            elif known is None and value in anatomy.BY_VALUE:
                problems.append(f"{where}: label value {value} belongs to {anatomy.BY_VALUE[value].name!r}, "
                                f"not {name!r}; give new structures values above {max(anatomy.BY_VALUE)}")
    return problems


def _numbers(value, count: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- hashing and weights


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def normalise_sha256(value) -> str:
    """Accept 'ABC...', 'sha256:abc...' or ' abc... '; return 64 lower-case hex digits or raise."""
    text = str(value or "").strip().lower()
    text = text.removeprefix("sha256:")
    if not _SHA256_PATTERN.fullmatch(text):
        raise ModelPackageError(
            f"the sha256 {value!r} is not 64 hexadecimal digits. A package archive can only be installed "
            "together with the sha256 published by its maker (compute it with `sha256sum` if you made it)."
        )
    return text


def load_stage_weights(package: ModelPackage, stage: str | None = None) -> dict:
    """Load one stage's safetensors weights as ``{name: torch.Tensor}`` (CPU), checking the sha256 first.

    The file is read once and the same bytes are hashed and parsed, so a file
    swapped between the check and the load cannot slip through.
    """
    chosen = package.stage(stage)
    path = package.path / chosen.weights
    expected = package.files.get(chosen.weights)
    if not chosen.weights.endswith(WEIGHTS_SUFFIX) or expected is None:
        raise ModelPackageError(f"stage {chosen.name!r} of {package.name!r} references {chosen.weights!r}, "
                                "which is not a listed safetensors file.")
    if not path.is_file():
        raise ModelPackageError(f"weights file {path} is missing: reinstall the model package {package.name!r}.")
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise ChecksumError(
            f"weights file {path} is damaged or was changed: its sha256 is {got}, model.json expects {expected}. "
            f"Reinstall the model package {package.name!r}."
        )
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ModelPackageError(f"weights file {path} is not a readable safetensors file: {error}") from None


# --------------------------------------------------------------------------- creating and zipping


def create_package(folder: str | Path, manifest: dict, weights: dict, *, overwrite: bool = False) -> ModelPackage:
    """Write a new package folder: one safetensors file per ``weights`` entry plus model.json.

    ``weights`` maps file names (``*.safetensors``) to ``{tensor name: torch.Tensor}``.
    ``manifest`` is model.json without ``files`` (computed here); ``schema_version``
    defaults to the current one and labels may be given as `anatomy.Structure`.
    The folder is assembled beside its final place and renamed in, so it is
    either complete or absent.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputExistsError(f"{folder} exists; choose another folder or ask to overwrite it.")
    data = dict(manifest)
    data.setdefault("schema_version", SCHEMA_VERSION)
    data["labels"] = [s.to_json() if isinstance(s, anatomy.Structure) else s for s in data.get("labels", [])]
    try:  # a JSON round trip turns tuples into lists and finds values JSON cannot hold
        data = json.loads(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ModelPackageError(f"the manifest for {folder} cannot be written as JSON: {error}") from None
    problems = []
    for fname, tensors in weights.items():
        problems += _file_name_problems(fname, "weights")
        if not isinstance(tensors, dict) or not tensors:
            problems.append(f"weights[{fname!r}] must be a non-empty dict of tensors")
        elif not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            problems.append(f"weights[{fname!r}] must map tensor names (texts) to torch tensors")
    if problems:
        raise ModelPackageError("cannot create the model package:\n" + "\n".join(f"  - {p}" for p in problems))
    # Placeholder hashes let the manifest be checked before anything is written.
    data["files"] = {fname: "0" * 64 for fname in weights}
    validate_manifest(data, source=f"manifest for {folder}")

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.create-", dir=folder.parent))
    try:
        for fname, tensors in weights.items():
            # save_file needs contiguous CPU tensors that share no memory (tied weights do).
            plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            save_file(plain, str(staging / fname), metadata={"format": "pt"})
            data["files"][fname] = sha256_file(staging / fname)
        _write_json_atomic(staging / MANIFEST_NAME, data)
        ModelPackage.load(staging)
        _move_into_place(staging, folder, replace=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelPackage.load(folder)


def zip_package(folder: str | Path, archive: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Verify a package folder and pack it as ``<archive>`` (default ``<name>-<version>.zip`` beside it).

    Entries sit under one top-level folder named after the package, in a fixed
    order with fixed timestamps, so the same package always gives the same
    archive and the same sha256 (publish it with `sha256_file`).
    """
    report = verify_package(folder)
    if not report.ok:
        raise ModelPackageError(f"refusing to zip a damaged package:\n{report}")
    package = ModelPackage.load(folder)
    archive = Path(archive) if archive is not None else package.path.parent / f"{package.name}-{package.version}.zip"
    if archive.exists() and not overwrite:
        raise OutputExistsError(f"{archive} exists; choose another name or ask to overwrite it.")
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".tmp", dir=archive.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp_name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for fname in [MANIFEST_NAME, *sorted(package.files)]:
                info = zipfile.ZipInfo(f"{package.name}/{fname}", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with open(package.path / fname, "rb") as src, zf.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(tmp_name, archive)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return archive


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, ensure_ascii=False)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _move_into_place(source: Path, target: Path, *, replace: bool) -> None:
    """Rename a complete folder to ``target``; with ``replace``, swap out an existing one.

    The old folder is first renamed aside, so a failure puts it back and no
    half-replaced package is ever visible.
    """
    if not target.exists():
        os.rename(source, target)
        return
    if not replace:
        raise OutputExistsError(f"{target} exists.")
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / "old"
    try:
        os.rename(target, aside)
        try:
            os.rename(source, target)
        except OSError:
            os.rename(aside, target)
            raise
    finally:
        shutil.rmtree(aside.parent, ignore_errors=True)


# --------------------------------------------------------------------------- registry


def bundled_models_dir() -> Path:
    """``<repository>/Resources/Models``: the packages shipped with ProstateSeg."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def default_home(platform: str | None = None, environ=None) -> Path:
    """The per-user data folder used when PROSTATESEG_HOME is not set."""
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    home = Path(environ.get("HOME") or environ.get("USERPROFILE") or Path.home())
    if platform.startswith("win"):
        base = environ.get("LOCALAPPDATA")
        return (Path(base) if base else home / "AppData" / "Local") / "prostateseg"
    if platform == "darwin":
        return home / "Library" / "Application Support" / "prostateseg"
    base = environ.get("XDG_DATA_HOME")
    return (Path(base) if base else home / ".local" / "share") / "prostateseg"


def prostateseg_home() -> Path:
    """The user's ProstateSeg folder: $PROSTATESEG_HOME, else `default_home()`."""
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else default_home()


def user_models_dir() -> Path:
    """Where installed packages live: ``<home>/models/<name>/``."""
    return prostateseg_home() / "models"


def search_path() -> list[tuple[str, Path]]:
    """The package folders in lookup order: bundled first, then the user's."""
    return [("bundled", bundled_models_dir()), ("user", user_models_dir())]


def list_packages(*, check_hashes: bool = False) -> list[PackageEntry]:
    """Every package on the search path, damaged ones included (``ok=False`` with the reason).

    Hashes are recomputed only with ``check_hashes`` (slow for big weights).
    """
    entries = []
    seen = set()
    for where, root in search_path():
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            # Hidden folders are our own half-built installs and removals.
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            entries.append(_entry(folder, where, check_hashes, shadowed=folder.name in seen))
            seen.add(folder.name)
    return entries


def _entry(folder: Path, where: str, check_hashes: bool, shadowed: bool) -> PackageEntry:
    try:
        package = _load_registered(folder, where)
    except (ModelPackageError, OSError) as error:
        data = _manifest_or_empty(folder)
        return PackageEntry(
            name=folder.name, version=str(data.get("version", "?")), task=str(data.get("task", "?")),
            where=where, path=folder, ok=False, problem=str(error), shadowed=shadowed,
        )
    problem = ""
    if check_hashes:
        report = verify_package(folder)
        problem = "; ".join(report.problems)
    return PackageEntry(
        name=package.name, version=package.version, task=package.task, where=where, path=folder,
        ok=not problem, problem=problem, shadowed=shadowed,
    )


def _manifest_or_empty(folder: Path) -> dict:
    try:
        return read_manifest(folder)
    except (ModelPackageError, OSError):
        return {}


def _load_registered(folder: Path, where: str) -> ModelPackage:
    package = ModelPackage.load(folder, where=where)
    if package.name != folder.name:
        raise ModelPackageError(
            f"model package folder {folder} holds a package named {package.name!r}; "
            f"the folder must be named after it. Reinstall the package."
        )
    return package


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ModelPackageError(
            f"{name!r} is not a model package name (lower-case letters, digits, '_', '.', '-'). "
            "See `prostateseg models list`."
        )


def _available() -> str:
    names = sorted({e.name for e in list_packages()})
    return f"available: {', '.join(names)}" if names else "no packages are installed"


def find_package(name: str) -> ModelPackage:
    """The package called ``name``: the bundled one if there is one, else the user's."""
    _check_name(name)
    for where, root in search_path():
        folder = root / name
        if folder.is_dir():
            return _load_registered(folder, where)
    raise ModelPackageError(
        f"no model package named {name!r} ({_available()}). "
        "Install one with `prostateseg models install <zip or https URL> --sha256 <hash>`."
    )


def _locate(name_or_path: str | Path) -> tuple[Path, str]:
    """(folder, where) for a registry name, or for a folder path (a `Path`, or a text that is no name)."""
    text = str(name_or_path)
    if not isinstance(name_or_path, Path) and NAME_PATTERN.fullmatch(text):
        for where, root in search_path():
            if (root / text).is_dir():
                return root / text, where
        if not Path(text).is_dir():
            raise ModelPackageError(
                f"no model package named {text!r} ({_available()}). "
                "Install one with `prostateseg models install <zip or https URL> --sha256 <hash>`."
            )
    return Path(text), "path"


def open_package(name_or_path: str | Path) -> ModelPackage:
    """A package by registry name (bundled first), or straight from a folder when given a path."""
    folder, where = _locate(name_or_path)
    return ModelPackage.load(folder) if where == "path" else _load_registered(folder, where)


def verify_package(name_or_path: str | Path) -> VerifyReport:
    """Re-validate a package and recompute every sha256; problems are reported, not raised.

    Raises only when there is no such package at all.
    """
    folder, where = _locate(name_or_path)
    if not folder.exists():
        raise InputNotFoundError(f"model package folder {folder} does not exist.")
    report = VerifyReport(path=folder, name=folder.name)
    try:
        data = read_manifest(folder)
        report.name = str(data.get("name", folder.name))
        problems = manifest_problems(data)
    except ModelPackageError as error:
        report.problems.append(str(error))
        return report
    report.problems += problems
    if where != "path" and report.name != folder.name:
        report.problems.append(f"the folder is named {folder.name!r} but holds package {report.name!r}")
    files = data.get("files") if isinstance(data.get("files"), dict) else {}
    for fname, expected in files.items():
        if _file_name_problems(fname, ""):
            continue  # already reported; never open paths a manifest should not name
        path = folder / fname
        if not path.is_file():
            report.problems.append(f"weights file {fname} is missing")
            continue
        got = sha256_file(path)
        report.checked_files.append(fname)
        if got != expected:
            report.problems.append(
                f"weights file {fname} is damaged or was changed: sha256 {got}, model.json expects {expected}"
            )
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            report.problems.append(f"{path.relative_to(folder)} is a symbolic link; packages hold plain files only")
        elif path.is_file() and path.suffix.lower() in UNSAFE_SUFFIXES:
            report.problems.append(
                f"{path.relative_to(folder)} may hold a pickle or code; packages may hold only "
                "safetensors weights and model.json. Remove it."
            )
    return report


# --------------------------------------------------------------------------- install / remove


def install_package(
    source: str | Path,
    sha256: str,
    *,
    force: bool = False,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ModelPackage:
    """Install a package from a ``.zip`` file or an ``https://`` URL into the user's models folder.

    ``sha256`` is the archive's published hash and is required; it is checked
    before anything is extracted. A name that is bundled is refused; an
    installed user package of the same name is replaced only with ``force``.
    Nothing is left behind when anything fails.
    """
    expected = normalise_sha256(sha256)
    text = str(source)
    if "://" in text:
        return _install_from_url(text, expected, force=force, progress=progress, timeout=timeout,
                                 max_bytes=max_bytes)
    archive = Path(text).expanduser()
    if not archive.exists():
        raise InputNotFoundError(f"model package archive {archive} does not exist.")
    if not archive.is_file():
        raise ModelPackageError(f"{archive} is not a file: give the package's .zip archive.")
    got = sha256_file(archive)
    if got != expected:
        raise ChecksumError(
            f"{archive} does not have the promised sha256: expected {expected}, got {got}. "
            "The archive is damaged, incomplete or not the one published; download it again."
        )
    return _install_verified_zip(archive, force=force, max_bytes=max_bytes)


def remove_package(name: str) -> Path:
    """Delete an installed user package; bundled packages cannot be removed. Returns the removed folder."""
    _check_name(name)
    folder = user_models_dir() / name
    if not folder.is_dir():
        if (bundled_models_dir() / name).is_dir():
            raise ModelPackageError(
                f"model package {name!r} is bundled with ProstateSeg and cannot be removed; "
                "only packages you installed can be."
            )
        raise ModelPackageError(f"no installed model package named {name!r} ({_available()}).")
    # Rename first so a failed delete never leaves something that looks like a package.
    graveyard = Path(tempfile.mkdtemp(prefix=f".{name}.remove-", dir=folder.parent))
    os.rename(folder, graveyard / name)
    shutil.rmtree(graveyard, ignore_errors=True)
    return folder


def _install_verified_zip(archive: Path, *, force: bool, max_bytes: int) -> ModelPackage:
    models = user_models_dir()
    models.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=models))
    try:
        root = _safe_extract(archive, staging / "x", max_bytes=max_bytes)
        report = verify_package(root)
        if not report.ok:
            raise ModelPackageError(f"the archive {archive.name} holds a damaged or unsafe package:\n{report}")
        package = ModelPackage.load(root)
        if (bundled_models_dir() / package.name).exists():
            raise ModelPackageError(
                f"a model package named {package.name!r} is bundled with ProstateSeg, and a user package "
                "of that name would never be used. Give the package another name in model.json and re-export it."
            )
        target = models / package.name
        if target.exists() and not force:
            installed = _manifest_or_empty(target).get("version", "?")
            raise ModelPackageError(
                f"model package {package.name!r} (version {installed}) is already installed at {target}; "
                "remove it first or install with --force to replace it."
            )
        try:
            _move_into_place(root, target, replace=force)
        except OSError as error:  # e.g. another install of the same name finished first
            raise ModelPackageError(f"could not move the package into {target}: {error}. Try again.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _load_registered(target, "user")


def _safe_extract(archive: Path, dest: Path, *, max_bytes: int) -> Path:
    """Extract a package archive into ``dest`` after checking every entry; return the package root.

    Refused: absolute names, drive letters, backslashes, ``..``, symbolic links
    and other special files, names differing only by case, too many entries or
    bytes. The package may sit at the archive root or in one top-level folder.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelPackageError(f"{archive} is not a readable zip archive ({error}).") from None
    with zf:
        members = []
        for info in zf.infolist():
            _check_member(info, archive)
            parts = PurePosixPath(info.filename).parts
            if any(part in _ARCHIVE_JUNK for part in parts) or any(p.startswith("._") for p in parts):
                continue
            members.append((info, parts))
        if len(members) > MAX_ARCHIVE_ENTRIES:
            raise ModelPackageError(f"{archive} has more than {MAX_ARCHIVE_ENTRIES} entries: not a model package.")
        total = sum(info.file_size for info, _ in members)
        if total > max_bytes:
            raise ModelPackageError(f"{archive} would unpack to {total} bytes, more than the limit of {max_bytes}.")
        lowered = [PurePosixPath(*parts).as_posix().lower() for _, parts in members]
        if len(set(lowered)) != len(lowered):
            raise ModelPackageError(f"{archive} has entries whose names differ only by case: refused.")

        files = {parts for info, parts in members if not info.is_dir()}
        if (MANIFEST_NAME,) in files:
            prefix = 0
        else:
            tops = {parts[0] for _, parts in members}
            if len(tops) != 1 or (next(iter(tops)), MANIFEST_NAME) not in files:
                raise ModelPackageError(
                    f"{archive} holds no {MANIFEST_NAME} at its root or in a single top-level folder: "
                    "it is not a model package."
                )
            prefix = 1

        dest.mkdir(parents=True)
        base = dest.resolve()
        for info, parts in members:
            rel = parts[prefix:]
            if not rel:
                continue
            target = dest.joinpath(*rel)
            if not target.resolve().is_relative_to(base):  # belt and braces after the name checks
                raise ModelPackageError(f"{archive}: entry {info.filename!r} would leave the package folder.")
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            except (OSError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error) as error:
                raise ModelPackageError(f"{archive}: cannot extract {info.filename!r} ({error}).") from None
    return dest


def _check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    name = info.filename
    refused = None
    if not name or "\x00" in name:
        refused = "has an empty or invalid name"
    elif info.flag_bits & 0x1:
        refused = "is encrypted"
    elif "\\" in name:
        refused = "contains a backslash"
    elif name.startswith("/"):
        refused = "is an absolute path"
    elif re.match(r"[A-Za-z]:", name):
        refused = "starts with a drive letter"
    elif ".." in PurePosixPath(name).parts:
        refused = "climbs out with '..'"
    else:
        mode = info.external_attr >> 16
        file_type = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            refused = "is a symbolic link"
        elif file_type and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            refused = "is not a plain file or folder"
    if refused:
        raise ModelPackageError(
            f"{archive}: entry {name!r} {refused}; an archive may only hold files inside the package "
            "folder. Refused: nothing was installed."
        )


def _install_from_url(url: str, expected: str, *, force: bool, progress: bool, timeout: float,
                      max_bytes: int) -> ModelPackage:
    from urllib.parse import urlsplit

    scheme = urlsplit(url).scheme.lower()
    if scheme != "https":
        raise ModelPackageError(
            f"only https:// URLs can be installed from, not {scheme}:// ({url}). "
            "Use the https address, or download the .zip yourself and install the file."
        )
    models = user_models_dir()
    models.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".zip", dir=models)
    try:
        with os.fdopen(fd, "wb") as stream:
            got = _download(url, stream, timeout=timeout, max_bytes=max_bytes, progress=progress)
        if got != expected:
            raise ChecksumError(
                f"the download from {url} does not have the promised sha256: expected {expected}, got {got}. "
                "Check the sha256 and the URL with the package's publisher."
            )
        return _install_verified_zip(Path(tmp_name), force=force, max_bytes=max_bytes)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _download(url: str, stream, *, timeout: float, max_bytes: int, progress: bool) -> str:
    """Stream ``url`` into ``stream``; return the sha256 of what was received."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    class HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
        # A redirect must not downgrade to plain http or another scheme.
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not newurl.lower().startswith("https://"):
                raise ModelPackageError(f"{url} redirects to {newurl}, which is not https: refused.")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    # create_default_context honours SSL_CERT_FILE / SSL_CERT_DIR (institutional CAs).
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl.create_default_context()), HttpsOnlyRedirects()
    )
    digest = hashlib.sha256()
    received = 0
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "prostateseg"}), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise ModelPackageError(f"{url} is {total} bytes, more than the limit of {max_bytes}.")
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", file=sys.stderr,
                      disable=not progress, leave=False) as bar:
                while chunk := resp.read(_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise ModelPackageError(f"{url} sends more than the limit of {max_bytes} bytes: stopped.")
                    digest.update(chunk)
                    stream.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise ModelPackageError(f"download of {url} failed: HTTP {error.code} {error.reason}.") from None
    except urllib.error.URLError as error:
        raise ModelPackageError(
            f"could not download {url}: {error.reason}. Check the address and the network; behind an "
            "institutional proxy or TLS inspection, point SSL_CERT_FILE at its CA certificate."
        ) from None
    except TimeoutError:
        raise ModelPackageError(f"download of {url} timed out after {timeout:g} s without data.") from None
    except (OSError, http.client.HTTPException) as error:
        raise ModelPackageError(f"download of {url} failed: {error}.") from None
    return digest.hexdigest()
