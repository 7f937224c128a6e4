"""The manifest of a model package (``model.json``): its schema, reading and validation.

The shape of a manifest is published as a JSON Schema (draft 2020-12) beside
this module, ``model_package.schema.json``, and checked with the `jsonschema`
library; its errors are turned into one sentence each that names the field.
What JSON Schema cannot say (the schema version's advice, low < high, names and
label values used twice, stages whose weights have no sha256, label values that
ProstateSeg gives to another structure) is checked here in Python.

The schema is read, and `jsonschema` imported, on the first validation only.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from segcore import anatomy
from segcore.errors import InputNotFoundError, ModelPackageError

SCHEMA_VERSION = 1
MANIFEST_NAME = "model.json"
WEIGHTS_SUFFIX = ".safetensors"
TASKS = ("prostate", "organs", "refine")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
SCHEMA_FILE = Path(__file__).with_name("model_package.schema.json")

# A manifest is a small text file, and a shallow one.
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 32
# The stage-2 crop of the prostate pipeline, in voxels (crop_mm / input.spacing_mm): 64 M is 256 MB of float32.
MAX_CROP_VOXELS = 1 << 26

# Files that can carry executable content (pickles, native code, scripts).
UNSAFE_SUFFIXES = frozenset(
    {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npy", ".npz", ".h5", ".py",
     ".pyc", ".pyd", ".so", ".dll", ".dylib", ".exe", ".sh", ".bat", ".cmd", ".ps1", ".onnx"}
)

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


# --------------------------------------------------------------------------- reading


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
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            raise ModelPackageError(f"{manifest} is larger than {MAX_MANIFEST_BYTES} bytes: not a model manifest.")
        text = manifest.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ModelPackageError(f"{manifest} is not UTF-8 text ({error}).") from None
    except OSError as error:
        raise ModelPackageError(f"cannot read {manifest} ({error.strerror or error}): check its permissions, "
                                "or reinstall the package.") from None
    data = _parse_json(text, manifest)
    if not isinstance(data, dict):
        raise ModelPackageError(f"{manifest} must hold a JSON object, not {type(data).__name__}.")
    return data


def _parse_json(text: str, manifest: Path):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelPackageError(
            f"{manifest} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    except RecursionError:
        data = None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise ModelPackageError(f"{manifest} holds a value Python cannot read ({error}): not a model manifest.") \
            from None
    if data is None or _depth(data) > MAX_MANIFEST_DEPTH:
        raise ModelPackageError(f"{manifest} nests lists or objects more than {MAX_MANIFEST_DEPTH} levels deep: "
                                "it is not a model manifest, or it is damaged. Reinstall the package.")
    return data


def _depth(value) -> int:
    """How deeply lists and objects nest in a JSON value (0 for a plain value), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_MANIFEST_DEPTH:
            break
        todo.extend((child, level + 1) for child in children)
    return deepest


# --------------------------------------------------------------------------- validation


def manifest_schema() -> dict:
    """The JSON Schema of ``model.json`` (a fresh copy: changing it changes nothing here)."""
    return json.loads(json.dumps(_schema()))


def validate_manifest(data: dict, source: str = MANIFEST_NAME) -> None:
    """Raise ModelPackageError listing every problem of a manifest; return if it is valid."""
    problems = manifest_problems(data)
    if problems:  # one line, as every error a user can cause
        raise ModelPackageError(
            f"{source} is not a valid model manifest: {'; '.join(problems)}. "
            "Fix model.json, or re-export the package with the training kit."
        )


def manifest_problems(data: dict) -> list[str]:
    """Every problem of a manifest, one sentence each. Raises for a foreign schema version."""
    if not isinstance(data, dict):
        return [f"the manifest must be a JSON object, not {type(data).__name__}"]
    _check_schema_version(data.get("schema_version"))
    if _depth(data) > MAX_MANIFEST_DEPTH:
        return [f"the manifest nests lists or objects more than {MAX_MANIFEST_DEPTH} levels deep"]
    return (_schema_problems(data) + _window_problems(data) + _pipeline_problems(data) + _stages_problems(data)
            + _labels_problems(data))


def _file_name_problems(fname, where: str) -> list[str]:
    """The problem with a weights file name (the schema's rule), as a one-item list; empty if it is fine."""
    if isinstance(fname, str) and _weights_name_pattern().search(fname):
        return []
    return [f"{where}: {_show(fname)} must be {_schema()['$defs']['weights_file']['description']}"]


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


@functools.cache
def _schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


@functools.cache
def _validator():
    try:
        from jsonschema import validators
    except ImportError:
        raise ModelPackageError(
            "checking model.json needs the Python package jsonschema, which is not installed: "
            "install it with `pip install \"jsonschema>=4\"` (in Slicer, run Segment once to install "
            "ProstateSeg's packages)."
        ) from None
    base = validators.Draft202012Validator
    # Stricter than bare JSON Schema where Python's json differs: 1.0 and true are not integers, and the
    # NaN and Infinity that json.loads accepts are not numbers.
    types = base.TYPE_CHECKER.redefine_many({
        "integer": lambda _, v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda _, v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    })
    strict = validators.extend(base, validators={"pattern": _pattern_keyword}, type_checker=types)
    return strict(_schema())


