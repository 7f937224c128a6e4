"""HMR-Net training kit: a tiny real training run on phantoms, export, install, use; exact resume; mAP."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file
from training_runs import install_and_segment, run_args

from segcore import packages
from training import train_hmrnet as th

TINY = [
    "data.cases=2", "data.validation_cases=1", "data.matrix=96", "iterations=3", "validate_every=3",
    "batch_size=2", "name=organs-tiny",
    ("arguments={num_classes: 6, in_channels: 1, depth: 18, widths: [8, 8, 16, 16], channels: 16, points: 16, "
     "anchor_sizes: [16, 32, 64, 128], box_fc: 32, shape_roi: 6, shape_convs: [8, 8], shape_fc: 32, "
     "shape_fc_layers: 2, rpn_pre_nms: 200, rpn_post_nms: 20, max_detections: 8, canonical_roi: 56}"),
    "pipeline.size=128",
]


def tiny_args(tmp_path, *extra):
    return run_args(tmp_path, TINY + list(extra))


def test_tiny_training_run_exports_installs_and_segments(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    assert th.main(tiny_args(tmp_path)) == 0
    run = tmp_path / "run"
    assert (run / "log.csv").read_text().count("\n") == 2  # header + one validation
    package = packages.open_package(run / "package")
    assert package.task == "organs" and packages.verify_package(package.path).ok
    manifest = json.loads((package.path / "model.json").read_text())
    assert manifest["training"]["iterations"] == 3 and "phantom" in manifest["training"]["data"]
    assert {"dsc", "map50_95", "bladder_dsc", "bladder_hd95"} <= set(manifest["validation"]["hmrnet"])
    assert [s.name for s in package.labels] == list(th.ORGANS)
    assert manifest["pipeline"]["size"] == 128
    # Only the inference network is packaged, in fp16.
    weights = load_file(str(package.path / "hmrnet.safetensors"))
    from segcore.networks import build

    assert set(weights) == set(build("hmrnet", manifest["stages"]["hmrnet"]["arguments"]).state_dict())
    assert weights["class_logits.weight"].dtype == torch.float16

    case, out = install_and_segment(package, tmp_path, "organs")
    labelmap = sitk.ReadImage(str(out / "p_ct_seg.nii.gz"))
    assert labelmap.GetSize() == case.ct.GetSize()
    assert labelmap.GetDirection() == pytest.approx(case.ct.GetDirection())
    report = json.loads((out / "p_ct_seg.json").read_text())
    assert report["model"] == "organs-tiny"


def test_runs_resume_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    assert th.main(tiny_args(straight, "iterations=4", "validate_every=2")) == 0
    assert th.main(tiny_args(split, "iterations=4", "validate_every=2") + ["--max-iterations", "2"]) == 0
    assert not (split / "run" / "package").exists()        # not finished: nothing exported yet
    assert th.main(tiny_args(split, "iterations=4", "validate_every=2")) == 1   # refuses to start over
    assert th.main(tiny_args(split, "iterations=4", "validate_every=2") + ["--resume"]) == 0
    a = load_file(str(straight / "run" / "hmrnet" / "last.safetensors"))
    b = load_file(str(split / "run" / "hmrnet" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_configuration_typos_are_refused(tmp_path, capsys):
    assert th.main(tiny_args(tmp_path, "iteration=3")) == 1
    assert "unknown configuration keys: iteration" in capsys.readouterr().err
    assert th.main(tiny_args(tmp_path, "loss.shape_wieght=2")) == 1
    assert "bad configuration" in capsys.readouterr().err


def test_flipped_slices_swap_left_and_right_femoral_heads():
    from segcore.anatomy import structure

    case = {"ct": np.zeros((1, 40, 40), np.int16), "labels": np.zeros((1, 40, 40), np.uint8)}
    case["labels"][0, 10:20, 2:10] = structure("femoral_head_right").value    # image left = patient right
    config = {**th.DEFAULTS, "canvas_margin": 0, "blur_probability": 0.0}
    settings = th.OrganSettings(size=40)
    from training.data import AugmentSpec

    spec = AugmentSpec(tissue_probability=0, noise_hu=0, shift_hu=0, contrast=(1, 1), flip=False,
                       spatial_probability=0)
    flips = set()
    for seed in range(8):
        _, targets = th.make_batch([case], [(0, 0)], config, settings, np.random.default_rng(seed), spec)
        x_centre = float(targets[0]["boxes"][0, [0, 2]].mean())
        label = int(targets[0]["labels"][0])
        # After a flip the head is on the image's right, and is then the patient's left femoral head.
        assert (label, x_centre < 20) in {(5, True), (4, False)}
        flips.add(label)
    assert flips == {4, 5}


def test_average_precision_by_hand():
    # Two true boxes; detections ranked hit, miss, hit: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    assert th.average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert th.average_precision([], [], 3) == 0.0
    assert np.isnan(th.average_precision([0.5], [False], 0))
