"""Where packages are found and how they are opened: the search path, listing, lookup by
name, verification and loading a stage's weights.

Packages are looked up in the bundled folder (``Resources/Models/``; ``segcore/models/`` in a wheel) first, then in the
user's folder ``<PROSTATESEG_HOME>/models/``.

`verify_package` is the one judge of a package: manifest (schema and ranges), sha256
of every weights file, no file the manifest does not list, and each network built
from its manifest (arguments bounded before anything is allocated), its weights
loaded strictly (names, shapes, kinds, all finite) and run once on a small zero
image. `list_packages` reports the same verdict: a package that passed is
remembered in ``<PROSTATESEG_HOME>/cache/verified-packages.json`` keyed by the size,
times and inode of each of its files, so listing re-checks only what changed.

Installs and removals work in hidden, locked staging folders in the models folder
(`staging_folder`); SIGTERM and SIGHUP are turned into KeyboardInterrupt meanwhile, so
the clean-up runs, and any staging folder left by a killed process is removed by the
next list, install or remove (`clear_stale_staging`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from segcore import anatomy
from segcore.errors import ChecksumError, InputNotFoundError, ModelPackageError, SegcoreError
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

# Bumped whenever verification learns a new check, so a package remembered as sound is checked again.
CHECKS_VERSION = 2
VERIFIED_CACHE = Path("cache") / "verified-packages.json"
# The zero image a network is test-run on is this many pixels a side (or the network's divisor, if larger);
# a network needing more than MAX_TEST_SIDE is refused.
TEST_SIDE = 32
MAX_TEST_SIDE = 512
# Staging folders: `staging_folder` makes .install-* and .remove-*; `segcore.files.move_into_place` makes
# .<name>.old-*; older versions made .download-*.zip and .<name>.remove-*.
_STAGING_NAME = re.compile(r"\.(install|remove|download)-.*|\.[a-z0-9][a-z0-9_.-]*\.(old|remove)-.*")
LOCK_NAME = ".lock"
# A staging folder without a lock (made a moment ago, by an older version, or where locks are not available)
# is left alone for this long.
STALE_AFTER_S = 600.0


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
        base = self.manifest.get("lineage", {}).get("base")
        if base:
            lines.append(f"  tuned from:  {base['name']} {base['version']}")
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
    """The packages shipped with ProstateSeg: ``segcore/models`` in an installed wheel, else the
    checkout's (and the Slicer extension's) ``Resources/Models`` beside ``segcore``."""
    segcore_dir = Path(__file__).resolve().parent.parent
    installed = segcore_dir / "models"
    return installed if installed.is_dir() else segcore_dir.parent / "Resources" / "Models"


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

    ``ok`` is `verify_package`'s verdict. A package that passed before and whose
    files have not changed since (same names, sizes, times and inodes) is not
    checked again; ``check_hashes`` checks every package afresh. Staging folders
    left by a killed install are removed first.
    """
    clear_stale_staging()
    entries = []
    seen = set()
    for where, folder in _package_folders():
        entries.append(_entry(folder, where, check_hashes, shadowed=folder.name in seen))
        seen.add(folder.name)
    return entries


def _package_folders() -> list[tuple[str, Path]]:
    """(where, folder) of every package folder on the search path; hidden folders are our staging folders."""
    found = []
    for where, root in search_path():
        try:
            children = sorted(root.iterdir()) if root.is_dir() else []
        except OSError:
            children = []
        found += [(where, f) for f in children if f.is_dir() and not f.name.startswith(".")]
    return found


def _entry(folder: Path, where: str, check_hashes: bool, shadowed: bool) -> PackageEntry:
    try:
        package = _load_registered(folder, where)
    except (ModelPackageError, OSError) as error:
        data = _manifest_or_empty(folder)
        return PackageEntry(
            name=folder.name, version=str(data.get("version", "?")), task=str(data.get("task", "?")),
            where=where, path=folder, ok=False, problem=str(error), shadowed=shadowed,
        )
    problem = "" if not check_hashes and _remembered(folder) else "; ".join(verify_package(folder).problems)
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
    names = sorted({folder.name for _, folder in _package_folders()})
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
    """A package by registry name (bundled first), or straight from a folder when given a path.

    A package is opened only if `verify_package` finds nothing wrong with it (checked
    once for each state of its files: see `list_packages`), so a damaged package
    never reaches segmentation.
    """
    folder, where = _locate(name_or_path)
    package = ModelPackage.load(folder) if where == "path" else _load_registered(folder, where)
    if not _remembered(folder):
        report = _verify(folder, where)
        if not report.ok:
            raise ModelPackageError(
                f"model package {package.name!r} at {folder} is damaged: "
                f"{'; '.join(p.rstrip('.') for p in report.problems)}. "
                "Reinstall it from its archive (details: prostateseg models verify)."
            )
    return package


