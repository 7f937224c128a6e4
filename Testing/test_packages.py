"""Model packages: format, registry, install/verify/remove, archive safety, https install."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import ssl
import stat
import sys
import threading
import urllib.request
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from segcore import anatomy, networks, packages
from segcore.errors import ChecksumError, InputNotFoundError, ModelPackageError, OutputExistsError

# Two tiny real networks, so that verify and install (which build and test-run every stage) accept the package.
COARSE = {"architecture": "unet2p5d", "arguments": {"in_channels": 5, "widths": [2, 4]}}
FINE = {"architecture": "hfunet", "arguments": {"in_channels": 3, "widths": [2, 4], "tcl_blocks": 1}}


def manifest(name="tiny-prostate", version="1.0", **changes) -> dict:
    data = {
        "name": name,
        "version": version,
        "task": "prostate",
        "description": "demo weights: trained on synthetic phantoms, not validated on patient data",
        "stages": [
            {"name": "coarse", **COARSE, "weights": "coarse.safetensors"},
            {"name": "fine", **FINE, "weights": "fine.safetensors"},
        ],
        "input": {"spacing_mm": [1.0, 1.0, 1.0], "intensity_window": [-200, 300], "normalisation": "window"},
        "labels": [anatomy.structure("prostate"), anatomy.structure("bladder")],
        "training": {"data": "phantoms", "seed": 1, "commit": "abc123", "epochs": 2},
        "validation": {"dsc_prostate": 0.8},
        "licence": "Apache-2.0",
    }
    data.update(changes)
    return data


def tensors(seed=0) -> dict:
    """Freshly initialised weights of the two stages (the fine stage stored as float16)."""
    torch.manual_seed(seed)
    coarse = networks.build(COARSE["architecture"], COARSE["arguments"]).state_dict()
    fine = networks.build(FINE["architecture"], FINE["arguments"]).state_dict()
    return {
        "coarse.safetensors": coarse,
        "fine.safetensors": {k: v.half() if v.is_floating_point() else v for k, v in fine.items()},
    }


def make(folder: Path, seed=0, **changes) -> packages.ModelPackage:
    return packages.create_package(folder, manifest(**changes), tensors(seed))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite_manifest(folder: Path, **changes) -> None:
    path = folder / "model.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def raw_zip(path: Path, entries: dict) -> Path:
    """A zip with exactly the given entry names (ZipInfo for special ones)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in entries.items():
            zf.writestr(name, content)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty user home and an empty bundled folder, so the real repository's models never interfere."""
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    monkeypatch.setattr(packages.registry, "bundled_models_dir", lambda: bundled)
    return tmp_path / "home"


@pytest.fixture
def archive(tmp_path):
    folder = tmp_path / "build" / "tiny-prostate"
    make(folder)
    return packages.zip_package(folder)


def models_dir_contents(home: Path) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


# --------------------------------------------------------------------------- format


def test_create_load_round_trip(tmp_path):
    weights = tensors()
    package = packages.create_package(tmp_path / "pkg", manifest(), weights)
    loaded = packages.ModelPackage.load(tmp_path / "pkg")
    assert loaded.name == "tiny-prostate" and loaded.version == "1.0" and loaded.task == "prostate"
    assert list(loaded.stages) == ["coarse", "fine"]
    assert loaded.stages["fine"].architecture == "hfunet"
    assert loaded.stages["fine"].arguments == FINE["arguments"]
    assert loaded.input.spacing_mm == (1.0, 1.0, 1.0)
    assert loaded.input.intensity_window == (-200.0, 300.0)
    assert loaded.labels == [anatomy.structure("prostate"), anatomy.structure("bladder")]
    assert loaded.training["seed"] == 1 and loaded.validation == {"dsc_prostate": 0.8}
    for fname in weights:
        assert loaded.files[fname] == sha(tmp_path / "pkg" / fname)
    fine = loaded.load_weights("fine")
    key = "seg.down.0.0.0.weight"
    assert fine.keys() == weights["fine.safetensors"].keys()
    assert fine[key].dtype == torch.float16
    assert torch.equal(fine[key], weights["fine.safetensors"][key])
    coarse = packages.load_stage_weights(package, "coarse")
    assert torch.equal(coarse["head.bias"], weights["coarse.safetensors"]["head.bias"])
    with pytest.raises(ModelPackageError, match="coarse, fine"):
        loaded.load_weights()  # two stages: which one must be said
    assert "hfunet" in loaded.describe() and "prostate" in loaded.describe()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left


