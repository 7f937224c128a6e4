"""The `prostateseg` command end to end: phantom, evaluate, models; errors without tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_packages import make

from segcore import packages
from segcore.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for word in ("phantom", "evaluate", "models", "examples"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["phantom", "--help"])
    assert "caseNNN_ct.nii.gz" in capsys.readouterr().out


def test_phantom_then_evaluate(tmp_path, capsys):
    code, out, err = run(capsys, "phantom", tmp_path / "cases", "-n", 2, "--seed", 4, "--size", 64)
    assert code == 0 and "wrote 2 case(s)" in out
    assert "phantoms" in err  # progress bar on stderr
    cases = tmp_path / "cases"
    assert {p.name for p in cases.iterdir()} >= {"case000_ct.nii.gz", "case001_labels.nii.gz", "labels.json"}

    # a deliberately damaged prediction: the prostate label moved by 2 voxels
    ref = sitk.ReadImage(str(cases / "case000_labels.nii.gz"))
    array = sitk.GetArrayFromImage(ref)
    moved = np.where(array == 1, 0, array)
    moved[np.roll(array == 1, 2, axis=2) & (moved != 2)] = 1   # the bladder stays as it was
    pred = sitk.GetImageFromArray(moved.astype(np.uint8))
    pred.CopyInformation(ref)
    sitk.WriteImage(pred, str(tmp_path / "pred.nii.gz"))
    code, out, _ = run(capsys, "evaluate", tmp_path / "pred.nii.gz", cases / "case000_labels.nii.gz",
                       "--labels", "1,2", "--json", tmp_path / "m.json", "--csv", tmp_path / "m.csv")
    assert code == 0
    assert "prostate" in out and "bladder" in out and "DSC" in out
    results = {r["name"]: r for r in json.loads((tmp_path / "m.json").read_text())["labels"]}
    assert results["bladder"]["dsc"] == 1.0
    assert 0.3 < results["prostate"]["dsc"] < 0.95
    assert results["prostate"]["hd"] == pytest.approx(2 * ref.GetSpacing()[0], rel=1e-4)
    assert (tmp_path / "m.csv").read_text().count("\n") == 3
    # existing result files are kept unless --overwrite
    code, _, err = run(capsys, "evaluate", tmp_path / "pred.nii.gz", cases / "case000_labels.nii.gz",
                       "--json", tmp_path / "m.json")
    assert code == 1 and "overwrite" in err


def test_phantom_devices_and_scanner_from_the_command_line(tmp_path, capsys):
    code, _out, _ = run(capsys, "phantom", tmp_path / "cases", "-n", 2, "--size", 64, "--with", "fiducials,spacer",
                       "--without", "catheter", "--implant", "both", "--kernel", "sharp", "--kvp", "100")
    assert code == 0
    for n in range(2):
        info = json.loads((tmp_path / "cases" / f"case00{n}_info.json").read_text())
        a = info["anatomy"]
        assert a["fiducials"] and a["spacer"] and not a["catheter"] and a["implant"] == "both"
        assert info["scan"]["kernel"] == "sharp" and info["scan"]["kvp"] == 100


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "missing.nii.gz", "missing2.nii.gz"], "no such file"),
    (["evaluate", "{a}", "{b}"], "same voxel grid"),
    (["evaluate", "{a}", "{a}", "--labels", "x"], "--labels"),
    (["phantom", "{dir}", "--orientation", "upside-down"], "--orientation"),
    (["phantom", "{dir}", "--with", "fiducials,stent"], "stent"),
    (["phantom", "{dir}", "--with", "spacer", "--without", "spacer"], "both --with and --without"),
    (["models", "info", "no-such-model"], "no-such-model"),
    (["models", "install", "{dir}/nothing.zip", "--sha256", "0" * 64], "nothing.zip"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    a, b = sitk.Image([8, 8, 8], sitk.sitkUInt8), sitk.Image([9, 8, 8], sitk.sitkUInt8)
    sitk.WriteImage(a, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(b, str(tmp_path / "b.nii.gz"))
    argv = [v.format(a=tmp_path / "a.nii.gz", b=tmp_path / "b.nii.gz", dir=tmp_path) for v in argv]
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_models_lifecycle(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(packages.registry, "bundled_models_dir", lambda: tmp_path / "bundled")
    folder = tmp_path / "build" / "tiny-prostate"
    make(folder)
    archive = packages.zip_package(folder)
    digest = packages.sha256_file(archive)

    code, _, err = run(capsys, "models", "install", archive, "--sha256", "f" * 64)
    assert code == 1 and "sha256" in err.lower()
    code, out, _ = run(capsys, "-q", "models", "install", archive, "--sha256", digest)
    assert code == 0 and "installed tiny-prostate" in out
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "tiny-prostate" in out and "user" in out
    code, out, _ = run(capsys, "models", "info", "tiny-prostate")
    assert code == 0 and "prostate" in out
    code, out, _ = run(capsys, "models", "verify", "tiny-prostate")
    assert code == 0
    # damage a weights file: verify and list say so, with a failing exit code
    installed = tmp_path / "home" / "models" / "tiny-prostate"
    weights = next(installed.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"12345678")
    code, out, _ = run(capsys, "models", "verify", "tiny-prostate")
    assert code == 1
    code, out, _ = run(capsys, "models", "remove", "tiny-prostate")
    assert code == 0 and not installed.exists()


def test_console_script_is_installed(tmp_path):
    """The entry point a user types, in a fresh process."""
    env = dict(os.environ, PROSTATESEG_HOME=str(tmp_path))
    exe = Path(sys.executable).with_name("prostateseg")
    result = subprocess.run([str(exe), "--version"], check=False, capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.startswith("prostateseg ")
    result = subprocess.run([str(exe), "evaluate", "nope.nii.gz", "nope.nii.gz"], check=False, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_evaluate_real_label_maps_matches_documented_dice(shared_data, tmp_path, capsys):
    """The 3 mm "fast" TotalSegmentator map against the normal one: the data's
    README states bladder 0.976, femur right 0.975, femur left 0.838."""
    folder = shared_data / "real" / "pelvis_ct"
    code, _, _ = run(capsys, "evaluate", folder / "example_seg_fast_v1.nii.gz", folder / "example_seg_v1.nii.gz",
                       "--labels", "104,89,88", "--json", tmp_path / "real.json")
    assert code == 0
    dsc = {r["label"]: r["dsc"] for r in json.loads((tmp_path / "real.json").read_text())["labels"]}
    assert dsc[104] == pytest.approx(0.976, abs=0.0006)
    assert dsc[89] == pytest.approx(0.975, abs=0.0006)
    assert dsc[88] == pytest.approx(0.838, abs=0.0006)
