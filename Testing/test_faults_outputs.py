"""Faults while writing results (issue #14): every case's result set is complete-old, complete-new or
absent, whatever happens (SIGTERM, Ctrl-C, a full disk, a read-only folder), and each fault is one
`error: ...` line with exit code 1 and no traceback.

The conditions are created at test time: a real subprocess killed at several points of the writing phase,
and writers or `os.mkdir` made to fail as a full disk or a read-only file system would make them fail
(as root, chmod cannot make a folder read-only). The package has small random-weight networks
(test_cli_segment.random_package), so a case takes a few seconds.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import SimpleITK as sitk
from test_cli_segment import random_package

from segcore import files
from segcore.cli import main as cli

FORMATS = "seg.nrrd,nii.gz,stl"
STEMS = ("a_ct_seg", "b_ct_seg")


def small_package(folder, name="prostate-random"):
    """Random weights, stage 2 at 2 mm: a case takes half the time of the 1 mm package."""
    from segcore.prostate import PipelineSettings

    window = list(PipelineSettings().window)
    return random_package(folder / name, name=name,
                          input={"spacing_mm": [2, 2, 2], "intensity_window": window, "normalisation": "unit"})


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return small_package(tmp_path_factory.mktemp("pkg"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_phantom):
    folder = tmp_path_factory.mktemp("inputs")
    sitk.WriteImage(small_phantom.ct, str(folder / "a_ct.nii.gz"))
    sitk.WriteImage(sitk.PermuteAxes(small_phantom.ct, [1, 0, 2]), str(folder / "b_ct.nii.gz"))
    sitk.WriteImage(small_phantom.labels, str(folder / "labels.nii.gz"))  # not a CT
    return folder


@pytest.fixture(scope="module")
def old_set(tmp_path_factory, inputs):
    """A previous run's result sets of both inputs, from another model that also gave a bladder mesh."""
    old_package = small_package(tmp_path_factory.mktemp("oldpkg"), name="prostate-old")
    folder = tmp_path_factory.mktemp("old") / "out"
    assert cli(["-q", "segment", str(inputs / "a_ct.nii.gz"), str(inputs / "b_ct.nii.gz"), "-o", str(folder),
                "--model", str(old_package.path), "--formats", FORMATS]) == 0
    for stem in STEMS:
        shutil.copy(folder / f"{stem}_prostate.stl", folder / f"{stem}_bladder.stl")
        report = json.loads((folder / f"{stem}.json").read_text())
        report["outputs"].append(f"{stem}_bladder.stl")
        (folder / f"{stem}.json").write_text(json.dumps(report))
    return folder


def fresh_old_set(old_set, where: Path) -> tuple[Path, dict]:
    """A copy of the old result sets and the identity of each of its files."""
    out = where / "out"
    shutil.copytree(old_set, out)
    return out, snapshot(out)


def identity(path: Path):
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def snapshot(folder: Path) -> dict:
    return {p.name: identity(p) for p in folder.iterdir()}


def case_state(out: Path, stem: str, before: dict) -> str:
    """'old', 'new' or 'absent'; fails on any mixture."""
    def mine(name):
        return name.startswith((f"{stem}.", f"{stem}_"))

    names = {p.name for p in out.iterdir() if mine(p.name)} if out.exists() else set()
    if not names:
        return "absent"
    old = {name for name in before if mine(name)}
    if names == old and all(identity(out / name) == before[name] for name in names):
        return "old"
    assert f"{stem}.json" in names, f"{stem}: files without their report: {sorted(names)}"
    report = json.loads((out / f"{stem}.json").read_text())
    assert report["model"] == "prostate-random", f"{stem}: a mixed set {sorted(names)}"
    assert names == {*report["outputs"], f"{stem}.json"}, f"{stem}: {sorted(names)} vs {report['outputs']}"
    unchanged = [name for name in names if before.get(name) == identity(out / name)]
    assert not unchanged, f"{stem}: old files {unchanged} in a new set"
    return "new"


def hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.exists() else []


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(lines) == 1, err
    return errors[0]


def segment_args(inputs, package, out, *extra, names=("a_ct.nii.gz",)):
    return ["-q", "segment", *(str(inputs / n) for n in names), "-o", str(out), "--model", str(package.path),
            "--device", "cpu", "--formats", FORMATS, *extra]


# ---------------------------------------------------------------- interrupted: SIGTERM and SIGINT