def test_stages_as_object_and_single_stage_default(tmp_path):
    stages = {"net": {"architecture": "hmrnet", "arguments": {}, "weights": "net.safetensors"}}
    package = packages.create_package(
        tmp_path / "p", manifest(task="organs", stages=stages), {"net.safetensors": {"w": torch.ones(4)}}
    )
    assert torch.equal(package.load_weights()["w"], torch.ones(4))


def test_create_refuses_existing_and_invalid(tmp_path):
    make(tmp_path / "pkg")
    with pytest.raises(OutputExistsError):
        make(tmp_path / "pkg")
    replaced = packages.create_package(tmp_path / "pkg", manifest(version="2.0"), tensors(1), overwrite=True)
    assert packages.ModelPackage.load(tmp_path / "pkg").version == "2.0" == replaced.version
    with pytest.raises(ModelPackageError) as error:
        make(tmp_path / "bad", name="Bad Name", task="liver")
    assert "'name'" in str(error.value) and "'task'" in str(error.value) and "liver" in str(error.value)
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"input": {"spacing_mm": [1, 1], "intensity_window": [-200, 300], "normalisation": "w"}}, "spacing_mm"),
        ({"input": {"spacing_mm": [1, 1, 1], "intensity_window": [300, -200], "normalisation": "w"}},
         "intensity_window"),
        ({"labels": [{"value": 2, "name": "prostate", "color": [1, 2, 3]}]}, "label value 1"),
        ({"labels": [{"value": 1, "name": "prostate", "color": [1, 2]}]}, "color"),
        ({"training": {"data": "x"}}, "training.seed"),
        ({"licence": ""}, "licence"),
        ({"stages": []}, "stages"),
    ],
)
def test_manifest_field_errors_name_the_field(tmp_path, changes, field):
    with pytest.raises(ModelPackageError, match=field):
        make(tmp_path / "p", **changes)


BUNDLED_MANIFESTS = sorted(packages.bundled_models_dir().glob("*/model.json"))


