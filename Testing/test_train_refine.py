"""The guided-correction training kit: the simulated user, a tiny real training run with simulated clicks,
resume, export, and the package refining an image."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file
from training_runs import run_args

from segcore import packages
from segcore.refinement import EXCLUDE, INCLUDE, Refiner
from training import clicks as simulated
from training import train_refine as tr

TINY = ["data.cases=2", "data.validation_cases=1", "data.matrix=96", "epochs=1", "steps_per_epoch=3",
        "slabs_per_step=2", "slices_per_slab=2", "window=64", "arguments.widths=[8,16]", "name=refine-tiny",
        "validation.clicks=1", "organs=[prostate,bladder]"]


def tiny_args(tmp_path, *extra):
    return run_args(tmp_path, TINY + list(extra))


def test_the_next_click_goes_to_the_middle_of_the_largest_error():
    truth = np.zeros((20, 40, 40), bool)
    truth[5:15, 10:30, 10:30] = True
    mask = truth.copy()
    mask[5:15, 10:30, 10:16] = False              # a missed slab 6 voxels wide
    mask[8:10, 32:34, 32:34] = True               # a small false blob
    (z, y, x), kind = simulated.next_click(mask, truth, (1.0, 1.0, 1.0))
    assert kind == INCLUDE and 12 <= x <= 13 and 7 <= z <= 12 and 12 <= y <= 27   # 3 voxels from any border
    mask[5:15, 10:30, 10:16] = True
    assert simulated.next_click(mask, truth, (1.0, 1.0, 1.0))[1] == EXCLUDE
    assert simulated.next_click(truth, truth, (1.0, 1.0, 1.0)) is None


def test_poor_masks_are_shifted_and_eroded_by_the_asked_millimetres():
    truth = np.zeros((40, 60, 60), bool)
    truth[10:30, 15:45, 15:45] = True
    poor = simulated.poor_mask(truth, (2.0, 1.0, 1.0), np.random.default_rng(0), shift_mm=5.0, erode_mm=2.0)
    moved = np.array(np.nonzero(poor)).mean(axis=1) - np.array(np.nonzero(truth)).mean(axis=1)
    assert np.linalg.norm(moved * (2.0, 1.0, 1.0)) == pytest.approx(5.0, abs=0.8)
    assert poor.sum() < truth.sum() * 0.85
    assert 0.5 < simulated.dice(poor, truth) < 0.9


def test_tiny_training_run_exports_a_package_that_refines(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    assert tr.main(tiny_args(tmp_path)) == 0
    run = tmp_path / "run"
    assert (run / "log.csv").read_text().count("\n") == 2          # header + one epoch
    package = packages.open_package(run / "package")
    assert package.task == "refine" and packages.verify_package(package.path).ok
    manifest = json.loads((package.path / "model.json").read_text())
    assert set(manifest["validation"]["refine"]) >= {"dsc_0_clicks", "dsc_1_clicks", "dsc"}
    assert manifest["pipeline"]["reach_mm"] == 12.0 and manifest["training"]["seed"] == 0
    from segcore.phantom import make_phantom

    case = make_phantom(21, matrix=96, orientation="RAS")
    from segcore.metrics import centroids

    on_prostate = tuple(centroids(case.labels)[1])   # an include point on the structure being refined
    result = Refiner(package, device="cpu")(case.ct, case.labels, [on_prostate], [], 1)
    assert result.labelmap.GetSize() == case.ct.GetSize() and result.model == "refine-tiny"


def test_runs_are_deterministic_and_resume_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    assert tr.main(tiny_args(straight, "epochs=2")) == 0
    assert tr.main(tiny_args(split, "epochs=2") + ["--max-epochs", "1"]) == 0
    assert not (split / "run" / "package").exists()
    assert tr.main(tiny_args(split, "epochs=2")) == 1                # not over existing checkpoints
    assert tr.main(tiny_args(split, "epochs=2") + ["--resume"]) == 0
    a = load_file(str(straight / "run" / "refine" / "last.safetensors"))
    b = load_file(str(split / "run" / "refine" / "last.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
