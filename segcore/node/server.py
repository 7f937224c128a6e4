"""The DICOM node: a Storage SCP that takes CT series in, a worker that segments each complete series, and
a sender that delivers the results to the destination, retrying with back-off until it succeeds.

Order of events for a series: every instance is spooled durably before its C-STORE is acknowledged
(`Spool.store`); when no instance has come for the quiet period the sending is closed and becomes a job;
the job is segmented (one model, loaded at start) and its RT Structure Set (and DICOM SEG) written into
the job; then sent with C-STORE. A job's state is on disk at every step, so a node killed at any point
picks up where it stopped. The SCP runs in pynetdicom's threads; segmenting and sending run one job at a
time in the main thread, which also handles SIGTERM: it finishes the job in hand, then stops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from segcore.errors import SegcoreError
from segcore.node.config import NodeConfig
from segcore.node.spool import FAILED, QUEUED, RESULTS, SENT, Job, Spool, is_uid

log = logging.getLogger("segcore.node")

# DIMSE statuses of a Storage SCP (PS3.4 B.2.3)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, SOP_CLASS_NOT_SUPPORTED = 0x0000, 0xA700, 0xC210, 0x0122
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESULT_STEM = "result_seg"  # results are result_rtstruct.dcm and result_seg.dcm


def make_segmenter(config: NodeConfig):
    if config.task == "organs":
        from segcore.organs import OrganSegmenter

        return OrganSegmenter(config.model, config.device)
    from segcore.prostate import ProstateSegmenter

    return ProstateSegmenter(config.model, config.device)


class Node:
    """`prostateseg serve`: call `run()`; it returns when asked to stop (SIGTERM, SIGINT or `stop()`)."""

    def __init__(self, config: NodeConfig, segmenter=None):
        self.config = config
        self.spool = Spool(config.spool, config.max_spool_bytes)
        self.segmenter = segmenter
        self.stopping = threading.Event()
        self.started = time.time()
        self.running: str | None = None
        self.server = None

    # ---------------------------------------------------------------------- the SCP

    def _on_requested(self, event) -> None:
        requestor = event.assoc.requestor
        try:
            calling = requestor.primitive.calling_ae_title  # the requestor's own fields are set after this event
            calling = (calling.decode("ascii", "replace") if isinstance(calling, bytes) else str(calling)).strip()
            host = requestor.address
            allowed = self.config.is_allowed(calling, host)
        except Exception as error:  # noqa: BLE001 - pynetdicom would swallow it and accept: refuse instead
            calling, host, allowed = "?", "?", False
            log.error("could not check a caller (%s): refused", error)
        if not allowed:
            log.warning("refused an association from %s@%s: not on the allow list", calling, host)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected permanent, calling AE not recognised
            event.assoc.kill()  # as pynetdicom does after its own rejections: the reject reaches the caller

    def _on_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        try:
            encoded = event.encoded_dataset()
            # the negotiated class and the request's instance UID: some scanners leave the data set's empty
            sop_class = str(event.request.AffectedSOPClassUID)
            sop_uid = str(event.request.AffectedSOPInstanceUID)
            dataset = event.dataset
            series_uid = str(dataset.get("SeriesInstanceUID", "") or "")
            missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
                       if not str(dataset.get(k, "") or "")]
        except Exception as error:  # noqa: BLE001 - a malformed object is refused, whatever broke in decoding
            log.warning("refused a malformed instance from %s: %s", calling, str(error).splitlines()[0][:200])
            return CANNOT_UNDERSTAND
        if missing:  # contours could not name the study, series or space they belong to
            log.warning("refused instance %s from %s: no %s", sop_uid, calling, ", ".join(missing))
            return CANNOT_UNDERSTAND
        if not (is_uid(series_uid) and is_uid(sop_uid)):
            log.warning("refused an instance from %s: malformed UIDs (series %r, instance %r)", calling,
                        series_uid[:80], sop_uid[:80])
            return CANNOT_UNDERSTAND
        if sop_class != CT_IMAGE_STORAGE:
            log.warning("refused a %s instance from %s: only CT images are segmented", sop_class, calling)
            return SOP_CLASS_NOT_SUPPORTED
        if len(encoded) > self.config.max_instance_bytes:
            log.warning("refused instance %s of series %s from %s: %d MB is over the %d MB limit", sop_uid,
                        series_uid, calling, len(encoded) >> 20, self.config.max_instance_bytes >> 20)
            return OUT_OF_RESOURCES
        if not self.spool.has_room(len(encoded)):
            log.warning("refused instance %s of series %s from %s: the spool is full (%d GB limit)", sop_uid,
                        series_uid, calling, self.config.max_spool_bytes >> 30)
            return OUT_OF_RESOURCES
        try:
            new_series = self.spool.store(series_uid, sop_uid, encoded, calling)
        except OSError as error:
            log.error("could not spool instance %s of series %s: %s", sop_uid, series_uid, error.strerror or error)
            return OUT_OF_RESOURCES
        if new_series:
            log.info("receiving series %s from %s", series_uid, calling)
        return SUCCESS

    def _application_entity(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
        from pynetdicom.sop_class import CTImageStorage, Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = self.config.max_associations
        ae.require_called_aet = True  # a caller must address this node by its AE title
        return ae

    def start_server(self) -> None:
        from pynetdicom import evt

        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store)]
        self.server = self._application_entity().start_server(
            (self.config.bind, self.config.port), block=False, evt_handlers=handlers,
            ssl_context=self.config.ssl_context(server=True))

    # ---------------------------------------------------------------------- the worker

    def close_quiet_series(self) -> bool:
        changed = False
        for folder in self.spool.quiet_series(self.config.quiet_seconds):
            job = self.spool.close_series(folder)
            who = self._patient(job) if self.config.log_patient_names else ""
            log.info("series %s complete: %d instance(s) from %s%s; queued as job %s", job.series_uid,
                     job.instances, job.calling_ae or "?", who, job.job)
            changed = True
        return changed

    def _patient(self, job: Job) -> str:
        from segcore.dicom.ct import read_header

        folder = self.spool.root / "jobs" / job.job
        try:
            header = read_header(next(folder.glob("*.dcm")))
            return f" (patient {header.get('PatientName', '')}, ID {header.get('PatientID', '')})"
        except (StopIteration, SegcoreError):
            return ""

    def segment(self, job: Job) -> None:
        """Segment a queued job and write its results into the job; a bad series goes to failed/."""
        from segcore.dicom.ct import Algorithm
        from segcore.export import export_labelmap

        folder = self.spool.root / "jobs" / job.job
        self.running = job.job
        self.spool.write_status(self.running, self.started)
        log.info("segmenting series %s (job %s)", job.series_uid, job.job)
        started = time.perf_counter()
        try:
            result = self.segmenter(folder)
            written = export_labelmap(result.labelmap, self.segmenter.structures, folder / "results", RESULT_STEM,
                                      self.config.formats, overwrite=True, source=folder,
                                      roi_names=self.config.roi_names,
                                      algorithm=Algorithm(result.model, result.model_version))
        except (OSError, MemoryError) as error:  # the machine, not the series: a full disk, no memory
            job.attempts += 1
            job.error, job.next_try = f"{type(error).__name__}: {error}", time.time() + self._wait(job.attempts)
            self.spool.save(job)
            log.error("series %s (job %s): %s; trying again in %.0f s", job.series_uid, job.job, job.error,
                      job.next_try - time.time())
            return
        except Exception as error:  # noqa: BLE001 - whatever a series makes the model raise fails that series only
            job.state, job.error = FAILED, str(error) if isinstance(error, SegcoreError) else \
                f"{type(error).__name__}: {error}"
            self.spool.fail(job)
            log.error("series %s (job %s) failed: %s", job.series_uid, job.job, job.error)
            return
        finally:
            self.running = None
        self.spool.account(sum(p.stat().st_size for p in written))
        job.results, job.attempts, job.error = [p.name for p in written], 0, ""
        job.result_uids = _uids(written)
        job.state, job.segmented_at = RESULTS, time.time()
        self.spool.save(job)
        found = ", ".join(f"{s.name} {s.volume_cc:.1f} cc" for s in result.segments) or "nothing found"
        log.info("series %s: %s in %.1f s; results %s", job.series_uid, found, time.perf_counter() - started,
                 ", ".join(f"{name} (SOP {uids['sop']})" for name, uids in job.result_uids.items()))

    def _wait(self, attempts: int) -> float:
        first, longest = self.config.retry_seconds
        return min(longest, first * 2 ** (attempts - 1))

    def send(self, job: Job) -> bool:
        """Deliver a job's results; on failure retry later, waiting longer each time. True if delivered."""
        folder = self.spool.root / "jobs" / job.job
        job.attempts += 1
        try:
            deliver(self.config, [folder / "results" / name for name in job.results])
        except SegcoreError as error:
            wait = self._wait(job.attempts)
            job.error, job.next_try = str(error), time.time() + wait
            self.spool.save(job)
            log.warning("sending the results of series %s failed (attempt %d: %s); next try in %.0f s",
                        job.series_uid, job.attempts, error, wait)
            return False
        job.state, job.sent_at, job.error = SENT, time.time(), ""
        self.spool.finish(job)
        log.info("sent the results of series %s to %s (job %s)", job.series_uid, self.config.destination, job.job)
        return True

    def step(self) -> bool:
        """One round of work: close quiet series, segment one queued job, send what is due. True if
        anything happened."""
        changed = self.close_quiet_series()
        now = time.time()
        queued = [j for j in self.spool.jobs() if j.state == QUEUED and j.next_try <= now]
        if queued:
            self.segment(queued[0])
            changed = True
        now = time.time()
        for job in self.spool.jobs():
            if job.state == RESULTS and job.next_try <= now:
                changed = True
                if not self.send(job):
                    break  # the destination is not answering: the others wait for their own next try
        return changed

    # ---------------------------------------------------------------------- running

    def stop(self, *_) -> None:
        # Only a flag: a signal handler must not write to the log, whose stream the interrupted main thread
        # may be in the middle of writing (the line would be lost, or worse).
        self.stopping.set()

    def run(self) -> int:
        for note in self.spool.recover():
            log.info("spool: %s", note)
        if self.segmenter is None:
            self.segmenter = make_segmenter(self.config)
        log.info("model %s loaded (%s task, %s)", self.segmenter.package.name, self.config.task,
                 self.segmenter.device)
        previous = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start_server()
            log.info("%s listening on %s:%d%s; results to %s; accepting %s", self.config.ae_title, self.config.bind,
                     self.config.port, " (TLS)" if self.config.tls_certificate else "", self.config.destination,
                     ", ".join(map(str, self.config.allowed)))
            last_status = 0.0
            while not self.stopping.is_set():
                changed = self.step()
                if changed or time.time() - last_status > 5:
                    self.spool.write_status(self.running, self.started)
                    last_status = time.time()
                if not changed:
                    self.stopping.wait(0.2)
            log.info("stop asked for: the job in hand is finished; no new association is accepted")
        finally:
            if self.server is not None:
                self.server.shutdown()
            self.spool.write_status(None, self.started)
            for number, handler in previous.items():
                signal.signal(number, handler)
        log.info("stopped")
        return 0


