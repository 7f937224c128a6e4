"""Training HF-UNet and HMEDN stage 2 with the prostate training kit: tiny real runs that export,
install and segment, a stage 1 taken from a package, HF-UNet's cold start, HMEDN's three organs."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file
from training_runs import run_args as training_args

from segcore import networks, packages
from segcore.cli import main as cli
from training import runs
from training import train_prostate as tp

COMMON = [
    "data.cases=2", "data.validation_cases=1", "data.matrix=96",
    "stage1.from_package=prostate-metricunet-demo",
    "stage2.epochs=1", "stage2.patches_per_case=8", "stage2.batch_size=4",
]
HFUNET = [
    "stage2.architecture=hfunet", "name=prostate-hfunet-tiny",
    "stage2.arguments={in_channels: 3, num_classes: 2, widths: [8, 16, 32], tcl_blocks: 4, tcl: datt}",
]
HMEDN = [
    "stage2.architecture=hmedn", "name=prostate-hmedn-tiny", "organs=[prostate, bladder, rectum]",
    "stage2.arguments={in_channels: 5, num_classes: 4, widths: [8, 8, 16, 16, 16], hr_channels: 8}",
    "stage2.patch={size: 48, slices: 5}", "margin_mm=8",
    "pipeline={crop_mm: [96.0, 96.0, 112.0], crop_offset_mm: [0.0, 0.0, 16.0]}",
]


def run_args(tmp_path, *items, options=()):
    return training_args(tmp_path, COMMON + list(items), options)


def install_and_segment(tmp_path, package, monkeypatch):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    archive = packages.zip_package(package.path, tmp_path / "tiny.zip")
    assert cli(["models", "install", str(archive), "--sha256", packages.sha256_file(archive)]) == 0
    case = __import__("segcore.phantom", fromlist=["make_phantom"]).make_phantom(21, matrix=96, orientation="RAS")
    sitk.WriteImage(case.ct, str(tmp_path / "p_ct.nii.gz"))
    out = tmp_path / "seg"
    assert cli(["-q", "segment", str(tmp_path / "p_ct.nii.gz"), "-o", str(out), "--model", package.name]) == 0
    labelmap = sitk.ReadImage(str(out / "p_ct_seg.nii.gz"))
    assert labelmap.GetSize() == case.ct.GetSize()
    assert labelmap.GetDirection() == pytest.approx(case.ct.GetDirection())
    return sitk.GetArrayFromImage(labelmap), json.loads((out / "p_ct_seg.json").read_text())


def test_hfunet_trains_with_a_packaged_stage1_and_segments(tmp_path, monkeypatch):
    assert tp.main(run_args(tmp_path, *HFUNET)) == 0
    run = tmp_path / "run"
    assert not (run / "stage1").exists()                       # stage 1 was not trained again
    header = (run / "log.csv").read_text().splitlines()[0]
    assert all(f"loss_{term}" in header for term in ("ce", "contour", "tcl"))
    package = packages.open_package(run / "package")
    assert packages.verify_package(package.path).ok
    bundled = packages.open_package("prostate-metricunet-demo")
    ours, theirs = package.load_weights("stage1"), bundled.load_weights("stage1")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert package.stage("stage1").arguments == bundled.stage("stage1").arguments
    assert "prostate-metricunet-demo" in package.validation["stage1"]["from_package"]
    assert package.stage("stage2").architecture == "hfunet"
    assert set(load_file(str(package.path / "stage2.safetensors"))) == set(
        networks.build("hfunet", package.stage("stage2").arguments).state_dict())
    labels, report = install_and_segment(tmp_path, package, monkeypatch)
    assert set(np.unique(labels)) <= {0, 1}
    assert report["model"] == "prostate-hfunet-tiny"


def test_hfunet_cold_start_leaves_the_contour_branch_and_tcl_blocks_untouched(tmp_path):
    assert tp.main(run_args(tmp_path, *HFUNET, "stage2.objective={cold_start: 1.0}", options=["--stages", "stage2"])) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    torch.manual_seed(int(config["seed"]) + tp.STAGES.index("stage2"))   # as train_stage builds it
    initial = networks.build("hfunet", config["stage2"]["arguments"])
    trained = networks.build("hfunet", config["stage2"]["arguments"])
    runs.load_checkpoint(tmp_path / "run" / "stage2", "last", trained, None)
    before, after = dict(initial.named_parameters()), dict(trained.named_parameters())
    frozen = {n for n, p in trained.named_parameters() if n.startswith(("contour", "tcl"))}
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert not all(torch.equal(before[n], after[n]) for n in set(after) - frozen)


def test_hmedn_trains_three_organs_and_the_pipeline_returns_them(tmp_path, monkeypatch):
    assert tp.main(run_args(tmp_path, *HMEDN)) == 0
    run = tmp_path / "run"
    header = (run / "log.csv").read_text().splitlines()[0]
    assert all(k in header for k in ("loss_seg", "loss_hr", "loss_contour", "val_dsc_bladder", "val_dsc_rectum"))
    package = packages.open_package(run / "package")
    assert [s.name for s in package.labels] == ["prostate", "bladder", "rectum"]
    assert package.manifest["pipeline"]["crop_offset_mm"] == [0.0, 0.0, 16.0]
    labels, report = install_and_segment(tmp_path, package, monkeypatch)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    assert report["model"] == "prostate-hmedn-tiny"


def test_a_stage1_package_of_another_task_is_refused(tmp_path, capsys):
    assert tp.main(run_args(tmp_path, *HFUNET, "stage1.from_package=organs-hmrnet-demo")) == 1
    assert "not a prostate one" in capsys.readouterr().err
