"""Batches at scale: OUTDIR/manifest.jsonl, --resume, and segmenting on a real Dask cluster (--workers N,
--scheduler ADDRESS): the same outputs as a serial run, a killed worker's case retried once, Ctrl-C.

A package with small random-weight networks and short phantoms keep this quick; the model's accuracy is
not what is tested here.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_cli_segment import random_package

from segcore.cli import main as cli
from segcore.phantom import make_phantom
from segcore.prostate import PipelineSettings

pytest.importorskip("distributed")
TESTING = Path(__file__).parent
OUTPUTS = {"nii.gz", "seg.nrrd", "json"}


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def write_cases(folder: Path, names) -> Path:
    """Small phantom CTs (96 x 96 x about 40 voxels): quick to segment."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        sitk.WriteImage(make_phantom(20 + n, matrix=96, orientation="LPS").ct, str(folder / f"{name}_ct.nii.gz"))
    return folder


def labels_of(out: Path, stem: str) -> np.ndarray:
    image = sitk.ReadImage(str(out / f"{stem}.nii.gz"))
    return sitk.GetArrayFromImage(image)


def hidden(out: Path) -> list[str]:
    """What a stopped run could leave: staging folders, temporary files."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def quick_package(folder, **changes):
    """Random weights, stage 2 on a 2 mm grid: each case takes a second or two."""
    settings = PipelineSettings()
    return random_package(folder, input={"spacing_mm": [2, 2, 2], "intensity_window": list(settings.window),
                                         "normalisation": "unit"}, **changes)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return quick_package(tmp_path_factory.mktemp("pkg") / "prostate-random")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_cases(tmp_path_factory.mktemp("cases"), ["a", "b", "c"])


def segment_args(inputs, out, package, *extra):
    return ["-q", "segment", *map(str, inputs), "-o", str(out), "--model", str(package.path), "--device", "cpu",
            "--formats", "nii.gz,seg.nrrd", *extra]


def test_two_workers_give_the_serial_outputs_and_a_manifest(package, cases, tmp_path, small_phantom):
    not_ct = tmp_path / "labels_ct.nii.gz"
    sitk.WriteImage(small_phantom.labels, str(not_ct))
    inputs = [cases, not_ct]
    assert cli(segment_args(inputs, tmp_path / "serial", package)) == 1  # the label map is refused
    assert cli(segment_args(inputs, tmp_path / "dask", package, "--workers", "2")) == 1
    for stem in ("a_ct_seg", "b_ct_seg", "c_ct_seg"):
        serial, dask = labels_of(tmp_path / "serial", stem), labels_of(tmp_path / "dask", stem)
        assert serial.any() and np.array_equal(serial, dask)
        reports = [json.loads((tmp_path / run / f"{stem}.json").read_text()) for run in ("serial", "dask")]
        assert reports[0]["segments"] == reports[1]["segments"]
    lines = {Path(line["input"]).name: line for line in manifest(tmp_path / "dask")}
    assert sorted(lines) == ["a_ct.nii.gz", "b_ct.nii.gz", "c_ct.nii.gz", "labels_ct.nii.gz"]
    assert lines["labels_ct.nii.gz"]["status"] == "failed" and "CT" in lines["labels_ct.nii.gz"]["error"]
    done = [line for name, line in lines.items() if name != "labels_ct.nii.gz"]
    for line in done:
        assert line["status"] == "done" and line["error"] is None and line["attempts"] == 1
        assert (line["model"], line["model_version"]) == ("prostate-random", "0")
        assert {name.split(".", 1)[1] for name in line["outputs"]} == OUTPUTS
        assert line["worker"].startswith("tcp://") and line["timings_s"]["total"] > 0
    # Each worker process loads the model once and keeps it for its next cases.
    pids = {line["pid"] for line in done}
    assert pids.isdisjoint({os.getpid()}) and 1 <= len(pids) <= 2
    for pid in pids:
        assert sum(line["timings_s"]["model_load"] > 0 for line in done if line["pid"] == pid) == 1
    # The serial run keeps the same manifest, from this process.
    assert {line["pid"] for line in manifest(tmp_path / "serial")} == {os.getpid()}


def test_a_killed_worker_loses_only_its_case_which_is_retried_once(package, tmp_path):
    from cluster_segmenters import DyingSegmenter

    from segcore.cluster import segment_files_on_cluster

    folder = write_cases(tmp_path / "in", ["fine", "die_once", "die_always"])
    factory = partial(DyingSegmenter, str(package.path), "cpu")
    seen = []
    items = segment_files_on_cluster(factory, list(package.labels), [folder], tmp_path / "out", ["nii.gz"],
                                     model=(package.name, package.version), workers=2, on_item=seen.append)
    assert seen == items and len(items) == 3
    lines = {Path(line["input"]).name: line for line in manifest(tmp_path / "out")}
    assert (lines["fine_ct.nii.gz"]["status"], lines["fine_ct.nii.gz"]["attempts"]) == ("done", 1)
    assert (lines["die_once_ct.nii.gz"]["status"], lines["die_once_ct.nii.gz"]["attempts"]) == ("done", 2)
    always = lines["die_always_ct.nii.gz"]
    assert (always["status"], always["attempts"]) == ("failed", 2) and "worker died" in always["error"]
    assert (tmp_path / "out" / "die_once_ct_seg.nii.gz").is_file()
    assert not list((tmp_path / "out").glob("die_always*")) and hidden(tmp_path / "out") == []


def run_cli(*args, **options):
    return subprocess.Popen([sys.executable, "-m", "segcore.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **options)


def test_ctrl_c_leaves_a_consistent_folder_and_resume_finishes_it(package, tmp_path):
    folder = write_cases(tmp_path / "in", ["a", "b", "c", "d", "e", "f"])
    out = tmp_path / "out"
    args = segment_args([folder], out, package, "--workers", "2")
    process = run_cli(*args, start_new_session=True)
    deadline = time.monotonic() + 240
    while not ((out / "manifest.jsonl").exists() and manifest(out)) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert hidden(out) == []
    first = manifest(out)
    assert 1 <= len(first) < 6 and all(line["status"] == "done" for line in first)
    reports = {}
    for stem in "abcdef":
        names = {p.name for p in out.glob(f"{stem}_ct_seg*")}
        assert names in (set(), {f"{stem}_ct_seg.{kind}" for kind in OUTPUTS}), names  # whole sets only
        if names:
            reports[stem] = (out / f"{stem}_ct_seg.json").stat().st_mtime_ns

    assert cli(args + ["--resume"]) == 0
    lines = manifest(out)
    assert sorted(Path(line["input"]).name for line in lines) == [f"{s}_ct.nii.gz" for s in "abcdef"]
    assert lines[: len(first)] == first  # the finished ones were skipped, not done again
    for line in first:
        stem = Path(line["input"]).name.replace("_ct.nii.gz", "")
        assert (out / f"{stem}_ct_seg.json").stat().st_mtime_ns == reports[stem]


def test_resume_skips_what_this_model_version_did_and_redoes_the_rest(package, cases, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(segment_args([cases / "a_ct.nii.gz"], out, package)) == 0
    before = (out / "a_ct_seg.json").stat().st_mtime_ns
    # a interrupted after its result, b never started: only b is done now (no --overwrite needed for a)
    assert cli(segment_args([cases / "a_ct.nii.gz", cases / "b_ct.nii.gz"], out, package, "--resume")[1:]) == 0
    assert "1 input(s) already done by prostate-random 0" in capsys.readouterr().err
    assert (out / "a_ct_seg.json").stat().st_mtime_ns == before
    assert [Path(line["input"]).name for line in manifest(out)] == ["a_ct.nii.gz", "b_ct.nii.gz"]
    # An output deleted by hand: that input is done again.
    (out / "b_ct_seg.seg.nrrd").unlink()
    assert cli(segment_args([cases], out, package, "--resume")) == 0
    assert [Path(line["input"]).name for line in manifest(out)][2:] == ["b_ct.nii.gz", "c_ct.nii.gz"]
    assert (out / "b_ct_seg.seg.nrrd").is_file()
    # Another version of the model: everything is done again, replacing the earlier results.
    newer = quick_package(tmp_path / "newer", version="1")
    assert cli(segment_args([cases], out, newer, "--resume")) == 0
    assert [line["model_version"] for line in manifest(out)][-3:] == ["1", "1", "1"]
    assert json.loads((out / "a_ct_seg.json").read_text())["model_version"] == "1"


def test_resume_refuses_outputs_it_cannot_tell_are_its_own(package, cases, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_ct_seg.nii.gz").write_text("the user's own file")
    assert cli(segment_args([cases / "a_ct.nii.gz"], out, package, "--resume")) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "a_ct_seg.nii.gz").read_text() == "the user's own file"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_existing_cluster_started_with_dask_scheduler_and_dask_worker(package, cases, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    dask = [str(Path(sys.executable).with_name("dask"))]
    scheduler = subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                  "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([*dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        out = tmp_path / "out"
        assert cli(segment_args([cases / "a_ct.nii.gz", cases / "b_ct.nii.gz"], out, package,
                                "--scheduler", address)) == 0
        lines = manifest(out)
        assert [line["status"] for line in lines] == ["done", "done"]
        assert {line["pid"] for line in lines} != {os.getpid()}
        assert labels_of(out, "a_ct_seg").any() and labels_of(out, "b_ct_seg").any()
    finally:
        for process in (worker, scheduler):
            process.terminate()
            process.wait(timeout=60)


def test_without_dask_workers_say_how_to_install_it(package, cases, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the cluster extra were not installed
    assert cli(segment_args([cases / "a_ct.nii.gz"], tmp_path / "out", package, "--workers", "2")) == 1
    err = capsys.readouterr().err
    assert 'pip install "prostateseg[cluster]"' in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_cluster_options_are_one_clear_line(package, cases, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(segment_args([cases / "a_ct.nii.gz"], out, package, "--workers", "0")) == 1
    assert "--workers must be 1 or more" in capsys.readouterr().err
    nobody = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    assert cli(segment_args([cases / "a_ct.nii.gz"], out, package, "--scheduler", nobody)) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Dask scheduler at {nobody}" in err and "Traceback" not in err
    assert not out.exists()


def test_organs_on_a_worker_equal_the_serial_run(tmp_path):
    from segcore.anatomy import structure

    case = make_phantom(20, matrix=96, orientation="LPS")
    bladder = np.flatnonzero((sitk.GetArrayFromImage(case.labels) == structure("bladder").value).any(axis=(1, 2)))
    middle = int(bladder.mean())
    sitk.WriteImage(case.ct[:, :, middle - 5: middle + 5], str(tmp_path / "a_ct.nii.gz"))  # HMR-Net: per slice
    args = ["-q", "organs", str(tmp_path / "a_ct.nii.gz"), "--organs", "bladder,rectum", "--device", "cpu",
            "--formats", "nii.gz"]
    assert cli(args + ["-o", str(tmp_path / "serial")]) == 0
    assert cli(args + ["-o", str(tmp_path / "dask"), "--workers", "1"]) == 0
    serial, dask = labels_of(tmp_path / "serial", "a_ct_seg"), labels_of(tmp_path / "dask", "a_ct_seg")
    assert serial.any() and np.array_equal(serial, dask)
    assert [line["model"] for line in manifest(tmp_path / "dask")] == ["organs-hmrnet-demo"]


def _log_an_error_on_the_worker():
    import logging

    logging.getLogger("distributed.worker").error("a worker's error note, e.g. a failed heartbeat")


def test_a_local_clusters_workers_keep_their_log_notes_out_of_the_terminal(capfd):
    """The worker processes write to the terminal the user started the batch in; their notes (a heartbeat
    failing once Ctrl-C has stopped the scheduler, with its traceback) would break into the progress bar
    and look like a crash."""
    from segcore.cluster import cluster_client

    with cluster_client(1, None) as client:
        client.run(_log_an_error_on_the_worker)
    assert "a worker's error note" not in capfd.readouterr().err
