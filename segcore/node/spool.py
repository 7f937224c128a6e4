"""The node's spool: everything received and everything to send, on disk, so that a restart loses nothing.

Layout under the spool folder:

- ``tmp/``: instances being written (a crash leaves them unacknowledged: removed at start);
- ``incoming/<series UID>/<SOP instance UID>.dcm``: received instances, each written, synced to disk and
  renamed into place before its C-STORE is acknowledged; ``sender.json`` names who sent the series;
- ``jobs/<job>/``: a series whose sending is complete (no instance for the quiet period), moved here
  whole; ``job.json`` holds its state (queued, results, failed), ``results/`` the files to send;
- ``sent/<job>/``: ``job.json`` once delivered, with the result UIDs (CT and results are deleted; records
  are kept 30 days);
- ``failed/<job>/``: a series that could not be segmented, with its CT and the reason;
- ``status.json``: what is queued, being processed, waiting to be sent, sent and failed.

Each sending of a series is its own job (``<UTC time>-<8 hex of the series UID>-<n>``), so a series sent
twice gives two result sets, each with new SOP Instance and Series Instance UIDs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from segcore.files import fsync_folder, write_json

QUEUED, RESULTS, SENT, FAILED = "queued", "results", "sent", "failed"
# A DICOM UID: numeric components without leading zeros, separated by dots, at most 64 characters
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_uid(text: str) -> bool:
    return len(text) <= 64 and bool(_UID.match(text))


@dataclass
class Job:
    """One sending of one series, from its arrival to its results' delivery."""

    job: str
    series_uid: str
    calling_ae: str = ""
    instances: int = 0
    received_last: float = 0.0  # time of the last instance (UNIX seconds)
    queued_at: float = 0.0
    state: str = QUEUED
    results: list[str] = field(default_factory=list)
    result_uids: dict[str, dict[str, str]] = field(default_factory=dict)
    attempts: int = 0
    next_try: float = 0.0
    error: str = ""
    segmented_at: float = 0.0
    sent_at: float = 0.0

    @staticmethod
    def from_json(data: dict) -> Job:
        known = {f for f in Job.__dataclass_fields__}
        return Job(**{k: v for k, v in data.items() if k in known})


def series_folder_name(series_uid: str) -> str:
    """A folder name for a series: its UID when it is a well-formed one, else a hash of it."""
    return series_uid if is_uid(series_uid) else "x" + hashlib.sha256(series_uid.encode()).hexdigest()[:24]


