"""The training kit: patch sampling, augmentation, a tiny real training run, resume, export, install, use;
configuration overrides and checkpoints."""

import json
import math
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file
from training_runs import run_args

from segcore import packages
from segcore.cli import main as cli
from segcore.errors import SegcoreError
from segcore.networks.unet import UNet2p5D
from training import data, runs
from training import train_prostate as tp

TINY = [
    "data.cases=2", "data.validation_cases=1", "data.matrix=96",
    "stage1.epochs=1", "stage1.patches_per_case=16", "stage1.batch_size=8", "stage1.arguments.widths=[8,16]",
    "stage2.epochs=1", "stage2.patches_per_case=8", "stage2.batch_size=4",
    "stage2.arguments.encoder=[8,16,32,64]", "stage2.arguments.decoder=[32,16,16]", "stage2.arguments.head=16",
    "name=prostate-tiny",
]


def tiny_args(tmp_path, *extra):
    return run_args(tmp_path, TINY + list(extra))


def test_patches_are_centred_where_asked():
    ct = np.full((20, 50, 50), 40, np.int16)
    target = np.zeros(ct.shape, np.uint8)
    target[8:12, 20:30, 20:30] = 1
    spec = data.PatchSpec(size=16, slices=3, foreground_fraction=1.0, jitter=0)
    images, tissues, targets = data.sample_patches(ct, target, target, 30, spec, np.random.default_rng(0))
    assert images.shape == (30, 3, 16, 16) and targets.shape == (30, 16, 16)
    assert (targets[:, 8, 8] == 1).all()          # every patch is centred on a prostate voxel
    assert (tissues[:, 1] == targets).all()        # the middle slice's labels are the target
    corner = np.zeros(ct.shape, np.uint8)
    corner[0, 0, 0] = 1
    images, _, _ = data.sample_patches(ct, corner, corner, 1, spec, np.random.default_rng(0))
    assert (images[0, :, :8, :8] == -1024).all()   # beyond the volume is air
    assert (images[0, :, 8:, 8:] == 40).all()


def test_tissue_randomisation_shifts_each_tissue_as_one():
    images = np.zeros((4, 3, 8, 8), np.int16)
    tissues = np.zeros(images.shape, np.uint8)
    tissues[:, :, :4] = 1
    tissues[:, :, 4:] = 13
    targets = (tissues[:, 1] == 1).astype(np.uint8)
    spec = data.AugmentSpec(tissue_probability=1.0, contrast=(1, 1), shift_hu=0, noise_hu=0, flip=False,
                            spatial_probability=0)
    hu, y = data.augment(images, tissues, targets, spec, np.random.default_rng(3))
    hu = hu.numpy()
    for n in range(4):
        prostate, fat = hu[n][tissues[n] == 1], hu[n][tissues[n] == 13]
        assert np.ptp(prostate) == 0 and np.ptp(fat) == 0     # one offset per tissue
    assert len({float(hu[n, 0, 0, 0]) for n in range(4)}) == 4   # different per patch
    assert (y.numpy() == targets).all()


def test_flips_and_rotations_keep_image_and_target_together():
    images = np.full((8, 1, 16, 16), -1024, np.int16)
    images[:, :, 2:7, 3:9] = 200
    targets = (images[:, 0] > 0).astype(np.uint8)
    spec = data.AugmentSpec(tissue_probability=0, contrast=(1, 1), shift_hu=0, noise_hu=0, flip=True,
                            rotate_deg=15, spatial_probability=1.0)
    hu, y = data.augment(images, np.zeros(images.shape, np.uint8), targets, spec, np.random.default_rng(1))
    bright = hu.numpy()[:, 0] > 0
    agreement = (bright == y.numpy().astype(bool)).mean()
    assert agreement > 0.97