def test_schema_file_is_valid_json_schema_and_accepts_the_bundled_manifests():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(packages.SCHEMA_FILE.read_text(encoding="utf-8"))
    assert packages.SCHEMA_FILE.name == "model_package.schema.json"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert len(BUNDLED_MANIFESTS) == 5
    for path in BUNDLED_MANIFESTS:
        data = json.loads(path.read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator(schema).validate(data)  # any standard validator accepts them
        assert packages.manifest_problems(data) == [], path


def test_schema_agrees_with_the_python_constants():
    schema = packages.manifest_schema()
    fields = schema["properties"]
    assert fields["schema_version"]["const"] == packages.SCHEMA_VERSION
    assert tuple(fields["task"]["enum"]) == packages.TASKS
    assert fields["name"]["pattern"] == f"^{packages.NAME_PATTERN.pattern}$"
    assert set(schema["required"]) == set(fields) - {"pipeline", "lineage"}  # the optional blocks
    schema["properties"].clear()  # a copy: the validator's schema is untouched
    assert packages.manifest_problems(manifest_json()) == []


def test_every_schema_rule_has_a_description():
    """Errors are sentences built from the failing rule's description, so every rule needs one."""
    rules = {"type", "enum", "const", "pattern", "minimum", "maximum", "exclusiveMinimum", "minItems",
             "maxItems", "minLength", "maxLength", "minProperties", "required"}

    def walk(schema, where):
        if rules & schema.keys():
            assert isinstance(schema.get("description"), str) and schema["description"], where
        for key in ("properties", "$defs"):  # maps of names to schemas
            for name, sub in schema.get(key, {}).items():
                walk(sub, f"{where}/{key}/{name}")
        for key in ("items", "additionalProperties", "propertyNames"):
            if isinstance(schema.get(key), dict):
                walk(schema[key], f"{where}/{key}")

    walk(packages.manifest_schema(), "#")


def manifest_json(**changes) -> dict:
    """A complete valid manifest as model.json holds it (files included)."""
    data = manifest(**changes)
    data["labels"] = [s.to_json() if isinstance(s, anatomy.Structure) else s for s in data["labels"]]
    data.setdefault("schema_version", packages.SCHEMA_VERSION)
    data.setdefault("files", {"coarse.safetensors": "a" * 64, "fine.safetensors": "b" * 64})
    return json.loads(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "location", "shown"),
    [
        ({"name": "Bad Name"}, "field 'name'", '"Bad Name"'),
        ({"task": "liver"}, "field 'task'", '"liver"'),
        ({"version": 1.0}, "field 'version'", "1.0"),
        ({"training": {"data": None, "seed": 1.5, "commit": None, "epochs": 2}}, "training.seed", "1.5"),
        ({"training": {"data": None, "seed": 1, "commit": None}}, "training.epochs", "missing"),
        ({"input": {"spacing_mm": [1, 1, 0], "intensity_window": [-1, 1], "normalisation": "w"}},
         "input.spacing_mm[2]", "0"),
        ({"labels": [{"value": 1, "name": "prostate", "color": [1, 2, 256]}]}, "labels[0].color[2]", "256"),
        ({"labels": [{"value": 1, "name": "prostate", "color": [1, 2, 3], "type": "Prostate"}]},
         "labels[0].type", '"Prostate"'),
        ({"files": {"coarse.safetensors": "a" * 64, "fine.safetensors": "B" * 64}},
         "files['fine.safetensors']", '"BBBB'),
        ({"stages": {"net": {"architecture": "unet", "arguments": {}, "weights": "net.pt"}},
          "files": {"net.safetensors": "a" * 64}}, "stages.net.weights", '"net.pt"'),
        ({"lineage": {"method": "fine-tune", "base": {"name": "b", "version": "1", "files": {"w.safetensors": "x"}}}},
         "lineage.base.files['w.safetensors']", '"x"'),
    ],
)
def test_a_schema_violation_is_one_sentence_naming_the_field(changes, location, shown):
    (problem,) = packages.manifest_problems(manifest_json(**changes))
    assert problem.startswith(location + " ") and shown in problem
    assert "\n" not in problem and ". " not in problem.replace("e.g. ", "").replace("...", "")  # one sentence
    with pytest.raises(ModelPackageError) as error:
        packages.validate_manifest(manifest_json(**changes), source="x/model.json")
    assert f": {problem}. " in str(error.value) and "Fix model.json" in str(error.value)
    assert "\n" not in str(error.value)  # one line, as every error a user can cause


def test_strict_json_values_are_refused():
    """1.0 is no integer, NaN is no number, and a trailing newline does not end a name (Python's `$`)."""
    nan_spacing = {"spacing_mm": [1, float("nan"), 1], "intensity_window": [-1, 1], "normalisation": "w"}
    cases = [
        ({"labels": [{"value": 1.0, "name": "prostate", "color": [1, 2, 3]}]}, "labels[0].value"),
        ({"input": nan_spacing}, "input.spacing_mm[1]"),
        ({"name": "tiny-prostate\n"}, "field 'name'"),
        ({"files": {"coarse.safetensors": "a" * 64, "fine.safetensors\n": "b" * 64}}, "field 'files'"),
    ]
    for changes, location in cases:
        problems = packages.manifest_problems(manifest_json(**changes))
        assert problems and problems[0].startswith(location), (changes, problems)


def test_checks_beyond_the_schema_remain():
    stages = [{"name": "a", "architecture": "unet", "arguments": {}, "weights": "coarse.safetensors"},
              {"name": "a", "architecture": "unet", "arguments": {}, "weights": "other.safetensors"}]
    labels = [anatomy.structure("prostate").to_json(), anatomy.structure("prostate").to_json(),
              {"value": 2, "name": "new-organ", "color": [1, 2, 3]}]
    problems = packages.manifest_problems(manifest_json(stages=stages, labels=labels))
    assert "stage name 'a' is used twice" in problems
    assert "stage 'a': weights file 'other.safetensors' has no sha256 in field 'files'" in problems
    assert any("label value 1 is used twice" in p for p in problems)
    assert any("structure name 'prostate' is used twice" in p for p in problems)
    assert any("label value 2 belongs to 'bladder'" in p for p in problems)


