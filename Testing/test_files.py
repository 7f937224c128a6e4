"""segcore.files: outputs that appear whole or not at all (files, JSON, folders)."""

import json
import os

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
