"""Output files and folders that appear whole or not at all.

Every writer in segcore and training goes through here: a result is written
under a temporary name beside its target and renamed onto it, so a crash, a
full disk or Ctrl-C never leaves a half-written file where a user (or the next
run) would take it for a complete one. A *set* of files that belong together
(a case's label maps, meshes and report) is written into a hidden staging
folder and then replaces the previous set as a whole (`StagedSet`). Failures
to write (full disk, read-only or missing folder) become one-line
`OutputWriteError`s. Standard library only, so that any module can use it
without import cycles or heavy imports.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from segcore.errors import OutputExistsError, OutputWriteError, SegcoreError

STAGING_PREFIX = ".prostateseg-staging-"
JOURNAL = ".commit.json"
LOW_SPACE_BYTES = 1 << 20


def write_error(path, error: OSError) -> OutputWriteError:
    """The one-line error for an OSError met while writing `path`."""
    reason = error.strerror or str(error) or type(error).__name__
    hint = "choose another output folder"
    if "space" in reason.lower() or "quota" in reason.lower():
        hint = "free some space or choose another output folder"
    elif isinstance(error, PermissionError) or "read-only" in reason.lower():
        hint = "choose an output folder you can write to"
    return OutputWriteError(f"cannot write {path}: {reason}; {hint}")


def low_on_space(folder) -> bool:
    """Whether the file system holding `folder` is (nearly) full: tells a full disk behind a library's
    vague write error."""
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        return False


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def check_output_file(path, overwrite: bool = False, access: bool = True) -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder in its place, a file where
    its folder should be, an existing file without `overwrite`, a folder we may not write into (`access`)."""
    path = Path(path)
    if path.is_dir():
        raise OutputWriteError(f"{path} is a folder; give the name of a file to write")
    if not overwrite and path.exists():
        raise OutputExistsError(exists_message([path]))
    check_output_folder(path.parent, access)
    return path


def check_output_folder(folder, access: bool = True) -> Path:
    """Refuse, before any work and without creating anything, a folder that cannot be written into: a file
    in its place or above it and (`access`) a folder the OS says we may not write into."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputWriteError(f"{folder} is a file, not a folder; choose another output folder")
    ancestor = _existing_ancestor(folder)
    if not ancestor.is_dir():
        raise OutputWriteError(f"cannot create {folder}: {ancestor} is a file, not a folder")
    if access and not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot write into {ancestor}: permission denied or read-only file system; "
                               "choose an output folder you can write to")
    return folder


def make_folder(folder, access: bool = True) -> list[Path]:
    """Create `folder` and its missing parents; return those created (outermost first), for
    `remove_empty_folders`. Problems are one-line OutputWriteErrors."""
    folder = check_output_folder(folder, access)
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    created: list[Path] = []
    try:
        for path in missing:
            try:
                path.mkdir()
            except FileExistsError:  # made meanwhile by someone else
                if not path.is_dir():
                    raise OutputWriteError(f"cannot create {folder}: {path} is a file, not a folder") from None
                continue
            created.append(path)
    except OSError as error:
        remove_empty_folders(created)
        raise write_error(folder, error) from error
    return created


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove the folders `make_folder` created (innermost first) as long as they are empty."""
    for folder in reversed(list(folders)):
        try:
            folder.rmdir()
        except OSError:
            return


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
    path = check_output_file(path, overwrite, access=False)  # the write itself says what the OS refuses
    make_folder(path.parent, access=False)
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
    except OSError as error:  # disk full, read-only, permissions: one line, nothing left behind
        raise write_error(path, error) from error
    finally:
        _remove_quietly(tmp)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


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


