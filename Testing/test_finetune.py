"""Fine-tuning (training/finetune.py): a tiny real fine-tune of a prostate and an organs package that
exports, installs, lists and segments; the lineage in model.json; the held-out comparison; resuming;
the refusals; the convention-shifted phantom."""

import datetime
import hashlib
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from segcore import packages
from segcore.cli import main as cli
from segcore.phantom import include_proximal_seminal_vesicles, make_phantom, write_phantoms
from training import finetune


def sha256_tree(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


PLAIN = {"fiducials": False, "catheter": False, "spacer": False, "bladder_contrast": False, "calcifications": False,
         "enlarged_prostate": False, "implant": "none", "kernel": "standard", "kvp": 120, "truncated_fov": False}


@pytest.fixture(scope="module")
def three_cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset")
    # plain cases (no devices, standard kernel): the demo base was trained on the simpler phantom v1
    write_phantoms(folder, 3, seed=7300, matrix=96, options=PLAIN)
    return folder


@pytest.fixture
def own_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PROSTATESEG_HOME", str(home))
    return home


def run_finetune(args, capsys):
    code = finetune.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_tiny_prostate_fine_tune_exports_installs_lists_and_segments(three_cases, tmp_path, own_home, capsys):
    base = packages.open_package("prostate-metricunet-demo")
    before = sha256_tree(base.path)
    code, out, err = run_finetune(["--model", "prostate-metricunet-demo", "--data", three_cases, "--export",
                                   tmp_path / "tuned", "--iterations", 3, "--output", tmp_path / "run",
                                   "--name", "clinic-prostate", "--install"], capsys)
    assert code == 0, err
    assert "[100%] done" in err and "[ 20%] training" in err
    assert sha256_tree(base.path) == before                      # the base is never modified

    tuned = packages.open_package(tmp_path / "tuned")
    manifest = tuned.manifest
    assert tuned.name == "clinic-prostate"
    assert tuned.version == f"0.1+ft.{datetime.date.today():%Y%m%d}"
    lineage = manifest["lineage"]
    assert lineage["base"] == {"name": base.name, "version": base.version, "files": base.files}
    assert lineage["stages"] == ["stage2"]
    assert lineage["dataset"]["cases"] == 3 and lineage["dataset"]["held_out_cases"] == 2
    names = "\n".join(sorted(["case000", "case001", "case002"]))
    assert lineage["dataset"]["case_names_sha256"] == hashlib.sha256(names.encode()).hexdigest()
    text = (tmp_path / "tuned" / "model.json").read_text()
    assert "case00" not in text and str(tmp_path) not in text and str(three_cases) not in text
    # stage 1 is the base's, byte for byte; stage 2 moved away from it
    assert tuned.files["stage1.safetensors"] == base.files["stage1.safetensors"]
    assert tuned.files["stage2.safetensors"] != base.files["stage2.safetensors"]

    held = manifest["validation"]["held_out"]
    assert held["cases"] == 2
    for model in ("base", "tuned"):
        assert set(held[model]["prostate"]) == set(finetune.METRIC_KEYS)
        assert 0.5 < held[model]["prostate"]["dsc"]["mean"] <= 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {(r["case"], r["model"]) for r in summary["rows"]} == {
        (c, m) for c in json.loads((tmp_path / "run" / "split.json").read_text())["held_out"]
        for m in ("base", "tuned")}
    assert "dsc base" in out and "mean" in out
    assert (tmp_path / "run" / "heldout_metrics.csv").read_text().count("\n") == 1 + 4

    installed = packages.find_package("clinic-prostate")
    assert installed.path.parent == packages.user_models_dir()
    assert installed.files == tuned.files
    assert cli(["models", "list"]) == 0
    assert "clinic-prostate" in capsys.readouterr().out
    ct = three_cases / "case000_ct.nii.gz"
    assert cli(["-q", "segment", str(ct), "-o", str(tmp_path / "seg"), "--model", "clinic-prostate"]) == 0
    labels = sitk.ReadImage(str(next((tmp_path / "seg").glob("*.nii.gz"))))
    assert sitk.GetArrayViewFromImage(labels).max() == 1

    # The same run again is refused; resumed, it trains nothing more and makes the same package.
    again = ["--model", "prostate-metricunet-demo", "--data", three_cases, "--iterations", 3,
             "--output", tmp_path / "run", "--name", "clinic-prostate", "--export", tmp_path / "again"]
    code, _, err = run_finetune(again, capsys)
    assert code == 1 and "--resume" in err and "Traceback" not in err
    code, _, err = run_finetune(again + ["--resume"], capsys)
    assert code == 0 and "training: iteration" not in err
    resumed = packages.open_package(tmp_path / "again")
    assert resumed.files == tuned.files
    assert resumed.manifest["validation"]["held_out"] == held


def test_a_tiny_organs_fine_tune(tmp_path, own_home, capsys):
    data = tmp_path / "data"
    write_phantoms(data, 3, seed=7310, matrix=96)
    code, _, err = run_finetune(["--model", "organs-hmrnet-demo", "--data", data, "--export", tmp_path / "tuned",
                                 "--iterations", 2, "--output", tmp_path / "run"], capsys)
    assert code == 0, err
    tuned = packages.open_package(tmp_path / "tuned")
    assert tuned.name == "organs-hmrnet-demo-ft" and tuned.manifest["lineage"]["stages"] == ["hmrnet"]
    held = tuned.manifest["validation"]["held_out"]
    assert set(held["base"]) == set(held["tuned"]) == {s.name for s in tuned.labels}


def refusal(args, capsys) -> str:
    code, _, err = run_finetune(args, capsys)
    assert code == 1 and "Traceback" not in err
    return err


def test_too_few_cases_are_refused(tmp_path, capsys):
    data = tmp_path / "data"
    write_phantoms(data, 2, seed=7320, matrix=96)
    err = refusal(["--model", "prostate-metricunet-demo", "--data", data, "--export", tmp_path / "t",
                   "--output", tmp_path / "run"], capsys)
    assert "at least 3" in err and "--validation" in err
    assert not (tmp_path / "run").exists()


def test_a_dataset_without_the_prostate_or_with_other_label_names_is_refused(three_cases, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(three_cases, data)
    labels = sitk.ReadImage(str(data / "case001_labels.nii.gz"))
    sitk.WriteImage(sitk.ChangeLabel(labels, {1: 0}), str(data / "case001_labels.nii.gz"))
    args = ["--model", "prostate-metricunet-demo", "--data", data, "--export", tmp_path / "t",
            "--output", tmp_path / "run"]
    err = refusal(args, capsys)
    assert "have no prostate" in err and "case001" in err
    shutil.copy(three_cases / "case001_labels.nii.gz", data / "case001_labels.nii.gz")
    table = json.loads((data / "labels.json").read_text())
    table["labels"][0]["name"] = "ctv_prostate"
    (data / "labels.json").write_text(json.dumps(table))
    err = refusal(args, capsys)
    assert "label value 1 'ctv_prostate'" in err


def test_a_label_no_case_has_is_refused_for_the_organs_model(three_cases, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(three_cases, data)
    for path in data.glob("*_labels.nii.gz"):
        sitk.WriteImage(sitk.ChangeLabel(sitk.ReadImage(str(path)), {2: 0}), str(path))
    err = refusal(["--model", "organs-hmrnet-demo", "--data", data, "--export", tmp_path / "t",
                   "--output", tmp_path / "run"], capsys)
    assert "no case has bladder (label value 2)" in err


def test_a_package_whose_network_cannot_be_fine_tuned_is_refused(three_cases, tmp_path, capsys):
    base = packages.open_package("prostate-metricunet-demo")
    manifest = {k: v for k, v in base.manifest.items() if k != "files"}
    manifest.update(task="organs", pipeline={},
                    stages={"hmrnet": {**manifest["stages"]["stage1"], "weights": "hmrnet.safetensors"}})
    packages.create_package(tmp_path / "odd", manifest, {"hmrnet.safetensors": base.load_weights("stage1")})
    err = refusal(["--model", tmp_path / "odd", "--data", three_cases, "--export", tmp_path / "t",
                   "--output", tmp_path / "run"], capsys)
    assert "network 'unet2p5d' cannot be fine-tuned" in err


def test_an_existing_export_folder_is_refused_before_training(three_cases, tmp_path, capsys):
    (tmp_path / "t").mkdir()
    err = refusal(["--model", "prostate-metricunet-demo", "--data", three_cases, "--export", tmp_path / "t"],
                  capsys)
    assert "--overwrite" in err


def test_the_held_out_cases_are_those_whose_names_hash_lowest(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for n in range(10):
        for kind in ("ct", "labels"):
            (data / f"p{n:02d}_{kind}.nii.gz").write_bytes(b"")
    split = finetune.split_cases(data, None)
    assert len(split.held_out) == 2 and len(split.train) == 8
    assert split.names() == finetune.split_cases(data, None).names()
    for n in range(10, 15):
        for kind in ("ct", "labels"):
            (data / f"p{n:02d}_{kind}.nii.gz").write_bytes(b"")
    bigger = finetune.split_cases(data, None)
    names = sorted((f"p{n:02d}" for n in range(15)), key=finetune.name_rank)
    assert sorted(bigger.names()["held_out"]) == sorted(names[:3])
    assert sorted(bigger.names()["train"]) == sorted(names[3:])
    first = sorted((f"p{n:02d}" for n in range(10)), key=finetune.name_rank)
    assert sorted(split.names()["held_out"]) == sorted(first[:2])


def test_tuned_versions_derive_from_the_base():
    day = datetime.date(2026, 11, 25)
    assert finetune.tuned_version("0.1", day) == "0.1+ft.20261125"
    assert finetune.tuned_version("0.1+ft.20261125", datetime.date(2026, 12, 1)) == "0.1+ft.20261125.ft.20261201"


def test_the_ctv_convention_adds_the_seminal_vesicles_near_the_prostate():
    case = make_phantom(9301, matrix=128)
    shifted = include_proximal_seminal_vesicles(case.labels, 10.0)
    before, after = sitk.GetArrayFromImage(case.labels), sitk.GetArrayFromImage(shifted)
    changed = before != after
    assert changed.any()
    assert (before[changed] == 6).all() and (after[changed] == 1).all()   # only seminal vesicle became prostate
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        sitk.Equal(case.labels, 1), insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
    assert distance[changed].max() <= 10.0
    assert (distance[(after == 6)] > 10.0).all()                         # the distal part stays
    assert shifted.GetOrigin() == case.labels.GetOrigin() and shifted.GetDirection() == case.labels.GetDirection()
    assert np.array_equal(after == 1, (before == 1) | changed)