def test_missing_jsonschema_is_one_clear_error(monkeypatch):
    from segcore.packages import manifest as manifest_module

    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema now fails
    manifest_module._validator.cache_clear()
    try:
        with pytest.raises(ModelPackageError, match=r"needs the Python package jsonschema.*pip install"):
            packages.manifest_problems(manifest_json())
    finally:
        manifest_module._validator.cache_clear()


def test_schema_version_newer_and_older(tmp_path):
    folder = tmp_path / "pkg"
    make(folder)
    rewrite_manifest(folder, schema_version=packages.SCHEMA_VERSION + 1)
    with pytest.raises(ModelPackageError, match="newer ProstateSeg.*Upgrade"):
        packages.ModelPackage.load(folder)
    report = packages.verify_package(folder)
    assert not report.ok and "newer" in report.problems[0]
    rewrite_manifest(folder, schema_version=0)
    with pytest.raises(ModelPackageError, match="older ProstateSeg.*Re-export"):
        packages.ModelPackage.load(folder)


def test_pickle_weights_are_refused(tmp_path, monkeypatch):
    folder = tmp_path / "pkg"
    make(folder)
    torch.save({"w": torch.ones(2)}, folder / "coarse.pt")
    stages = [{"name": "coarse", "architecture": "unet", "arguments": {}, "weights": "coarse.pt"}]
    rewrite_manifest(folder, stages=stages, files={"coarse.pt": sha(folder / "coarse.pt")})

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a package must never be unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelPackageError, match="safetensors"):
        packages.ModelPackage.load(folder)
    assert any("coarse.pt" in p for p in packages.verify_package(folder).problems)


def test_unlisted_pickle_beside_the_weights_fails_verify(tmp_path):
    folder = tmp_path / "pkg"
    make(folder)
    assert packages.verify_package(folder).ok
    (folder / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    report = packages.verify_package(folder)
    assert not report.ok and "extra.pkl" in str(report)


def test_tampered_weights(tmp_path):
    folder = tmp_path / "pkg"
    package = make(folder)
    data = bytearray((folder / "fine.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "fine.safetensors").write_bytes(bytes(data))
    report = packages.verify_package(folder)
    assert not report.ok
    assert len(report.problems) == 1 and "fine.safetensors" in report.problems[0]
    with pytest.raises(ChecksumError, match="fine.safetensors"):
        package.load_weights("fine")
    assert package.load_weights("coarse")  # the untouched stage still loads


def test_missing_weights(tmp_path):
    folder = tmp_path / "pkg"
    make(folder)
    (folder / "coarse.safetensors").unlink()
    with pytest.raises(ModelPackageError, match="missing coarse.safetensors"):
        packages.ModelPackage.load(folder)
    assert "missing" in str(packages.verify_package(folder))


def test_bad_json_and_not_a_package(tmp_path):
    with pytest.raises(InputNotFoundError):
        packages.ModelPackage.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPackageError, match="no model.json"):
        packages.ModelPackage.load(tmp_path / "empty")
    (tmp_path / "empty" / "model.json").write_text("{not json")
    with pytest.raises(ModelPackageError, match="not valid JSON.*line 1"):
        packages.ModelPackage.load(tmp_path / "empty")


def test_zip_is_reproducible(tmp_path):
    folder = tmp_path / "tiny-prostate"
    make(folder)
    first = packages.zip_package(folder, tmp_path / "a.zip")
    second = packages.zip_package(folder, tmp_path / "b.zip")
    assert sha(first) == sha(second)
    with zipfile.ZipFile(first) as zf:
        assert sorted(zf.namelist()) == [
            "tiny-prostate/coarse.safetensors", "tiny-prostate/fine.safetensors", "tiny-prostate/model.json"
        ]
    with pytest.raises(OutputExistsError):
        packages.zip_package(folder, first)


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("platform", "environ", "expected"),
    [
        ("linux", {"HOME": "/h", "XDG_DATA_HOME": "/x"}, Path("/x/prostateseg")),
        ("linux", {"HOME": "/h"}, Path("/h/.local/share/prostateseg")),
        ("darwin", {"HOME": "/h"}, Path("/h/Library/Application Support/prostateseg")),
        ("win32", {"USERPROFILE": "/u", "LOCALAPPDATA": "/l"}, Path("/l/prostateseg")),
    ],
)
def test_default_home(platform, environ, expected):
    assert packages.default_home(platform, environ) == expected


def test_home_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "h"))
    assert packages.user_models_dir() == tmp_path / "h" / "models"
    assert packages.search_path()[0][0] == "bundled"
    assert packages.bundled_models_dir().parts[-2:] == ("Resources", "Models")  # a checkout