def append_line(path, text: str) -> None:
    """Append one line to a log file (made if missing) in a single write, flushed to disk: a reader sees
    whole lines only, except perhaps a torn last one after a crash, which the next append ends first."""
    data = (text.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as error:
        raise write_error(path, error) from error
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    except OSError as error:
        raise write_error(path, error) from error
    finally:
        os.close(fd)


def fsync_folder(folder) -> None:
    """Make a rename or a new file in `folder` durable (a folder's entries are synced separately from the
    files' data). Windows has no folder handles to sync: there it does nothing."""
    if os.name == "nt":
        return
    handle = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


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


class StagedSet:
    """A set of files written together into `folder` that replaces the previous set as a whole.

    Write the new files into `staging` (a hidden folder inside `folder`), the commit
    mark (e.g. the report) last, then `commit()`: it records a journal, removes
    the old mark, removes `previous` names the new set does not have, moves the
    new files in and the mark last. `discard()` (always call it, e.g. in a
    ``finally``) removes what is left of the staging folder. A process killed
    during the commit leaves the journal; `recover_staging` finishes that commit
    at the next start, so each set is the complete old one, the complete new one
    or absent. `previous` and the staged names are plain file names in `folder`.
    """

    def __init__(self, folder, mark: str | None = None, previous: Sequence[str] = (), overwrite: bool = False):
        self.folder, self.mark, self.overwrite = Path(folder), mark, overwrite
        self.previous = [name for name in previous if _plain_name(name)]
        if not overwrite:
            existing = [self.folder / name for name in self.previous if (self.folder / name).exists()]
            if existing:
                raise OutputExistsError(exists_message(existing))
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_owner_tag()}-", dir=self.folder))
        except OSError as error:
            raise write_error(self.folder, error) from error

    def names(self) -> list[str]:
        """The staged file names (the mark last)."""
        names = sorted(p.name for p in self.staging.iterdir() if p.name != JOURNAL and p.name != self.mark)
        return names + ([self.mark] if self.mark and (self.staging / self.mark).exists() else [])

    def commit(self) -> list[Path]:
        """Replace the previous set by the staged one; return the new files' paths (the mark last).
        Keep signals from interrupting it (the caller's job: files.py has no signal handling)."""
        names = self.names()
        if self.mark and (not names or names[-1] != self.mark):
            raise SegcoreError(f"the set in {self.folder} has no {self.mark}; nothing was replaced")
        existing = [self.folder / n for n in names if (self.folder / n).exists()]
        if existing and not self.overwrite:
            raise OutputExistsError(exists_message(existing))
        files = names[:-1] if self.mark else names
        journal = {"mark": self.mark, "files": files, "remove": [n for n in self.previous if n not in names]}
        try:
            write_text(self.staging / JOURNAL, json.dumps(journal), sync=True)
            _roll_forward(self.staging, self.folder, journal)
        except OSError as error:
            raise write_error(self.folder, error) from error
        return [self.folder / n for n in names]

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def _roll_forward(staging: Path, folder: Path, journal: dict) -> None:
    """Finish a commit described by `journal`; safe to repeat after an interruption at any step."""
    mark = journal.get("mark")
    if mark is None or (staging / mark).exists():  # the new set is not in place yet
        if mark is not None:
            _unlink(folder / mark)  # from here on the old set is no longer complete
        for name in journal["remove"]:
            _unlink(folder / name)
        for name in journal["files"]:
            if (staging / name).exists():
                os.replace(staging / name, folder / name)
        if mark is not None:
            os.replace(staging / mark, folder / mark)
    else:
        for name in journal["remove"]:
            _unlink(folder / name)


def _unlink(path: Path) -> None:
    """Remove a file of an old set if it is there (a folder of that name is left to fail the rename)."""
    if path.is_file() or path.is_symlink():
        path.unlink(missing_ok=True)


# A staging folder made on another machine (a shared output folder on a network file system) or in another
# container cannot be checked by process id: it is left alone until nothing in it has changed for this long.
FOREIGN_STALE_AFTER_S = 3600.0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _owner_tag() -> str:
    """``<pid>@<host>``: who is writing a staging folder."""
    return f"{os.getpid()}@{_host()}"


def _last_change(folder: Path) -> float:
    try:
        return max([folder.lstat().st_mtime, *(p.lstat().st_mtime for p in folder.rglob("*"))])
    except OSError:
        return 0.0


def _owner_alive(staging: Path) -> bool:
    """Whether the process that made a staging folder may still be writing it."""
    pid_text, _, host = staging.name[len(STAGING_PREFIX):].split("-")[0].partition("@")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if host and host != _host():
        return time.time() - _last_change(staging) < FOREIGN_STALE_AFTER_S
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would end the process there; leave others' folders alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _read_journal(staging: Path) -> dict | None:
    try:
        journal = json.loads((staging / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(journal, dict) or not all(isinstance(journal.get(k), list) for k in ("files", "remove")):
        return None
    names = [journal.get("mark") or "x", *journal["files"], *journal["remove"]]
    return journal if all(_plain_name(n) for n in names) else None


def remove_temporary_leftovers(folder, names: Sequence[str]) -> list[Path]:
    """Remove the temporary files (``.tmp-<12 hex>-NAME``) that a killed `atomic_output` left in `folder` for
    these target names: the next run of whatever writes NAME calls this."""
    wanted = set(names)
    try:
        found = list(Path(folder).iterdir())
    except OSError:
        return []
    removed = []
    for path in found:
        token, _, target = path.name.partition("-")[2].partition("-")
        ours = len(token) == 12 and all(c in "0123456789abcdef" for c in token)
        if path.name.startswith(".tmp-") and ours and target in wanted and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def recover_staging(folder) -> list[Path]:
    """Clear what an interrupted run left in `folder`: a staging folder whose commit had begun is finished
    (the new set replaces the old one), any other is removed. Folders of running processes are left.
    Returns the staging folders handled."""
    folder = Path(folder)
    try:
        leftovers = [p for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir()]
    except OSError:
        return []
    handled = []
    for staging in sorted(leftovers):
        if _owner_alive(staging):
            continue
        journal = _read_journal(staging)
        if journal is not None:
            try:
                _roll_forward(staging, folder, journal)
            except OSError as error:
                raise write_error(folder, error) from error
        shutil.rmtree(staging, ignore_errors=True)
        handled.append(staging)
    return handled