def _pattern_keyword(validator, pattern, instance, schema):
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not _compile(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@functools.cache
def _compile(pattern: str) -> re.Pattern:
    # In JSON Schema (ECMA-262) a final "$" ends the text; Python's "$" also matches before a final newline.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _weights_name_pattern() -> re.Pattern:
    return _compile(_schema()["$defs"]["weights_file"]["pattern"])


def _schema_problems(data: dict) -> list[str]:
    order = list(_schema()["properties"])
    found = []  # (position of the top-level field, sentence)
    missing_seen = set()
    for error in _validator().iter_errors(data):
        path = tuple(error.absolute_path)
        if error.validator == "required":
            for key in error.validator_value:
                if key in error.instance or (path, key) in missing_seen:
                    continue
                missing_seen.add((path, key))
                expected = _describe(error.schema.get("properties", {}).get(key, {}))
                found.append(((path + (key,))[0], f"{_location(path + (key,))} is missing (expected {expected})"))
            continue
        description = _describe(error.schema)
        if description is None:
            sentence = f"{_location(path)}: {error.message}"
        elif "propertyNames" in error.relative_schema_path:
            sentence = f"{_location(path)} has the key {_show(error.instance)}, but each key must be {description}"
        else:
            sentence = f"{_location(path)} is {_show(error.instance)} but must be {description}"
        found.append((path[0] if path else "", sentence))
    found.sort(key=lambda item: order.index(item[0]) if item[0] in order else -1)
    return [sentence for _, sentence in found]


def _describe(subschema: dict) -> str | None:
    if "description" in subschema:
        return subschema["description"]
    ref = subschema.get("$ref", "")
    if ref.startswith("#/$defs/"):
        return _schema()["$defs"][ref.removeprefix("#/$defs/")].get("description")
    return None


def _location(path: tuple) -> str:
    """``field 'name'`` for a top-level field, else ``input.spacing_mm``, ``labels[0].color``, ``files['a.x']``."""
    if not path:
        return "the manifest"
    if len(path) == 1:
        return f"field {path[0]!r}"
    text = str(path[0])
    for part in path[1:]:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            text += f".{part}"
        else:
            text += f"[{part!r}]"
    return text


# What JSON Schema cannot express. Each check looks only at values of the right shape (the schema
# reports the others).


def _window_problems(data: dict) -> list[str]:
    spec = data.get("input")
    window = spec.get("intensity_window") if isinstance(spec, dict) else None
    if _numbers(window, 2) and not window[1] - window[0] >= 1:  # at least 1 HU wide
        return [f"input.intensity_window is {_show(window)} but must be [low, high] in HU with low < high"]
    return []


def _pipeline_problems(data: dict) -> list[str]:
    """Settings that are each in range but absurd together (the crop's size in voxels, a range's order)."""
    pipeline = data.get("pipeline")
    spec = data.get("input")
    if data.get("task") != "prostate" or not isinstance(pipeline, dict):
        return []
    problems = []
    plausible = pipeline.get("plausible_cc")
    if _numbers(plausible, 2) and not plausible[0] < plausible[1]:
        problems.append(f"pipeline.plausible_cc is {_show(plausible)} but must be [low, high] in cc with low < high")
    crop = pipeline.get("crop_mm")
    spacing = spec.get("spacing_mm") if isinstance(spec, dict) else None
    if _numbers(crop, 3) and _numbers(spacing, 3) and all(v > 0 for v in spacing):
        voxels = math.prod(max(1.0, c / s) for c, s in zip(crop, spacing))
        if voxels > MAX_CROP_VOXELS:
            problems.append(f"pipeline.crop_mm {_show(crop)} at input.spacing_mm {_show(spacing)} is a crop of "
                            f"{voxels:.3g} voxels, more than {MAX_CROP_VOXELS:,}: make the crop smaller or the "
                            "spacing coarser")
    return problems


def _stage_items(stages) -> list[tuple[str, object]]:
    if isinstance(stages, dict):
        return list(stages.items())
    if isinstance(stages, list):
        return [(e.get("name", f"stage{i + 1}") if isinstance(e, dict) else f"stage{i + 1}", e)
                for i, e in enumerate(stages)]
    return []


def _stages_problems(data: dict) -> list[str]:
    files = data.get("files")
    problems = []
    seen = set()
    for name, entry in _stage_items(data.get("stages")):
        if isinstance(name, str):
            if name in seen:
                problems.append(f"stage name {name!r} is used twice")
            seen.add(name)
        weights = entry.get("weights") if isinstance(entry, dict) else None
        if isinstance(files, dict) and not _file_name_problems(weights, "") and weights not in files:
            problems.append(f"stage {name!r}: weights file {weights!r} has no sha256 in field 'files'")
    return problems


def _labels_problems(data: dict) -> list[str]:
    labels = data.get("labels")
    if not isinstance(labels, list):
        return []
    problems = []
    values, names = set(), set()
    for i, entry in enumerate(labels):
        if not isinstance(entry, dict):
            continue
        where = f"labels[{i}]"
        value, name = entry.get("value"), entry.get("name")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            value = None
        if not isinstance(name, str) or not name.strip():
            name = None
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


# --------------------------------------------------------------------------- parsing


def _parse_stages(stages) -> dict[str, Stage]:
    """The stages of a valid manifest, in order, keyed by name (a list's unnamed entries are stage1, stage2...)."""
    return {
        name: Stage(name=name, architecture=entry["architecture"], arguments=dict(entry["arguments"]),
                    weights=entry["weights"])
        for name, entry in _stage_items(stages)
    }