def run_and_kill(command, out: Path, number: int, when) -> tuple[int, str, float]:
    """Start `command`, send `number` once `when(elapsed, out)` says so; its exit code, stderr and the
    moment it was sent."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start, sent = time.monotonic(), None
    while process.poll() is None:
        elapsed = time.monotonic() - start
        if when(elapsed, out):
            process.send_signal(number)
            sent = elapsed
            break
        time.sleep(0.002)
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, err, sent


def writing_started(before):
    """The first hidden entry (a staging folder or temporary file) in OUT: the writing phase began."""
    def when(elapsed, out):
        return any(p.name.startswith(".") for p in out.iterdir())
    return when


def report_replaced(before):
    def when(elapsed, out):
        report = out / "a_ct_seg.json"
        try:
            return identity(report) != before["a_ct_seg.json"]
        except FileNotFoundError:
            return False
    return when


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_batch_leaves_each_case_complete_old_complete_new_or_absent(
        number, package, inputs, old_set, tmp_path):
    command = [sys.executable, "-m", "segcore.cli", *segment_args(inputs, package, "OUT", "--overwrite",
                                                                  names=("a_ct.nii.gz", "b_ct.nii.gz"))]
    rng = random.Random(int(number))
    staged_at = None
    triggers = [("writing started", writing_started),
                ("first report replaced", report_replaced)]
    triggers.append(("random delay", None))
    states = []
    for n, (name, trigger) in enumerate(triggers):
        out, before = fresh_old_set(old_set, tmp_path / str(n))
        if trigger is None:
            delay = staged_at + rng.uniform(-0.5, 2.5)

            def when(elapsed, out, delay=delay):
                return elapsed >= delay
        else:
            when = trigger(before)
        code, err, sent = run_and_kill([c if c != "OUT" else str(out) for c in command], out, number, when)
        if n == 0:
            assert sent is not None, "the run ended before its writing phase was seen"
            staged_at = sent
        assert "Traceback" not in err, (name, err)
        if sent is not None and code != 0:
            assert code == (143 if number == signal.SIGTERM else 130), (name, code, err)
        assert hidden(out) == [], (name, hidden(out))
        states.append((name, [case_state(out, stem, before) for stem in STEMS]))
    assert states[0][1] == ["old", "old"]
    assert states[1][1][0] == "new", states


def test_a_commit_cut_short_is_finished_at_the_next_start(package, inputs, old_set, tmp_path):
    """A hard kill (no clean-up possible) in the middle of swapping a set in: the journal lets the next
    start finish it; a staging folder whose commit had not begun, and temporary files, are removed."""
    out, before = fresh_old_set(old_set, tmp_path)
    done = tmp_path / "new"
    assert cli(segment_args(inputs, package, done)) == 0
    new_names = sorted(p.name for p in done.iterdir())
    staging = out / f"{files.STAGING_PREFIX}999999999-cut"
    staging.mkdir()
    for name in new_names:
        shutil.copy(done / name, staging / name)
    journal = {"mark": "a_ct_seg.json", "files": [n for n in new_names if n != "a_ct_seg.json"],
               "remove": ["a_ct_seg_bladder.stl"]}
    (staging / files.JOURNAL).write_text(json.dumps(journal))
    # Killed after the old report was removed and one new file moved in:
    (out / "a_ct_seg.json").unlink()
    os.replace(staging / "a_ct_seg.nii.gz", out / "a_ct_seg.nii.gz")
    unfinished = out / f"{files.STAGING_PREFIX}999999998-half"
    unfinished.mkdir()
    (unfinished / "b_ct_seg.nii.gz").write_bytes(b"half")
    (out / ".tmp-0123456789ab-b_ct_seg.seg.nrrd").write_bytes(b"half")  # as a killed earlier version left it

    assert cli(segment_args(inputs, package, out, "--overwrite", names=("b_ct.nii.gz",))) == 0
    assert hidden(out) == []
    assert case_state(out, "a_ct_seg", before) == "new"
    assert case_state(out, "b_ct_seg", before) == "new"


# ---------------------------------------------------------------------------------- a full disk


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_then_fail(real):
    """A writer that writes part of its file, then finds the disk full."""
    def write(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        no_space()
    return write


@pytest.mark.parametrize("where", ["seg.nrrd", "nii.gz", "stl", "report"])
def test_full_disk_is_one_line_and_keeps_the_old_set(where, package, inputs, old_set, tmp_path, monkeypatch,
                                                     capsys):
    out, before = fresh_old_set(old_set, tmp_path)
    if where == "seg.nrrd":
        import slicerio

        monkeypatch.setattr(slicerio, "write_segmentation", fill_then_fail(slicerio.write_segmentation))
    elif where == "nii.gz":  # SimpleITK says only that it could not write; the disk is found to be full
        def itk_write(image, path, *args, **kwargs):
            Path(path).write_bytes(b"partial")
            raise RuntimeError("Exception thrown in SimpleITK WriteImage: Could not write file")
        monkeypatch.setattr(sitk, "WriteImage", itk_write)
        monkeypatch.setattr(files, "low_on_space", lambda folder: True, raising=False)
    elif where == "stl":
        from segcore import surfaces

        monkeypatch.setattr(surfaces, "_write_stl", lambda mesh, path, marker: fill_then_fail(None)(path))
    else:
        real = files.write_text

        def write_text(path, *args, **kwargs):
            if Path(path).name == "a_ct_seg.json":
                no_space()
            return real(path, *args, **kwargs)
        monkeypatch.setattr(files, "write_text", write_text)
    code = cli(segment_args(inputs, package, out, "--overwrite", names=("a_ct.nii.gz", "b_ct.nii.gz")))
    captured = capsys.readouterr()
    assert code == 1
    line = one_error_line(captured.err)
    assert "No space left on device" in line and "a_ct.nii.gz" in line, line
    assert snapshot(out) == before  # nothing changed, nothing left behind
    assert captured.out == ""  # the batch stopped at the first input


# ----------------------------------------------------------------- output paths that cannot be used


def test_output_folder_that_is_a_file_or_below_a_file_is_refused_before_the_model_loads(inputs, tmp_path,
                                                                                         capsys):
    a_file = tmp_path / "results"
    a_file.write_text("keep")
    for out in (a_file, a_file / "sub"):
        # "no-such-model" would be the error if the model were loaded first
        assert cli(["-q", "segment", str(inputs / "a_ct.nii.gz"), "-o", str(out), "--model", "no-such-model"]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert "is a file, not a folder" in line and "no-such-model" not in line
        assert cli(["-q", "phantom", str(out), "-n", "1", "--size", "96"]) == 1
        assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)
    assert a_file.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


@pytest.mark.parametrize("error", [OSError(errno.EROFS, os.strerror(errno.EROFS)),
                                   PermissionError(errno.EACCES, os.strerror(errno.EACCES))],
                         ids=["read-only", "no-permission"])
def test_output_folder_that_cannot_be_created_is_one_line(error, package, inputs, tmp_path, monkeypatch, capsys):
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).is_relative_to(tmp_path / "ro"):
            raise error
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    out = tmp_path / "ro" / "new" / "out"
    assert cli(segment_args(inputs, package, out)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert error.strerror in line and str(tmp_path / "ro") in line
    assert not (tmp_path / "ro").exists()


def test_unwritable_parent_is_refused_before_the_model_loads(inputs, tmp_path, monkeypatch, capsys):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path
                        else real_access(path, mode, **kw))
    assert cli(["-q", "segment", str(inputs / "a_ct.nii.gz"), "-o", str(tmp_path / "out"),
                "--model", "no-such-model"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "cannot write into" in line and "no-such-model" not in line
    assert list(tmp_path.iterdir()) == []


def test_evaluate_json_naming_a_folder_says_so(inputs, tmp_path, capsys):
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    labels = str(inputs / "labels.nii.gz")
    for extra in ([], ["--overwrite"]):
        assert cli(["evaluate", labels, labels, "--json", str(folder), *extra]) == 1
        captured = capsys.readouterr()
        line = one_error_line(captured.err)
        assert "is a folder" in line and "exists" not in line
        assert captured.out == ""  # refused before the work
    below_a_file = folder / "keep.txt" / "metrics.csv"
    assert cli(["evaluate", labels, labels, "--csv", str(below_a_file)]) == 1
    assert "keep.txt is a file" in one_error_line(capsys.readouterr().err)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and [p.name for p in tmp_path.iterdir()] == ["report"]


def test_evaluate_full_disk_is_one_line(inputs, tmp_path, monkeypatch, capsys):
    real_open = open
    target = tmp_path / "m.json"

    def full_open(path, mode="r", *args, **kwargs):
        stream = real_open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).parent == tmp_path:
            stream.write = no_space
        return stream

    monkeypatch.setattr("builtins.open", full_open)
    labels = str(inputs / "labels.nii.gz")
    assert cli(["evaluate", labels, labels, "--json", str(target)]) == 1
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ checks before the work


def test_bad_formats_and_existing_outputs_are_found_before_the_model_loads(inputs, old_set, tmp_path, capsys):
    out, before = fresh_old_set(old_set, tmp_path)
    args = ["-q", "segment", str(inputs / "a_ct.nii.gz"), "-o", str(out), "--model", "no-such-model"]
    assert cli(args + ["--formats", "seg.nrrd,dcm"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "'dcm'" in line and "no-such-model" not in line
    assert cli(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "already exists" in line and "--overwrite" in line and "no-such-model" not in line
    assert snapshot(out) == before


def test_no_output_folder_without_outputs(package, inputs, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    assert cli(segment_args(inputs, package, out, names=("missing.nii.gz",))) == 1
    assert not (tmp_path / "new").exists()
    assert cli(segment_args(inputs, package, out, names=("labels.nii.gz",))) == 1  # refused: not CT
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_the_whole_set(package, inputs, old_set, tmp_path):
    out, before = fresh_old_set(old_set, tmp_path)
    assert cli(segment_args(inputs, package, out, "--overwrite")) == 0
    assert case_state(out, "a_ct_seg", before) == "new"  # the old model's bladder mesh is gone
    assert not (out / "a_ct_seg_bladder.stl").exists()
    assert case_state(out, "b_ct_seg", before) == "old" and hidden(out) == []
    # Fewer formats: the set still replaces the old one as a whole.
    assert cli(segment_args(inputs, package, out, "--overwrite", "--formats", "nii.gz")) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("a_")) == ["a_ct_seg.json",
                                                                                "a_ct_seg.nii.gz"]


# --------------------------------------------------------------------------- stderr stays ours


def test_library_warnings_stay_off_stderr(package, inputs, tmp_path, monkeypatch, capfd):
    from vtkmodules.vtkCommonCore import vtkOutputWindow

    from segcore import prostate, surfaces

    real_segment, real_surfaces = prostate.ProstateSegmenter.segment, surfaces.labelmap_to_surfaces

    def segment(self, *args, **kwargs):
        warnings.warn("The given NumPy array is not writable, and PyTorch does not support non-writable "
                      "tensors.", UserWarning)
        return real_segment(self, *args, **kwargs)

    def labelmap_to_surfaces(*args, **kwargs):
        vtkOutputWindow.GetInstance().DisplayWarningText("Warning: In vtkWindowedSincPolyDataFilter: odd mesh")
        return real_surfaces(*args, **kwargs)

    monkeypatch.setattr(prostate.ProstateSegmenter, "segment", segment)
    monkeypatch.setattr(surfaces, "labelmap_to_surfaces", labelmap_to_surfaces)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert cli(segment_args(inputs, package, tmp_path / "out")) == 0
    err = capfd.readouterr().err
    assert "NumPy array" not in err and "vtkWindowedSinc" not in err and "Warning" not in err, err
    assert "warn" not in err.lower(), err


def test_signals_during_the_swap_are_delivered_after_it():
    from segcore.batch import signals_deferred

    # Python's own Ctrl-C handler, also when the tests were started in the background (which ignores SIGINT).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            steps.append("swap finished")
        assert steps == ["swap finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize("landing", [1, 2, 3])
def test_a_stop_just_before_a_deferral_takes_hold_leaves_no_staging_folder(
        landing, package, inputs, old_set, tmp_path, monkeypatch):
    """A signal can land between two deferrals, before the next one takes hold; whichever step of writing a
    set it cuts short (1: making the staging folder, 2: the swap, 3: the clean-up after it), the set is
    complete and no staging folder is left. (Once, a stop right after the swap skipped the clean-up.)"""
    from segcore import batch

    deferral = batch.signals_deferred
    entries = []

    @contextmanager
    def stopped_at_landing():
        entries.append(None)
        if len(entries) == landing:
            raise KeyboardInterrupt
        with deferral():
            yield

    monkeypatch.setattr(batch, "signals_deferred", stopped_at_landing)
    out, before = fresh_old_set(old_set, tmp_path)
    assert cli(segment_args(inputs, package, out, "--overwrite")) == 130
    assert len(entries) >= landing
    assert hidden(out) == []
    assert case_state(out, "a_ct_seg", before) == ("old" if landing < 3 else "new")
    assert case_state(out, "b_ct_seg", before) == "old"


def test_a_signal_after_the_command_has_finished_changes_nothing(tmp_path):
    """The program ignores SIGINT and SIGTERM once its command is done (Python's handlers are gone while
    the interpreter shuts down): the command's own exit code, no traceback."""
    script = ("import os, signal, sys\n"
              "from segcore.cli import run\n"
              "code = run(['models', 'list'])\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