def _uids(paths) -> dict[str, dict[str, str]]:
    from segcore.dicom.ct import read_header

    uids = {}
    for path in paths:
        header = read_header(path)
        uids[Path(path).name] = {"sop": str(header.SOPInstanceUID), "series": str(header.SeriesInstanceUID)}
    return uids


def _requestor(config: NodeConfig):
    from pynetdicom import AE
    from pynetdicom.sop_class import RTStructureSetStorage, SegmentationStorage, Verification

    ae = AE(ae_title=config.ae_title)
    for context in (RTStructureSetStorage, SegmentationStorage, Verification):
        ae.add_requested_context(context)
    ae.connection_timeout = 10  # a destination that drops packets must not hold the worker for minutes
    return ae


def _associate(config: NodeConfig):
    destination = config.destination
    context = config.ssl_context(server=False)
    assoc = _requestor(config).associate(destination.host, destination.port, ae_title=destination.ae_title,
                                         tls_args=(context, destination.host) if context else None)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise SegcoreError(f"no association with {destination} ({why})")
    return assoc


def deliver(config: NodeConfig, paths) -> None:
    """C-STORE every file to the destination in one association; any failure raises SegcoreError."""
    import pydicom

    assoc = _associate(config)
    try:
        for path in paths:
            try:
                status = assoc.send_c_store(pydicom.dcmread(str(path)))
            except (ValueError, RuntimeError, OSError) as error:  # e.g. the destination takes no DICOM SEG
                raise SegcoreError(f"{Path(path).name} could not be sent: {str(error).splitlines()[0]}") from None
            code = getattr(status, "Status", None)
            if code is None or code not in (0x0000, 0xB000, 0xB006, 0xB007):
                raise SegcoreError(f"{config.destination} answered {Path(path).name} with status "
                                   f"{'none' if code is None else hex(code)}")
    finally:
        if assoc.is_established:
            assoc.release()