def test_install_list_info_verify_remove(home, archive):
    assert packages.list_packages() == []
    installed = packages.install_package(archive, sha(archive), progress=False)
    assert installed.where == "user" and installed.path == home / "models" / "tiny-prostate"
    assert models_dir_contents(home) == ["tiny-prostate"]  # no staging left

    (entry,) = packages.list_packages(check_hashes=True)
    assert (entry.name, entry.version, entry.task, entry.where, entry.ok) == (
        "tiny-prostate", "1.0", "prostate", "user", True
    )
    found = packages.find_package("tiny-prostate")
    assert found.path == installed.path and found.labels[0].name == "prostate"
    assert packages.open_package("tiny-prostate").path == installed.path
    assert packages.open_package(installed.path).where == "path"
    assert packages.verify_package("tiny-prostate").ok
    assert "tiny-prostate 1.0" in found.describe()
    assert torch.equal(found.load_weights("coarse")["head.bias"], tensors()["coarse.safetensors"]["head.bias"])

    assert packages.remove_package("tiny-prostate") == installed.path
    assert packages.list_packages() == [] and models_dir_contents(home) == []
    with pytest.raises(ModelPackageError, match="no installed model package"):
        packages.remove_package("tiny-prostate")
    with pytest.raises(ModelPackageError, match="no model package named"):
        packages.find_package("tiny-prostate")


def test_damaged_package_is_listed_as_damaged(home, archive):
    installed = packages.install_package(archive, sha(archive), progress=False)
    (installed.path / "fine.safetensors").unlink()
    (entry,) = packages.list_packages()
    assert not entry.ok and "fine.safetensors" in entry.problem
    (home / "models" / "junk").mkdir()
    junk = next(e for e in packages.list_packages() if e.name == "junk")
    assert not junk.ok and "model.json" in junk.problem


def test_names_cannot_escape_the_models_folder(home):
    for name in ("..", "../x", "/etc", "A"):
        with pytest.raises(ModelPackageError, match="not a model package name"):
            packages.remove_package(name)
        with pytest.raises(ModelPackageError):
            packages.find_package(name)


def test_collisions(home, archive, tmp_path):
    packages.install_package(archive, sha(archive), progress=False)
    with pytest.raises(ModelPackageError, match="already installed.*--force"):
        packages.install_package(archive, sha(archive), progress=False)

    newer_folder = tmp_path / "v2" / "tiny-prostate"
    packages.create_package(newer_folder, manifest(version="2.0"), tensors(1))
    newer = packages.zip_package(newer_folder)
    replaced = packages.install_package(newer, sha(newer), force=True, progress=False)
    assert replaced.version == "2.0" and packages.find_package("tiny-prostate").version == "2.0"
    assert models_dir_contents(home) == ["tiny-prostate"]


def test_bundled_packages(home, tmp_path, archive):
    bundled = packages.registry.bundled_models_dir()
    make(bundled / "tiny-prostate", version="0.9")
    entries = packages.list_packages()
    assert [(e.where, e.version) for e in entries] == [("bundled", "0.9")]
    assert packages.find_package("tiny-prostate").where == "bundled"
    with pytest.raises(ModelPackageError, match="bundled with ProstateSeg and cannot be removed"):
        packages.remove_package("tiny-prostate")
    assert (bundled / "tiny-prostate" / "model.json").exists()
    with pytest.raises(ModelPackageError, match="bundled"):
        packages.install_package(archive, sha(archive), force=True, progress=False)
    assert models_dir_contents(home) == []

    # A user copy placed by hand (or installed before the name became bundled) is listed but shadowed.
    make(home / "models" / "tiny-prostate", version="1.5")
    user = [e for e in packages.list_packages() if e.where == "user"]
    assert [(e.version, e.shadowed) for e in user] == [("1.5", True)]
    assert packages.find_package("tiny-prostate").version == "0.9"
    assert packages.remove_package("tiny-prostate") == home / "models" / "tiny-prostate"
    assert [e.where for e in packages.list_packages()] == ["bundled"]


