"""Where packages are found and how they are opened: the search path, listing, lookup by
name, verification and loading a stage's weights.

Packages are looked up in the bundled folder ``segcore/models/`` first, then in the
user's folder ``<PROSTATESEG_HOME>/models/``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from segcore import anatomy
from segcore.errors import ChecksumError, InputNotFoundError, ModelPackageError
from segcore.packages.manifest import (
    MANIFEST_NAME,
    NAME_PATTERN,
    UNSAFE_SUFFIXES,
    InputSpec,
    Stage,
    _file_name_problems,
    _parse_stages,
    manifest_problems,
    read_manifest,
    validate_manifest,
)

HOME_ENV = "PROSTATESEG_HOME"

_CHUNK = 1 << 20


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


# --------------------------------------------------------------------------- folders


def bundled_models_dir() -> Path:
    """``segcore/models``: the packages shipped with ProstateSeg (in a checkout, a wheel and Slicer alike)."""
    return Path(__file__).parent.parent / "models"


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


# --------------------------------------------------------------------------- listing and lookup


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


# --------------------------------------------------------------------------- verification and weights


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def load_stage_weights(package: ModelPackage, stage: str | None = None) -> dict:
    """Load one stage's safetensors weights as ``{name: torch.Tensor}`` (CPU), checking the sha256 first.

    The file is read once and the same bytes are hashed and parsed, so a file
    swapped between the check and the load cannot slip through.
    """
    chosen = package.stage(stage)
    path = package.path / chosen.weights
    expected = package.files.get(chosen.weights)
    if _file_name_problems(chosen.weights, "") or expected is None:
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