# --------------------------------------------------------------------------- verification and weights


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_package(name_or_path: str | Path) -> VerifyReport:
    """Check a package completely; problems are reported, not raised.

    The manifest (schema, ranges), the sha256 of every weights file, files the
    manifest does not list, and then each stage's network: built from its
    arguments (bounded first), weights loaded strictly and all finite, one run on
    a small zero image (CPU, inference mode) giving finite values. Raises only
    when there is no such package at all.
    """
    folder, where = _locate(name_or_path)
    if not folder.exists():
        raise InputNotFoundError(f"model package folder {folder} does not exist.")
    return _verify(folder, where)


def _verify(folder: Path, where: str, *, remember: bool = True) -> VerifyReport:
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
    _check_files(folder, data, report)
    if not report.problems:
        report.problems += _network_problems(folder)
    if report.ok and remember:
        remember_verified(folder)
    return report


# What file managers drop into any folder they show (macOS Finder, Windows Explorer): never part of a package,
# never read, and no reason to call a package damaged.
OS_JUNK_NAMES = (".DS_Store", "Thumbs.db", "desktop.ini")


def is_os_junk(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and (path.name in OS_JUNK_NAMES or path.name.startswith("._"))


def _check_files(folder: Path, data: dict, report: VerifyReport) -> None:
    """Every listed weights file present with its sha256; nothing unlisted, linked or able to hold code."""
    files = data.get("files") if isinstance(data.get("files"), dict) else {}
    for fname, expected in files.items():
        if _file_name_problems(fname, ""):
            continue  # already reported; never open paths a manifest should not name
        path = folder / fname
        if not path.is_file():
            report.problems.append(f"weights file {fname} is missing")
            continue
        try:
            got = sha256_file(path)
        except OSError as error:
            report.problems.append(f"weights file {fname} cannot be read ({error.strerror or error})")
            continue
        report.checked_files.append(fname)
        if got != expected:
            report.problems.append(
                f"weights file {fname} is damaged or was changed: sha256 {got}, model.json expects {expected}"
            )
    listed = {MANIFEST_NAME, *files}
    for path in sorted(folder.iterdir()):  # an unlisted folder is one problem, whatever it holds
        name = path.name
        if path.is_symlink():
            report.problems.append(f"{name} is a symbolic link; packages hold plain files only")
        elif path.is_file() and path.suffix.lower() in UNSAFE_SUFFIXES:
            report.problems.append(
                f"{name} may hold a pickle or code; packages may hold only "
                "safetensors weights and model.json. Remove it."
            )
        elif name not in listed and not is_os_junk(path):
            what = "folder" if path.is_dir() else f"file of {_size(path)}"
            report.problems.append(f"{name} ({what}) is not listed in model.json; a package holds only model.json "
                                   "and the weights files it lists. Remove it, or reinstall the package.")


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "unknown size"
    return f"{size} bytes" if size < 1 << 20 else f"{size / (1 << 20):.1f} MB"


def _network_problems(folder: Path) -> list[str]:
    """Build each stage's network, load its weights strictly and run it once; one problem per failing stage."""
    try:
        package = ModelPackage.load(folder)
    except (ModelPackageError, OSError) as error:
        return [str(error)]
    import torch

    problems = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and much faster on a busy machine
    try:
        for name in package.stages:
            try:
                _test_run(package, name)
            except ModelPackageError as error:
                problems.append(f"stage {name!r}: {error}")
    finally:
        torch.set_num_threads(threads)
    return problems


def _test_run(package: ModelPackage, stage: str) -> None:
    import torch

    from segcore import networks

    spec = package.stage(stage)
    network = networks.build(spec.architecture, spec.arguments)
    networks.load_state(network, package.load_weights(stage), f"network {spec.architecture!r}")
    side = max(TEST_SIDE, int(getattr(network, "divisor", 1)))
    if side > MAX_TEST_SIDE:
        raise ModelPackageError(f"network {spec.architecture!r} needs images of multiples of {side} pixels, more "
                                f"than {MAX_TEST_SIDE}: its arguments are absurd. Re-export the package.")
    zeros = torch.zeros(1, int(getattr(network, "in_channels", 1)), side, side)
    try:
        with torch.inference_mode():
            output = network.eval()(zeros)
    except Exception as error:  # noqa: BLE001 - any failure of the test run means the package is damaged
        raise ModelPackageError(f"a test run of network {spec.architecture!r} on a {side}x{side} zero image "
                                f"fails ({type(error).__name__}: {error}). Re-export the package.") from None
    if not _finite(output):
        raise ModelPackageError(f"a test run of network {spec.architecture!r} on a zero image gives NaN or "
                                "infinite values: the weights are damaged. Reinstall or re-export the package.")


def _finite(output) -> bool:
    """Whether every floating tensor in a network's output (tensors, lists, tuples, dicts, dataclasses) is finite."""
    import torch

    if isinstance(output, torch.Tensor):
        return not torch.is_floating_point(output) or bool(torch.isfinite(output).all())
    if isinstance(output, (list, tuple)):
        return all(_finite(item) for item in output)
    if isinstance(output, dict):
        return all(_finite(item) for item in output.values())
    if hasattr(output, "__dataclass_fields__"):
        return all(_finite(getattr(output, name)) for name in output.__dataclass_fields__)
    return True


# --------------------------------------------------------------------------- what passed before


def _signature(folder: Path) -> str | None:
    """What identifies a package folder's exact files: their names, sizes, times and inodes (None if unreadable).

    A file rewritten in place gets a new change time (ctime), which no tool can set back.
    """
    import segcore

    try:
        stats = [(p.relative_to(folder).as_posix(), p.lstat()) for p in sorted(folder.rglob("*"))
                 if not is_os_junk(p)]
        root = folder.resolve()
    except OSError:
        return None
    rows = [[name, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name, st in stats]
    text = json.dumps([CHECKS_VERSION, segcore.__version__, str(root), rows])
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_path() -> Path:
    return prostateseg_home() / VERIFIED_CACHE


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _remembered(folder: Path) -> bool:
    """Whether this folder, exactly as it is now, passed `verify_package` before."""
    signature = _signature(folder)
    return signature is not None and _read_cache().get(str(folder.resolve())) == signature


def remember_verified(folder: Path) -> None:
    """Note that a registered package folder, as it is now, passed `verify_package` (best effort: a folder we
    cannot write to only means the next listing checks it again)."""
    from segcore.files import write_json

    signature = _signature(folder)
    if signature is None:
        return
    cache = _read_cache()
    cache = {k: v for k, v in cache.items() if isinstance(v, str) and Path(k).is_dir()}
    cache[str(folder.resolve())] = signature
    try:
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_json(_cache_path(), cache, overwrite=True)
    except (OSError, SegcoreError):
        pass


# --------------------------------------------------------------------------- staging folders and signals


@contextlib.contextmanager
def staging_folder(models: Path, kind: str):
    """A hidden folder ``.<kind>-*`` in ``models``, locked while in use and removed on leaving, whatever happens."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=models))
    except OSError as error:
        raise ModelPackageError(f"cannot write in the model folder {models} ({error.strerror or error}): make it "
                                f"writable, or set {HOME_ENV} to a folder you can write to.") from None
    lock = _hold_lock(folder)
    try:
        yield folder
    finally:
        if lock is not None:
            lock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _hold_lock(folder: Path):
    """An open, exclusively locked ``<folder>/.lock`` (None where file locks are not available)."""
    try:
        import fcntl
    except ImportError:  # Windows: stale folders are recognised by age alone
        return None
    try:
        stream = open(folder / LOCK_NAME, "w")  # noqa: SIM115 - held open for the folder's whole life
    except OSError:
        return None
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # e.g. a file system without locks: an unlocked lock file would look abandoned
        stream.close()
        (folder / LOCK_NAME).unlink(missing_ok=True)
        return None
    return stream


def _in_use(entry: Path) -> bool:
    """Whether a staging folder belongs to a live install or removal: its lock is held, or it is too young to
    judge (no lock yet, or no locks on this system)."""
    lock = entry / LOCK_NAME
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None and entry.is_dir() and lock.is_file():
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False  # nobody holds it: its process is gone
        except OSError:
            return True
        finally:
            os.close(fd)
    try:
        return time.time() - entry.lstat().st_mtime < STALE_AFTER_S
    except OSError:
        return False


def clear_stale_staging(models: Path | None = None) -> list[Path]:
    """Remove the staging folders in the user's models folder that no live process uses; return them."""
    models = user_models_dir() if models is None else models
    try:
        entries = [e for e in models.iterdir() if _STAGING_NAME.fullmatch(e.name)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        if _in_use(entry):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


@contextlib.contextmanager
def signals_interrupt():
    """While this runs, SIGTERM and SIGHUP (and SIGINT, if nothing handles it) raise KeyboardInterrupt, so that
    ``finally`` clean-up runs as it does for Ctrl-C. Only in the main thread, and only for signals left at their
    default action (a host application's own handlers are kept)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP", "SIGINT"):
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) is signal.SIG_DFL:
                previous[number] = signal.signal(number, interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


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
