"""`prostateseg segment`: batches, folders, DICOM series, outputs and refusals.

These tests use a package with small random-weight networks: they check the
command's behaviour, not the model's accuracy (see test_bundled_metricunet.py).
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dicom_series import write_ct_series

from segcore import packages
from segcore.cli import main as cli
from segcore.networks import build
from segcore.prostate import PipelineSettings

STAGES = {
    "stage1": {"architecture": "unet2p5d", "arguments": {"in_channels": 5, "widths": [4, 8]},
               "weights": "stage1.safetensors"},
    "stage2": {"architecture": "metricunet",
               "arguments": {"in_channels": 3, "encoder": [4, 8, 8, 8], "decoder": [8, 8, 8], "head": 8},
               "weights": "stage2.safetensors"},
}


def random_package(folder, name="prostate-random", stages=STAGES, **changes):
    """A small prostate package with seeded random weights (also used by the fault-injection tests)."""
    torch.manual_seed(0)
    weights = {spec["weights"]: build(spec["architecture"], spec["arguments"]).state_dict()
               for spec in stages.values()}
    settings = PipelineSettings()
    manifest = {
        "name": name, "version": "0", "task": "prostate", "licence": "Apache-2.0",
        "description": "random weights for tests", "stages": stages,
        "input": {"spacing_mm": [1, 1, 1], "intensity_window": list(settings.window), "normalisation": "unit"},
        "labels": [{"value": 1, "name": "prostate", "color": [216, 101, 79]}],
        "training": {"data": None, "seed": None, "commit": None, "epochs": None}, "validation": {},
        **changes,
    }
    return packages.create_package(folder, manifest, weights)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return random_package(tmp_path_factory.mktemp("pkg") / "prostate-random")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_phantom):
    folder = tmp_path_factory.mktemp("inputs")
    sitk.WriteImage(small_phantom.ct, str(folder / "a_ct.nii.gz"))
    sitk.WriteImage(small_phantom.labels, str(folder / "a_labels.nii.gz"))   # not a CT: refused
    rotated = sitk.PermuteAxes(small_phantom.ct, [1, 0, 2])
    sitk.WriteImage(rotated, str(folder / "b_ct.nrrd"))
    write_ct_series(small_phantom.ct, folder / "dicom" / "series1", shuffle_seed=3)
    return folder


def test_batch_goes_on_past_bad_inputs_and_says_so(package, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli(["segment", str(inputs / "a_ct.nii.gz"), str(inputs / "missing.nii.gz"),
                str(inputs / "a_labels.nii.gz"), str(inputs / "b_ct.nrrd"), "-o", str(out),
                "--model", str(package.path), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    assert "2 of 4 input(s) failed" in captured.err
    assert "missing.nii.gz does not exist" in captured.err
    assert "a_labels.nii.gz" in captured.err and "CT" in captured.err
    for stem in ("a_ct_seg", "b_ct_seg"):
        assert (out / f"{stem}.seg.nrrd").is_file() and (out / f"{stem}.nii.gz").is_file()
        report = json.loads((out / f"{stem}.json").read_text())
        assert report["model"] == "prostate-random" and "timings_s" in report
        # the package gives the prostate its own colour: still one prostate, not two
        assert [s["name"] for s in report["segments"]] in ([], ["prostate"])
    assert not list(out.glob("a_labels*"))
    b = sitk.ReadImage(str(out / "b_ct_seg.nii.gz"))
    original = sitk.ReadImage(str(inputs / "b_ct.nrrd"))
    assert b.GetSize() == original.GetSize() and b.GetDirection() == pytest.approx(original.GetDirection())


def test_existing_outputs_are_never_overwritten_unasked(package, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-q", "segment", str(inputs / "a_ct.nii.gz"), "-o", str(out), "--model", str(package.path)]
    assert cli(args) == 0
    before = (out / "a_ct_seg.nii.gz").read_bytes()
    (out / "a_ct_seg.json").write_text("{}")
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err
    assert (out / "a_ct_seg.json").read_text() == "{}"
    assert cli(args + ["--overwrite"]) == 0
    assert (out / "a_ct_seg.nii.gz").read_bytes() == before
    assert json.loads((out / "a_ct_seg.json").read_text())["model"] == "prostate-random"


def test_folder_inputs_and_dicom_series(package, inputs, tmp_path, small_phantom):
    out = tmp_path / "out"
    # A folder of images gives each image; a DICOM series folder inside it is one more input.
    code = cli(["-q", "segment", str(inputs / "dicom" / "series1"), str(inputs / "b_ct.nrrd"), "-o", str(out),
                "--model", str(package.path), "--formats", "nii.gz"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["b_ct_seg.json", "b_ct_seg.nii.gz", "manifest.jsonl", "series1_seg.json",
                                                     "series1_seg.nii.gz"]
    seg = sitk.ReadImage(str(out / "series1_seg.nii.gz"))
    assert seg.GetSize() == small_phantom.ct.GetSize()
    assert np.allclose(seg.GetOrigin(), small_phantom.ct.GetOrigin(), atol=1e-3)

    from segcore.batch import expand_inputs

    assert [(p.name, problem) for p, problem in expand_inputs([inputs])] == [
        ("a_ct.nii.gz", None), ("a_labels.nii.gz", None), ("b_ct.nrrd", None)]
    assert [(p.name, problem) for p, problem in expand_inputs([inputs / "dicom"])] == [("series1", None)]
    assert [p.name for p, _ in expand_inputs([inputs / "dicom" / "series1"])] == ["series1"]


def test_bad_model_and_device_are_clear(package, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["segment", str(inputs / "a_ct.nii.gz"), "-o", str(out), "--model", "no-such-model"]) == 1
    assert "no-such-model" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli(["segment", str(inputs / "a_ct.nii.gz"), "-o", str(out), "--model", str(package.path),
                    "--device", "cuda"]) == 1
        assert "CUDA" in capsys.readouterr().err
    organs = random_package(tmp_path / "organs", name="organs-random", task="organs")
    assert cli(["segment", str(inputs / "a_ct.nii.gz"), "-o", str(out), "--model", str(organs.path)]) == 1
    assert "not 'prostate'" in capsys.readouterr().err


def test_files_we_did_not_write_are_never_touched(package, inputs, tmp_path, capsys):
    """A user's own files named like our outputs (ground truth as `<case>_seg.nii.gz` is common) are
    neither replaced nor removed, with or without --overwrite, when this run does not write those names."""
    out = tmp_path / "out"
    out.mkdir()
    own = {out / "a_ct_seg.nii.gz": b"the user's reference", out / "a_ct_seg_prostate.stl": b"the user's mesh"}
    for path, data in own.items():
        path.write_bytes(data)
    args = ["segment", str(inputs / "a_ct.nii.gz"), "-o", str(out), "--formats", "seg.nrrd",
            "--model", str(package.path), "--device", "cpu"]
    assert cli(args) == 0
    assert cli([*args, "--overwrite"]) == 0
    assert all(path.read_bytes() == data for path, data in own.items())
    assert (out / "a_ct_seg.seg.nrrd").is_file() and (out / "a_ct_seg.json").is_file()