def echo(config: NodeConfig) -> None:
    """C-ECHO the destination; a SegcoreError says why it failed."""
    assoc = _associate(config)
    try:
        status = assoc.send_c_echo()
        if getattr(status, "Status", None) != 0x0000:
            raise SegcoreError(f"{config.destination} did not answer the C-ECHO")
    finally:
        if assoc.is_established:
            assoc.release()


def check(config: NodeConfig, say) -> int:
    """`serve --check`: the spool, the model, TLS files and the destination (C-ECHO), one line each; 0 when
    all is well, else 1."""
    import ssl

    problems = 0

    def step(what: str, action) -> None:
        nonlocal problems
        try:
            say(f"ok: {what}: {action()}")
        except (SegcoreError, OSError, ssl.SSLError, RuntimeError) as error:
            problems += 1
            say(f"problem: {what}: {error}")

    def spool() -> str:
        Spool(config.spool, config.max_spool_bytes)
        probe = Path(config.spool) / "tmp" / ".write-test"
        probe.write_bytes(b"x")
        probe.unlink()
        return f"{config.spool} is writable"

    def model() -> str:
        segmenter = make_segmenter(config)
        return f"{segmenter.package.name} {segmenter.package.version} ({config.task}) on {segmenter.device}"

    step("spool", spool)
    step("model", model)
    if config.tls_certificate is not None:
        step("TLS", lambda: (config.ssl_context(server=True), "certificate and key load")[1])
    step(f"destination {config.destination}", lambda: (echo(config), "answers C-ECHO")[1])
    return 0 if problems == 0 else 1
