"""Output files and folders that appear whole or not at all.

Every writer in segcore and training goes through here: a result is written
under a temporary name beside its target and renamed onto it, so a crash, a
full disk or Ctrl-C never leaves a half-written file where a user (or the next
run) would take it for a complete one. Standard library only, so that any
module can use it without import cycles or heavy imports.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from segcore.errors import OutputExistsError, SegcoreError


def exists_message(paths: Sequence[Path]) -> str:
    """The one sentence every refusal to overwrite uses."""
    listed = ", ".join(str(p) for p in paths)
    return f"output already exists: {listed}; pass --overwrite to replace it or choose another output folder"


@contextmanager
def atomic_output(path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    The temporary name keeps the target's suffixes (``.tmp-<random>-name.nii.gz``)
    so writers that pick the format from the extension still work. If the block
    raises, the temporary file is removed and the target is left untouched. An
    existing target raises OutputExistsError before any work unless overwrite.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExistsError(exists_message([path]))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not created here: a writer then makes the file with normal permissions, and
    # a writer that silently writes nothing is caught below.
    tmp = path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise SegcoreError(f"writing {path} produced no file")
        if not overwrite and path.exists():  # appeared while we were writing
            raise OutputExistsError(exists_message([path]))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str, overwrite: bool = False, sync: bool = False, newline: str | None = None) -> Path:
    """Write a text file atomically (UTF-8); with `sync`, flushed to disk before the rename. `newline` as
    for `open` ("" writes line ends exactly as given, e.g. CSV's CRLF)."""
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as stream:
        stream.write(text)
        if sync:
            stream.flush()
            os.fsync(stream.fileno())
    return path


def write_json(path, data, overwrite: bool = False, indent: int = 2, sync: bool = False, **dumps_options) -> Path:
    """Write `data` as JSON atomically; NaN and infinity are refused (they are not JSON)."""
    try:
        text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False, **dumps_options) + "\n"
    except ValueError as error:
        raise SegcoreError(f"cannot write {path} as JSON: {error} (NaN and infinity have no JSON form)") from None
    return write_text(path, text, overwrite=overwrite, sync=sync)


@contextmanager
def atomic_folder(target, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it becomes `target`.

    An existing target is refused before any work unless `overwrite`, in which
    case it is swapped out only once the new folder is complete (see
    `move_into_place`). On failure the staging folder is removed.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(exists_message([target]))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        move_into_place(staging, target, replace=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(source: Path, target: Path, *, replace: bool) -> None:
    """Rename a complete folder to `target`; with `replace`, swap out an existing one.

    The old folder is first renamed aside, so a failure puts it back and no
    half-replaced folder is ever visible.
    """
    source, target = Path(source), Path(target)
    if not target.exists():
        os.rename(source, target)
        return
    if not replace:
        raise OutputExistsError(exists_message([target]))
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / "old"
    try:
        os.rename(target, aside)
        try:
            os.rename(source, target)
        except OSError:
            os.rename(aside, target)
            raise
    finally:
        shutil.rmtree(aside.parent, ignore_errors=True)