class Spool:
    """The spool folder and the lock that keeps receiving and closing a series apart."""

    def __init__(self, root, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        for name in ("tmp", "incoming", "jobs", "sent", "failed"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._counter = 0
        self.size = 0
        self._counted = 0.0

    # ---------------------------------------------------------------------- start-up

    def recover(self) -> list[str]:
        """Clear what a killed node left half-done; return what was found, for the log."""
        notes = []
        leftovers = list((self.root / "tmp").iterdir())
        for path in leftovers:
            path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)
        if leftovers:
            notes.append(f"removed {len(leftovers)} unacknowledged partial instance(s)")
        for folder in self.job_folders():
            if not (folder / "job.json").is_file():  # moved in, killed before its job.json was written
                self._write_job(folder, self._new_job_record(folder))
                notes.append(f"job {folder.name}: recovered a series received before a restart")
            elif (job := self.read_job(folder)).state == SENT:  # killed while filing it away: finish that
                self.finish(job)
            elif job.state == FAILED:
                os.rename(folder, self.root / "failed" / folder.name)
        self.recount()
        incoming = [p for p in (self.root / "incoming").iterdir() if p.is_dir()]
        queued = [j for j in self.jobs() if j.state in (QUEUED, RESULTS)]
        if incoming or queued:
            notes.append(f"{len(incoming)} series still arriving, {len(queued)} job(s) to finish from before")
        return notes

    # ---------------------------------------------------------------------- receiving

    def account(self, change: int) -> None:
        """Files added to (or removed from) the spool outside `store`: results, removed CTs."""
        with self.lock:
            self.size += change

    def recount(self) -> None:
        """The spool's size from the disk (someone may have removed failed jobs to make room)."""
        size = 0
        for path in self.root.rglob("*"):
            try:
                size += path.stat().st_size if path.is_file() else 0
            except OSError:  # removed while we counted
                pass
        with self.lock:
            self.size, self._counted = size, time.monotonic()

    def has_room(self, size: int) -> bool:
        if self.size + size > self.max_bytes and time.monotonic() - self._counted > 10:
            self.recount()  # full by our count: look again (at most every 10 s)
        return self.size + size <= self.max_bytes

    def store(self, series_uid: str, sop_uid: str, encoded: bytes, calling_ae: str) -> bool:
        """Write one received instance durably (synced, renamed into its series folder, folder synced);
        True when it started a new sending of its series."""
        name = series_folder_name(sop_uid) + ".dcm"
        tmp = self.root / "tmp" / f"{threading.get_ident()}-{time.monotonic_ns()}-{name}"
        with open(tmp, "wb") as handle:
            handle.write(encoded)
            handle.flush()
            os.fsync(handle.fileno())
        with self.lock:  # closing a series moves its folder: never between mkdir and rename
            folder = self.root / "incoming" / series_folder_name(series_uid)
            new_series = not folder.is_dir()
            if new_series:
                folder.mkdir()
                write_json(folder / "sender.json", {"series_uid": series_uid, "calling_ae": calling_ae}, sync=True)
                self.size += (folder / "sender.json").stat().st_size
            target = folder / name
            replaced = target.stat().st_size if target.exists() else 0
            os.replace(tmp, target)
            fsync_folder(folder)
            if new_series:
                fsync_folder(folder.parent)
            self.size += len(encoded) - replaced
        return new_series

    def quiet_series(self, quiet_seconds: float, now: float | None = None) -> list[Path]:
        """Incoming series folders whose newest instance is older than the quiet period."""
        now = time.time() if now is None else now
        found = []
        for folder in sorted(p for p in (self.root / "incoming").iterdir() if p.is_dir()):
            times = [p.stat().st_mtime for p in folder.iterdir() if p.suffix == ".dcm"]
            if times and now - max(times) >= quiet_seconds:
                found.append(folder)
        return found

    def close_series(self, folder: Path) -> Job:
        """Make a quiet series a job: its folder moves under jobs/ whole (instances arriving later start a
        new sending)."""
        with self.lock:
            job_id = self._job_id(folder.name)
            target = self.root / "jobs" / job_id
            os.rename(folder, target)
            fsync_folder(target.parent)
            fsync_folder(folder.parent)
        job = self._new_job_record(target)
        self._write_job(target, job)
        return job

    def _job_id(self, series_name: str) -> str:
        self._counter += 1
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        return f"{stamp}-{hashlib.sha256(series_name.encode()).hexdigest()[:8]}-{self._counter}"

    def _new_job_record(self, folder: Path) -> Job:
        sender = {}
        try:
            sender = json.loads((folder / "sender.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        instances = [p for p in folder.iterdir() if p.suffix == ".dcm"]
        return Job(job=folder.name, series_uid=str(sender.get("series_uid", folder.name)),
                   calling_ae=str(sender.get("calling_ae", "")), instances=len(instances),
                   received_last=max((p.stat().st_mtime for p in instances), default=0.0), queued_at=time.time())

    # ---------------------------------------------------------------------- jobs

    def job_folders(self) -> list[Path]:
        return sorted(p for p in (self.root / "jobs").iterdir() if p.is_dir())

    def jobs(self) -> list[Job]:
        return [self.read_job(folder) for folder in self.job_folders()]

    def read_job(self, folder: Path) -> Job:
        try:
            return Job.from_json(json.loads((folder / "job.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return self._new_job_record(folder)

    def _write_job(self, folder: Path, job: Job) -> None:
        write_json(folder / "job.json", asdict(job), overwrite=True, sync=True)

    def save(self, job: Job) -> None:
        self._write_job(self.root / "jobs" / job.job, job)

    def finish(self, job: Job, keep_days: float = 30.0) -> None:
        """A delivered job: its record (with the result UIDs) goes to sent/; its CT and results are deleted
        (the destination has them; sending the series again makes new ones). Records older than
        `keep_days` are removed."""
        folder = self.root / "jobs" / job.job
        self._write_job(folder, job)
        freed = 0
        for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
            if path.is_file() and path.name != "job.json":
                freed += path.stat().st_size
                path.unlink()
            elif path.is_dir():
                path.rmdir()
        os.rename(folder, self.root / "sent" / job.job)
        fsync_folder(self.root / "sent")
        self.account(-freed)
        cutoff = time.time() - keep_days * 86400
        for old in (self.root / "sent").iterdir():
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)

    def fail(self, job: Job) -> None:
        """A series that cannot be segmented: kept with its reason in failed/ for a person to look at."""
        folder = self.root / "jobs" / job.job
        self._write_job(folder, job)
        os.rename(folder, self.root / "failed" / job.job)
        fsync_folder(self.root / "failed")

    # ---------------------------------------------------------------------- status

    def write_status(self, running: str | None, started: float) -> None:
        """status.json: what is arriving, queued, running, waiting to be sent, sent and failed."""
        def record(job: Job) -> dict:
            return {"job": job.job, "series_uid": job.series_uid, "instances": job.instances, "state": job.state,
                    "attempts": job.attempts, "error": job.error, "results": job.results}

        jobs = self.jobs()
        sent = sorted((self.root / "sent").iterdir())
        failed = sorted((self.root / "failed").iterdir())
        status = {
            "updated": time.time(), "started": started, "spool_bytes": self.size,
            "arriving": [p.name for p in sorted((self.root / "incoming").iterdir())],
            "queued": [record(j) for j in jobs if j.state == QUEUED and j.job != running],
            "running": running,
            "to_send": [record(j) for j in jobs if j.state == RESULTS],
            "sent": len(sent), "sent_last": [record(self.read_job(p)) for p in sent[-20:]],
            "failed": [record(self.read_job(p)) for p in failed[-50:]], "failed_count": len(failed),
        }
        write_json(self.root / "status.json", status, overwrite=True)