def test_registry_folder_must_match_package_name(home):
    make(home / "models" / "other-name")
    (entry,) = packages.list_packages()
    assert not entry.ok and "must be named after it" in entry.problem
    assert not packages.verify_package("other-name").ok


# --------------------------------------------------------------------------- install safety


def test_wrong_sha256_installs_nothing(home, archive):
    with pytest.raises(ChecksumError) as error:
        packages.install_package(archive, "0" * 64, progress=False)
    assert "expected " + "0" * 64 in str(error.value) and sha(archive) in str(error.value)
    assert models_dir_contents(home) == []
    with pytest.raises(ModelPackageError, match="sha256"):
        packages.install_package(archive, "", progress=False)
    with pytest.raises(InputNotFoundError):
        packages.install_package(archive.parent / "missing.zip", "0" * 64, progress=False)


def test_sha256_spelling_is_forgiving(home, archive):
    packages.install_package(archive, "SHA256:" + sha(archive).upper(), progress=False)
    assert packages.find_package("tiny-prostate").where == "user"


def test_package_at_zip_root(home, tmp_path):
    folder = tmp_path / "tiny-prostate"
    make(folder)
    root_zip = raw_zip(tmp_path / "root.zip", {p.name: p.read_bytes() for p in folder.iterdir()})
    assert packages.install_package(root_zip, sha(root_zip), progress=False).name == "tiny-prostate"


def test_damaged_archive_contents_install_nothing(home, tmp_path):
    folder = tmp_path / "tiny-prostate"
    make(folder)
    entries = {f"tiny-prostate/{p.name}": p.read_bytes() for p in folder.iterdir()}
    entries["tiny-prostate/fine.safetensors"] += b"tampered"
    bad = raw_zip(tmp_path / "bad.zip", entries)
    with pytest.raises(ModelPackageError, match="damaged"):
        packages.install_package(bad, sha(bad), progress=False)
    assert models_dir_contents(home) == []

    entries = {f"tiny-prostate/{p.name}": p.read_bytes() for p in folder.iterdir()}
    entries["tiny-prostate/payload.pt"] = b"\x80\x04K\x01."
    with_pickle = raw_zip(tmp_path / "pickle.zip", entries)
    with pytest.raises(ModelPackageError, match="payload.pt"):
        packages.install_package(with_pickle, sha(with_pickle), progress=False)
    assert models_dir_contents(home) == []

    nothing = raw_zip(tmp_path / "nothing.zip", {"a/readme.txt": b"hi", "b/readme.txt": b"hi"})
    with pytest.raises(ModelPackageError, match="no model.json"):
        packages.install_package(nothing, sha(nothing), progress=False)
    not_zip = tmp_path / "not.zip"
    not_zip.write_bytes(b"plain text")
    with pytest.raises(ModelPackageError, match="not a readable zip"):
        packages.install_package(not_zip, sha(not_zip), progress=False)
    assert models_dir_contents(home) == []


@pytest.mark.parametrize(
    "evil_name", ["../evil.txt", "tiny-prostate/../../evil.txt", "<absolute>", "C:/evil.txt", "..\\evil.txt"]
)
def test_zip_slip_is_refused(home, tmp_path, evil_name):
    if evil_name == "<absolute>":
        evil_name = (tmp_path / "outside" / "evil.txt").as_posix()
    folder = tmp_path / "tiny-prostate"
    make(folder)
    entries = {f"tiny-prostate/{p.name}": p.read_bytes() for p in folder.iterdir()}
    entries[evil_name] = b"owned"
    evil = raw_zip(tmp_path / "evil.zip", entries)
    with zipfile.ZipFile(evil) as zf:
        assert evil_name in zf.namelist()  # the hostile name really is in the archive
    with pytest.raises(ModelPackageError, match="evil.txt"):
        packages.install_package(evil, sha(evil), progress=False)
    assert models_dir_contents(home) == []
    assert not list(tmp_path.rglob("evil.txt"))


