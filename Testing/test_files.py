"""segcore.files: outputs that appear whole or not at all (files, JSON, folders)."""

import json
import os
import time

import pytest

from segcore import files
from segcore.errors import OutputExistsError, SegcoreError


def test_atomic_output_writes_through_a_temporary_file_with_the_same_suffixes(tmp_path):
    target = tmp_path / "sub" / "case.seg.nrrd"
    with files.atomic_output(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name != target.name and tmp.name.endswith(".seg.nrrd") and tmp.name.startswith(".tmp-")
        assert not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_output_leaves_the_target_untouched_on_failure(tmp_path):
    target = tmp_path / "case.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_output_refuses_an_existing_file_before_any_work(tmp_path):
    target = tmp_path / "case.nii.gz"
    target.write_text("old")
    ran = []
    with pytest.raises(OutputExistsError, match="--overwrite"), files.atomic_output(target):
        ran.append(True)
    assert not ran and target.read_text() == "old"
    with files.atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_output_fails_when_nothing_was_written(tmp_path):
    target = tmp_path / "case.nrrd"
    with pytest.raises(SegcoreError, match="no file"), files.atomic_output(target):
        pass
    assert not target.exists()


def test_write_json_is_atomic_and_refuses_nan(tmp_path):
    target = tmp_path / "report.json"
    files.write_json(target, {"dsc": 0.9, "organ": "Prostata ü"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"dsc": 0.9, "organ": "Prostata ü"}
    with pytest.raises(OutputExistsError):
        files.write_json(target, {"dsc": 0.1})
    with pytest.raises(SegcoreError, match="NaN"):
        files.write_json(target, {"dsc": float("nan")}, overwrite=True)
    assert json.loads(target.read_text(encoding="utf-8"))["dsc"] == 0.9  # the old file survived
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "package"
    with pytest.raises(RuntimeError), files.atomic_folder(target) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash while writing")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with files.atomic_folder(target) as staging:
        assert not target.exists()
        (staging / "model.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["model.json"]


def test_atomic_folder_replaces_only_when_asked(tmp_path):
    target = tmp_path / "package"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"), files.atomic_folder(target):
        pass
    with files.atomic_folder(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["package"]  # nothing left aside


def test_move_into_place_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    target, source = tmp_path / "package", tmp_path / "staging"
    target.mkdir()
    (target / "old.txt").write_text("old")
    source.mkdir()
    real_rename = os.rename

    def failing_rename(a, b):
        if str(a) == str(source):
            raise OSError("disk gone")
        return real_rename(a, b)

    monkeypatch.setattr(files.os, "rename", failing_rename)
    with pytest.raises(OSError):
        files.move_into_place(source, target, replace=True)
    assert (target / "old.txt").read_text() == "old"


# ------------------------------------------------------------------ sets of files, write errors


def old_set(folder):
    folder.mkdir(exist_ok=True)
    for name, text in (("c.nii.gz", "old"), ("c_bladder.stl", "old"), ("c.json", "old report")):
        (folder / name).write_text(text)


def test_staged_set_replaces_the_old_set_as_a_whole(tmp_path):
    old_set(tmp_path)
    staged = files.StagedSet(tmp_path, "c.json", ["c.nii.gz", "c_bladder.stl", "c.json", "../x"], overwrite=True)
    try:
        assert staged.staging.parent == tmp_path and staged.staging.name.startswith(files.STAGING_PREFIX)
        (staged.staging / "c.nii.gz").write_text("new")
        (staged.staging / "c_prostate.stl").write_text("new")
        (staged.staging / "c.json").write_text("new report")
        assert staged.names() == ["c.nii.gz", "c_prostate.stl", "c.json"]
        assert (tmp_path / "c.json").read_text() == "old report"  # nothing visible before the commit
        paths = staged.commit()
    finally:
        staged.discard()
    assert [p.name for p in paths] == ["c.nii.gz", "c_prostate.stl", "c.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.nii.gz", "c_prostate.stl"]
    assert {p.read_text() for p in tmp_path.iterdir()} == {"new", "new report"}


def test_staged_set_refuses_existing_files_and_a_set_without_its_mark(tmp_path):
    old_set(tmp_path)
    with pytest.raises(OutputExistsError, match="c_bladder.stl"):
        files.StagedSet(tmp_path, "c.json", ["c_bladder.stl"])
    staged = files.StagedSet(tmp_path, "c.json", ["c.nii.gz"], overwrite=True)
    (staged.staging / "c.nii.gz").write_text("new")
    with pytest.raises(SegcoreError, match="c.json"):
        staged.commit()
    staged.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.nii.gz", "c_bladder.stl"]
    assert (tmp_path / "c.nii.gz").read_text() == "old"


def test_recover_staging_finishes_a_begun_commit_and_removes_the_rest(tmp_path):
    old_set(tmp_path)
    dead = 999_999_999  # above any pid
    begun = tmp_path / f"{files.STAGING_PREFIX}{dead}-a"
    begun.mkdir()
    (begun / "c.nii.gz").write_text("new")
    (begun / "c.json").write_text("new report")
    journal = {"mark": "c.json", "files": ["c.nii.gz"], "remove": ["c_bladder.stl"]}
    (begun / files.JOURNAL).write_text(json.dumps(journal))
    (tmp_path / "c.json").unlink()  # the commit was cut short after its first step
    unbegun = tmp_path / f"{files.STAGING_PREFIX}{dead}-b"
    unbegun.mkdir()
    (unbegun / "c.nii.gz").write_text("half")
    hostile = tmp_path / f"{files.STAGING_PREFIX}{dead}-c"
    hostile.mkdir()
    (hostile / files.JOURNAL).write_text(json.dumps({"mark": None, "files": [], "remove": ["../outside"]}))
    (tmp_path.parent / "outside").write_text("keep")
    running = tmp_path / f"{files.STAGING_PREFIX}{os.getpid()}-d"  # a live process's: left alone
    running.mkdir()
    assert len(files.recover_staging(tmp_path)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "c.json", "c.nii.gz"]
    assert (tmp_path / "c.json").read_text() == "new report" and (tmp_path / "c.nii.gz").read_text() == "new"
    assert (tmp_path.parent / "outside").read_text() == "keep"


def test_write_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(files.OutputWriteError, match="is a folder"):
        files.write_text(folder, "x", overwrite=True)
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(files.OutputWriteError, match="a_file is a file"):
        files.write_text(tmp_path / "a_file" / "sub" / "x.txt", "x")
    real_replace = os.replace

    def full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(files.OutputWriteError, match="No space left on device") as error:
        files.write_json(tmp_path / "r.json", {"a": 1})
    assert "\n" not in str(error.value)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder"]


def test_make_folder_reports_what_it_created_and_cleans_up(tmp_path, monkeypatch):
    created = files.make_folder(tmp_path / "a" / "b")
    assert created == [tmp_path / "a", tmp_path / "a" / "b"]
    files.remove_empty_folders(created)
    assert list(tmp_path.iterdir()) == []
    real_mkdir = os.mkdir

    def read_only(path, *args):
        if os.path.basename(path) == "b":
            raise OSError(30, "Read-only file system")
        return real_mkdir(path, *args)

    monkeypatch.setattr(files.os, "mkdir", read_only)
    with pytest.raises(files.OutputWriteError, match="Read-only file system"):
        files.make_folder(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []


def test_a_staging_folder_from_another_machine_is_left_until_it_is_long_stale(tmp_path):
    """A shared output folder (network file system) or another container: its pid means nothing here."""
    foreign = tmp_path / f"{files.STAGING_PREFIX}123@some-other-host-x"
    foreign.mkdir()
    (foreign / "c.nii.gz").write_text("being written elsewhere")
    assert files.recover_staging(tmp_path) == [] and foreign.is_dir()
    old = time.time() - files.FOREIGN_STALE_AFTER_S - 60
    for path in (foreign / "c.nii.gz", foreign):
        os.utime(path, (old, old))
    assert files.recover_staging(tmp_path) == [foreign] and not foreign.exists()


def test_our_staging_folders_name_their_process_and_host(tmp_path):
    staged = files.StagedSet(tmp_path, "c.json", [], overwrite=False)
    try:
        assert staged.staging.name.startswith(f"{files.STAGING_PREFIX}{os.getpid()}@")
        assert files.recover_staging(tmp_path) == []  # ours, alive: left alone
    finally:
        staged.discard()