def test_tiny_training_run_exports_installs_and_segments(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    assert tp.main(tiny_args(tmp_path)) == 0
    run = tmp_path / "run"
    assert (run / "log.csv").read_text().count("\n") == 3  # header + one epoch per stage
    assert (run / "curves.png").stat().st_size > 0
    package = packages.open_package(run / "package")
    assert packages.verify_package(package.path).ok
    manifest = json.loads((package.path / "model.json").read_text())
    assert manifest["training"]["seed"] == 0 and manifest["training"]["epochs"] == 2
    assert "phantom" in manifest["training"]["data"]
    assert set(manifest["validation"]) == {"stage1", "stage2"}
    # The package holds the inference network only: no optimiser state, no metric-learning module.
    stage2 = load_file(str(package.path / "stage2.safetensors"))
    from segcore.networks import build

    assert set(stage2) == set(build("metricunet", manifest["stages"]["stage2"]["arguments"]).state_dict())

    archive = packages.zip_package(package.path, tmp_path / "tiny.zip")
    digest = packages.sha256_file(archive)
    assert cli(["models", "install", str(archive), "--sha256", digest]) == 0
    case = __import__("segcore.phantom", fromlist=["make_phantom"]).make_phantom(21, matrix=96, orientation="RAS")
    sitk.WriteImage(case.ct, str(tmp_path / "p_ct.nii.gz"))
    out = tmp_path / "seg"
    code = cli(["-q", "segment", str(tmp_path / "p_ct.nii.gz"), "-o", str(out), "--model", "prostate-tiny"])
    assert code == 0
    labelmap = sitk.ReadImage(str(out / "p_ct_seg.nii.gz"))
    assert labelmap.GetSize() == case.ct.GetSize()
    assert labelmap.GetOrigin() == pytest.approx(case.ct.GetOrigin())
    assert labelmap.GetDirection() == pytest.approx(case.ct.GetDirection())
    report = json.loads((out / "p_ct_seg.json").read_text())
    assert report["model"] == "prostate-tiny" and 0.0 <= report["confidence"] <= 1.0
    with zipfile.ZipFile(archive) as zf:
        assert not any(n.endswith((".pt", ".pth", ".pkl")) for n in zf.namelist())


def test_runs_are_deterministic_and_resume_exactly(tmp_path):
    one_epoch = ["--stages", "stage2"]   # MetricUNet with its metric-learning sampler
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    assert tp.main(tiny_args(straight, "stage2.epochs=2") + one_epoch) == 0
    assert tp.main(tiny_args(split, "stage2.epochs=2") + one_epoch + ["--max-epochs", "1"]) == 0
    assert json.loads((split / "run" / "stage2" / "last.json").read_text())["epoch"] == 0
    # A fresh run over existing checkpoints is refused rather than silently replacing them.
    assert tp.main(tiny_args(split, "stage2.epochs=2") + one_epoch) == 1
    assert tp.main(tiny_args(split, "stage2.epochs=2") + one_epoch + ["--resume"]) == 0
    a = load_file(str(straight / "run" / "stage2" / "last.safetensors"))
    b = load_file(str(split / "run" / "stage2" / "last.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    history = json.loads((split / "run" / "stage2" / "last.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2]


def test_configuration_typos_are_refused(tmp_path, capsys):
    assert tp.main(tiny_args(tmp_path, "stage2.epoch=3")) == 1
    assert "unknown configuration keys: stage2.epoch" in capsys.readouterr().err
    assert tp.main(tiny_args(tmp_path, "stage2.metric.tua=0.2")) == 1
    assert "bad configuration" in capsys.readouterr().err


def test_folder_layout_is_read_and_checked(tmp_path):
    (tmp_path / "a_ct.nii.gz").write_bytes(b"")
    with pytest.raises(Exception, match="no label map beside it"):
        data.folder_sources(tmp_path)
    (tmp_path / "a_labels.nii.gz").write_bytes(b"")
    (tmp_path / "b_ct.nrrd").write_bytes(b"")
    (tmp_path / "b_labels.nrrd").write_bytes(b"")
    sources = data.folder_sources(tmp_path, prostate_label=3)
    assert [s.case_id for s in sources] == ["a", "b"]
    assert sources[1].labels_path.endswith("b_labels.nrrd") and sources[1].prostate_label == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="no training cases"):
        data.folder_sources(empty)


def test_cut_scans_end_inside_the_prostate():
    ct = (np.arange(30)[:, None, None] * 10 * np.ones((1, 20, 20))).astype(np.int16)   # slice k holds 10*k
    target = np.zeros(ct.shape, np.uint8)
    target[10:16, 8:12, 8:12] = 1
    spec = data.PatchSpec(size=8, slices=5, foreground_fraction=0.5, jitter=2, z_margin=100, cut_probability=1.0)
    images, _, _ = data.sample_patches(ct, target, target, 200, spec, np.random.default_rng(0))
    lowest = images[:, :, 4, 4].min(axis=1) // 10
    assert lowest.min() >= 8                        # no patch sees below a cut (cuts lie in 8..13)
    assert (images[:, 0, 4, 4] == images[:, 1, 4, 4]).any()   # stacks at a cut repeat its slice
    uncut = data.PatchSpec(size=8, slices=5, foreground_fraction=0.5, jitter=2, z_margin=100)
    images, _, _ = data.sample_patches(ct, target, target, 200, uncut, np.random.default_rng(0))
    assert (images[:, :, 4, 4].min(axis=1) // 10).min() < 8
    # cut_reach moves the highest cut up the gland: 0.8 of slices 10..15 reaches slice 14, never 15
    higher = data.PatchSpec(size=8, slices=5, foreground_fraction=0.5, jitter=2, z_margin=100, cut_probability=1.0,
                            cut_reach=0.8)
    for spec, highest in ((higher, 14), (data.PatchSpec(**{**vars(higher), "cut_reach": 0.5}), 12)):
        images, _, _ = data.sample_patches(ct, target, target, 400, spec, np.random.default_rng(0))
        repeated = images[:, 0, 4, 4] == images[:, 1, 4, 4]       # the stack reaches its cut
        cuts = images[repeated, 0, 4, 4] // 10
        assert cuts.min() >= 8 and cuts.max() == highest


def test_configuration_is_defaults_then_file_then_overrides(tmp_path):
    defaults = {"seed": 0, "stage": {"epochs": 1, "lr": 0.1}, "arguments": {"widths": [8]}}
    path = tmp_path / "run.yaml"
    path.write_text("stage:\n  epochs: 5\n")
    config = runs.load_config(str(path), ["stage.lr=0.5", "arguments.depth=3", "seed=7"], defaults, "x.py")
    assert config == {"seed": 7, "stage": {"epochs": 5, "lr": 0.5}, "arguments": {"widths": [8], "depth": 3}}
    assert defaults == {"seed": 0, "stage": {"epochs": 1, "lr": 0.1}, "arguments": {"widths": [8]}}
    # Keys are checked, except in the free-form sections that their constructors check.
    with pytest.raises(SegcoreError, match=r"unknown configuration keys: stage\.epoch, speed \(see DEFAULTS in x\.py"):
        runs.load_config(None, ["stage.epoch=3", "speed=2"], defaults, "x.py")
    with pytest.raises(SegcoreError, match="--set needs KEY=VALUE"):
        runs.load_config(None, ["seed"], defaults, "x.py")


def test_checkpoints_round_trip_network_optimiser_and_state(tmp_path):
    def make():
        network = UNet2p5D(in_channels=1, widths=(4, 8))
        return network, torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    network, optimizer = make()
    network(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    state = {"epoch": 3, "history": [{"validation": {"dsc": 0.5, "hd95": float("nan")}}]}
    runs.save_checkpoint(tmp_path, "last", network, optimizer, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]   # nothing half-written
    other, other_optimizer = make()
    loaded = runs.load_checkpoint(tmp_path, "last", other, other_optimizer)
    assert loaded["epoch"] == 3 and math.isnan(loaded["history"][0]["validation"]["hd95"])
    ours, theirs = network.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours, theirs = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[i]["momentum_buffer"], theirs[i]["momentum_buffer"]) for i in ours)
    # A fresh run over it is refused; a resumed one gets its state, a restarted one none.
    with pytest.raises(SegcoreError, match="already holds a stage1 run"):
        runs.resume_checkpoint(tmp_path, other, other_optimizer, False, False, "stage1 run")
    assert runs.resume_checkpoint(tmp_path, other, other_optimizer, True, False, "stage1 run")["epoch"] == 3
    assert runs.resume_checkpoint(tmp_path, other, other_optimizer, False, True, "stage1 run") is None