def test_symlink_entry_is_refused(home, tmp_path):
    folder = tmp_path / "tiny-prostate"
    make(folder)
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for p in folder.iterdir():
            zf.writestr(f"tiny-prostate/{p.name}", p.read_bytes())
        link = zipfile.ZipInfo("tiny-prostate/escape")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, str(tmp_path / "outside"))
    with pytest.raises(ModelPackageError, match="symbolic link"):
        packages.install_package(path, sha(path), progress=False)
    assert models_dir_contents(home) == []


def test_size_limit(home, archive):
    with pytest.raises(ModelPackageError, match="limit"):
        packages.install_package(archive, sha(archive), progress=False, max_bytes=100)
    assert models_dir_contents(home) == []


# --------------------------------------------------------------------------- https install


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    hits: ClassVar[list] = []

    def do_GET(self):
        type(self).hits.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/pkg.zip")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/pkg.zip":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def https_server(tmp_path, monkeypatch, archive):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)

    handler = type("Handler", (_Handler,), {"payload": archive.read_bytes(), "hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_https_install(home, archive, https_server):
    base, handler = https_server
    package = packages.install_package(f"{base}/pkg.zip", sha(archive), progress=False, timeout=10)
    assert package.where == "user" and package.version == "1.0"
    assert packages.verify_package("tiny-prostate").ok
    assert handler.hits == ["/pkg.zip"]
    assert models_dir_contents(home) == ["tiny-prostate"]  # the downloaded zip is gone


def test_https_install_shows_progress_on_stderr(home, archive, https_server, capsys):
    base, _ = https_server
    packages.install_package(f"{base}/pkg.zip", sha(archive), progress=True, timeout=10)
    captured = capsys.readouterr()
    assert "download" in captured.err and captured.out == ""


def test_https_wrong_checksum_installs_nothing(home, archive, https_server):
    base, handler = https_server
    with pytest.raises(ChecksumError, match=f"expected {'1' * 64}, got {sha(archive)}"):
        packages.install_package(f"{base}/pkg.zip", "1" * 64, progress=False, timeout=10)
    assert handler.hits == ["/pkg.zip"]
    assert models_dir_contents(home) == []


def test_https_errors(home, archive, https_server, monkeypatch):
    base, handler = https_server
    with pytest.raises(ModelPackageError, match="HTTP 404"):
        packages.install_package(f"{base}/missing.zip", sha(archive), progress=False, timeout=10)
    with pytest.raises(ModelPackageError, match="not https"):
        packages.install_package(f"{base}/redirect", sha(archive), progress=False, timeout=10)
    assert handler.hits == ["/missing.zip", "/redirect"]  # the http target was never fetched
    with pytest.raises(ModelPackageError, match="limit"):
        packages.install_package(f"{base}/pkg.zip", sha(archive), progress=False, timeout=10, max_bytes=100)
    # Without the test CA the server's certificate must not be trusted.
    monkeypatch.setenv("SSL_CERT_FILE", str(home.parent / "nowhere.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(home.parent / "nowhere"))
    with pytest.raises(ModelPackageError, match="could not download"):
        packages.install_package(f"{base}/pkg.zip", sha(archive), progress=False, timeout=10)
    assert models_dir_contents(home) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/pkg.zip", "file:///tmp/pkg.zip", "ftp://127.0.0.1/pkg.zip"])
def test_non_https_urls_are_refused_without_connecting(home, monkeypatch, url):
    def no_network(*args, **kwargs):
        raise AssertionError("no connection may be attempted")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", no_network)
    monkeypatch.setattr("socket.create_connection", no_network)
    with pytest.raises(ModelPackageError, match="only https://"):
        packages.install_package(url, "0" * 64, progress=False)
    assert models_dir_contents(home) == []


def test_import_is_light():
    import subprocess

    code = (
        "import sys, segcore.packages as p; "
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors', 'tqdm', 'urllib.request', 'jsonschema') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_file_manager_droppings_do_not_damage_a_package(tmp_path):
    """Finder and Explorer write these into any folder they show; a pickle stays refused whatever its name."""
    folder = tmp_path / "pk"
    shutil.copytree(packages.bundled_models_dir() / "prostate-metricunet-demo", folder)
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._model.json"):
        (folder / name).write_bytes(b"\0")
    assert packages.verify_package(folder).ok
    assert packages.open_package(folder).name == "prostate-metricunet-demo"
    (folder / "._weights.pt").write_bytes(b"\0")
    assert not packages.verify_package(folder).ok
