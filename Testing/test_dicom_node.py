"""`prostateseg serve`, the DICOM node, driven by real DICOM tools on 127.0.0.1: dcmtk's storescu sends CT
series, storescp plays the planning system that receives the RT Structure Sets, echoscu checks the line.
The node runs as a real process (killed with SIGKILL, stopped with SIGTERM); every process a test starts is
stopped by the test."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from dicom_tools import dciodvfy_errors, require_tool

from segcore.cli import main
from segcore.dicom.ct import write_ct_series
from segcore.phantom import make_phantom

NODE_AET, PLANNING_AET, SENDER_AET = "PROSTATESEG", "PLANNING", "STORESCU"
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, process=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process ended with {process.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Planning:
    """storescp as the planning system: receives what the node sends into a folder."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([require_tool("storescp"), "-aet", PLANNING_AET, "-od", str(folder),
                                         str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def stop(self):
        self.process.kill()
        self.process.wait()


class NodeProcess:
    """`prostateseg serve` in its own process, its log in a file."""

    def __init__(self, spool: Path, destination_port: int, *extra: str, port: int | None = None):
        self.port, self.spool = port or free_port(), spool
        self.log_path = spool.parent / f"{spool.name}-{time.monotonic_ns()}.log"
        self.args = [sys.executable, "-m", "segcore.cli", "serve", "--port", str(self.port), "--bind", "127.0.0.1",
                     "--spool", str(spool), "--destination", f"{PLANNING_AET}@127.0.0.1:{destination_port}",
                     "--allow", f"{SENDER_AET}@127.0.0.1", "--quiet-seconds", "1", *extra]
        self.start()

    def start(self):
        self.log = open(self.log_path, "a")  # noqa: SIM115 - open while the process runs, closed by stop()
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: "listening on" in self.text(), 120, "the node to listen", self.process)

    def text(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.log.close()
        return code


def send(folder_or_files, port: int, *options: str, aet: str = SENDER_AET, check=True) -> subprocess.CompletedProcess:
    files = sorted(Path(folder_or_files).iterdir()) if isinstance(folder_or_files, Path) else folder_or_files
    return subprocess.run([require_tool("storescu"), *options, "-aet", aet, "-aec", NODE_AET, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, check=check, timeout=120)


def phantom_series(folder: Path, seed: int, matrix: int = 64) -> str:
    """A small phantom written as a DICOM CT series with file names in no slice order; its series UID."""
    case = make_phantom(seed, matrix=matrix, orientation="LPS", implant=False)
    write_ct_series(case.ct, folder, seed=f"node{seed}{folder.name}",
                    file_names=lambda k: f"{(k * 7919) % 10007:05d}")
    return str(pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID)


def sendable_copy(folder: Path, target: Path) -> Path:
    """The real CT series as its scanner wrote it (JPEG 2000 lossless), with the UIDs its anonymiser
    emptied put back as a PACS holds them: SOP Class and Instance UIDs from each file's meta information,
    one new Study and Series Instance UID (storescu cannot send without the first two, and the node
    refuses a series it could not reference). Pixel data and everything else are copied as they are."""
    target.mkdir(parents=True)
    study, series = (pydicom.uid.generate_uid(entropy_srcs=["real", kind]) for kind in ("study", "series"))
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(target / path.name)
    return target


def referenced_series(rtstruct: pydicom.Dataset) -> str:
    frame = rtstruct.ReferencedFrameOfReferenceSequence[0]
    return frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID


@pytest.fixture
def planning(tmp_path):
    receiver = Planning(tmp_path / "planning")
    yield receiver
    receiver.stop()


@pytest.fixture
def node(tmp_path, planning):
    process = NodeProcess(tmp_path / "spool", planning.port)
    yield process
    process.stop(signal.SIGKILL)


def test_a_series_in_an_rtstruct_out(tmp_path, planning, node, abdomen_dicom):
    """echo, refusal of an unknown caller, a phantom series and the real CT series (JPEG 2000) in, their
    RT Structure Sets out; a series sent twice gives two result sets with their own UIDs."""
    abdomen_dicom = sendable_copy(abdomen_dicom, tmp_path / "real")
    echo = require_tool("echoscu")
    line = ["-aec", NODE_AET, "127.0.0.1", str(node.port)]
    assert subprocess.run([echo, "-aet", SENDER_AET, *line], check=False).returncode == 0
    refused = subprocess.run([echo, "-aet", "INTRUDER", *line], check=False, capture_output=True)
    assert refused.returncode != 0
    assert "refused an association from INTRUDER@127.0.0.1: not on the allow list" in node.text()
    assert send(abdomen_dicom, node.port, "-xv", aet="INTRUDER", check=False).returncode != 0

    uid = phantom_series(tmp_path / "ct", seed=31)
    send(tmp_path / "ct", node.port)
    send(abdomen_dicom, node.port, "-xv")  # as stored: JPEG 2000 lossless
    results = wait_for(lambda: len(planning.received()) >= 2 and planning.received(), 120, "two results", node.process)
    real_uid = str(pydicom.dcmread(next(p for p in sorted(abdomen_dicom.iterdir()) if p.is_file())).SeriesInstanceUID)
    assert sorted(referenced_series(ds) for ds in results) == sorted([uid, real_uid])
    for ds in results:
        assert ds.Modality == "RTSTRUCT" and ds.StructureSetROISequence[0].ROIName == "Prostate"
    assert dciodvfy_errors(next(p for p in planning.folder.iterdir())) == []

    send(tmp_path / "ct", node.port)  # the same series again: a second sending, a second result set
    third = wait_for(lambda: len(planning.received()) >= 3 and planning.received(), 120, "a third result",
                     node.process)
    again = [ds for ds in third if referenced_series(ds) == uid]
    assert len(again) == 2 and again[0].SOPInstanceUID != again[1].SOPInstanceUID
    assert again[0].SeriesInstanceUID != again[1].SeriesInstanceUID
    status = wait_for(lambda: (s := json.loads((node.spool / "status.json").read_text()))["sent"] == 3 and s,
                      30, "the status file to say 3 sent")
    assert not status["queued"] and not status["to_send"] and not status["failed"]
    # once delivered, only the record stays (with the result UIDs): not the CT, not the results
    assert {p.name for p in (node.spool / "sent").rglob("*") if p.is_file()} == {"job.json"}
    record = json.loads(next((node.spool / "sent").rglob("job.json")).read_text())
    assert record["state"] == "sent" and record["result_uids"]["result_rtstruct.dcm"]["sop"]
    assert "Phantom" not in node.text()  # patients are named by UIDs only


def test_killed_while_segmenting_the_result_still_arrives(tmp_path, planning):
    """kill -9 in the middle of a case; started again, the node finishes it and the result arrives once."""
    node = NodeProcess(tmp_path / "spool", planning.port)
    try:
        uid = phantom_series(tmp_path / "ct", seed=32, matrix=128)
        send(tmp_path / "ct", node.port)
        wait_for(lambda: "segmenting series" in node.text(), 60, "segmenting to start", node.process)
        node.stop(signal.SIGKILL)
        assert not planning.received()
        node.start()
        (result,) = wait_for(planning.received, 120, "the result after the restart", node.process)
        assert referenced_series(result) == uid
        assert "job(s) to finish from before" in node.text()
    finally:
        node.stop(signal.SIGKILL)


def test_sigterm_finishes_the_case_in_hand(tmp_path, planning):
    node = NodeProcess(tmp_path / "spool", planning.port)
    phantom_series(tmp_path / "ct", seed=33, matrix=128)
    send(tmp_path / "ct", node.port)
    wait_for(lambda: "segmenting series" in node.text(), 60, "segmenting to start", node.process)
    assert node.stop(signal.SIGTERM) == 0
    log = node.text()
    assert "sent the results" in log and "stop asked for" in log and "stopped" in log, log
    assert log.index("segmenting series") < log.index("sent the results") < log.index("stop asked for")
    assert len(planning.received()) == 1


def test_ten_series_from_five_senders_at_once(tmp_path, planning):
    """Nothing lost under load: 10 series from 5 storescu processes at once give 10 result sets, each for
    its own series (a small random-weight model: this is about the node, not the model)."""
    from test_cli_segment import random_package

    package = random_package(tmp_path / "prostate-random")
    node = NodeProcess(tmp_path / "spool", planning.port, "--model", str(package.path), "--quiet-seconds", "2")
    folders, uids = [], []
    for n in range(10):
        folders.append(tmp_path / f"ct{n}")
        uids.append(phantom_series(folders[-1], seed=40 + n))
    senders = [subprocess.Popen([require_tool("storescu"), "-aet", SENDER_AET, "-aec", NODE_AET, "127.0.0.1",
                                 str(node.port), *map(str, sorted(folders[2 * i].iterdir())),
                                 *map(str, sorted(folders[2 * i + 1].iterdir()))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(5)]
    assert [p.wait(120) for p in senders] == [0] * 5
    try:
        results = wait_for(lambda: len(planning.received()) >= 10 and planning.received(), 300, "ten results",
                           node.process)
        assert sorted(referenced_series(ds) for ds in results) == sorted(uids)
    finally:
        node.stop(signal.SIGKILL)


def test_limits_and_bad_objects_refused_without_harm(tmp_path, planning):
    """A full spool refuses instances (out of resources) and recovers; a malformed instance and a non-CT
    object are refused; the node goes on."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage

    node = NodeProcess(tmp_path / "spool", planning.port, "--max-spool-gb", "0.00002")  # about 21 kB
    try:
        phantom_series(tmp_path / "ct", seed=34)
        refused = send(tmp_path / "ct", node.port, check=False)
        assert "spool is full" in node.text() and refused.returncode != 0 or "0xa700" in refused.stderr.lower()
        ae = AE(ae_title=SENDER_AET)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_established
        broken = pydicom.dcmread(next((tmp_path / "ct").iterdir()))
        del broken.SeriesInstanceUID
        assert assoc.send_c_store(broken).Status == 0xC210  # cannot understand
        with pytest.warns(UserWarning, match="Invalid value for VR UI"):  # pydicom knows it is wrong too
            broken.SeriesInstanceUID = ".."  # would name a folder above the series folders
        assert assoc.send_c_store(broken).Status == 0xC210
        assoc.release()
        # a caller not on the allow list gets a real A-ASSOCIATE-RJ, not a dropped connection
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(CTImageStorage)
        refused = intruder.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert refused.is_rejected and not refused.is_established
        # only CT images: an RT Structure Set is not even negotiated
        ae = AE(ae_title=SENDER_AET)
        ae.add_requested_context(RTStructureSetStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert not assoc.accepted_contexts
        if assoc.is_established:
            assoc.release()
        assert node.process.poll() is None
    finally:
        node.stop(signal.SIGKILL)
    node = NodeProcess(tmp_path / "spool2", planning.port, "--max-instance-mb", "0.001")  # about 1 kB
    try:
        refused = send(tmp_path / "ct", node.port, check=False)
        assert refused.returncode != 0 and "over the 0 MB limit" in node.text()
        assert node.process.poll() is None
    finally:
        node.stop(signal.SIGKILL)


def test_check_and_configuration_errors(tmp_path, planning, capsys):
    spool = tmp_path / "spool"
    good = ["serve", "--spool", str(spool), "--destination", f"{PLANNING_AET}@127.0.0.1:{planning.port}", "--check"]
    assert main(good) == 0
    out = capsys.readouterr().out
    assert "ok: destination PLANNING@127.0.0.1" in out and "ok: model" in out
    closed = ["serve", "--spool", str(spool), "--destination", f"{PLANNING_AET}@127.0.0.1:{free_port()}", "--check"]
    assert main(closed) == 1
    assert "problem: destination" in capsys.readouterr().out
    assert main(["serve", "--spool", str(spool), "--destination", "PLANNING:104"]) == 1
    assert "write it as AET@HOST:PORT" in capsys.readouterr().err
    assert main(["serve", "--spool", str(spool), "--destination", "P@h:1", "--formats", "nii.gz"]) == 1
    assert "a node sends rtstruct and/or dicom-seg" in capsys.readouterr().err
    names = tmp_path / "names.yaml"
    names.write_text("Prostata: Prostate_AI\n")  # a typo: refused at start, not after every series
    assert main(["serve", "--spool", str(spool), "--destination", "P@h:1", "--names", str(names)]) == 1
    assert "not a structure we write" in capsys.readouterr().err
    assert os.path.isdir(spool)


def test_tls_only_for_callers_with_a_certificate(tmp_path, planning):
    """With --tls-cert/--tls-key/--tls-ca the node speaks TLS and accepts only callers whose certificate
    the CA signed; a plain connection or a TLS caller without a certificate gets no association."""
    import ssl

    import trustme
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("storescu.example")
    files = {}
    for name, blob in (("ca.pem", ca.cert_pem), ("node.pem", server.cert_chain_pems[0]),
                       ("node.key", server.private_key_pem)):
        blob.write_to_path(str(tmp_path / name))
        files[name] = str(tmp_path / name)
    node = NodeProcess(tmp_path / "spool", planning.port, "--tls-cert", files["node.pem"], "--tls-key",
                       files["node.key"], "--tls-ca", files["ca.pem"])
    try:
        def echo(context):
            ae = AE(ae_title=SENDER_AET)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET,
                                 tls_args=(context, "127.0.0.1") if context else None)
            ok = assoc.is_established and assoc.send_c_echo().Status == 0
            if assoc.is_established:
                assoc.release()
            return ok

        with_certificate = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca.configure_trust(with_certificate)
        client.configure_cert(with_certificate)
        assert echo(with_certificate)
        without_certificate = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca.configure_trust(without_certificate)
        assert not echo(without_certificate)
        assert not echo(None)
        assert "(TLS)" in node.text() and node.process.poll() is None
    finally:
        node.stop(signal.SIGKILL)

    # --tls-destination: results go over TLS too; dcmtk's storescp with TLS as the planning system
    planning_cert = ca.issue_cert("127.0.0.1")
    planning_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "planning.pem"))
    planning_cert.private_key_pem.write_to_path(str(tmp_path / "planning.key"))
    port = free_port()
    secure = subprocess.Popen([require_tool("storescp"), "+tls", str(tmp_path / "planning.key"),
                               str(tmp_path / "planning.pem"), "+cf", files["ca.pem"], "-aet", PLANNING_AET,
                               "-od", str(tmp_path), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        check = [sys.executable, "-m", "segcore.cli", "serve", "--spool", str(tmp_path / "spool"), "--destination",
                 f"{PLANNING_AET}@127.0.0.1:{port}", "--tls-cert", files["node.pem"], "--tls-key", files["node.key"],
                 "--tls-ca", files["ca.pem"], "--check"]
        over_tls = subprocess.run([*check, "--tls-destination"], capture_output=True, text=True, check=False)
        assert over_tls.returncode == 0 and "answers C-ECHO" in over_tls.stdout
        plain = subprocess.run(check, capture_output=True, text=True, check=False)
        assert plain.returncode == 1 and "problem: destination" in plain.stdout
    finally:
        secure.kill()
        secure.wait()


def test_spool_recovers_whatever_a_kill_left(tmp_path):
    """The spool alone (no network): partial writes are dropped, a series moved to jobs/ before its record
    was written becomes a queued job, a job killed while being filed away is filed, every sending of a
    series is its own job, and the size it counts matches the files."""
    from segcore.node.spool import QUEUED, SENT, Spool

    spool = Spool(tmp_path, 1 << 30)
    assert spool.store("1.2.3", "1.2.3.1", b"a" * 100, "CT1") and not spool.store("1.2.3", "1.2.3.2", b"b" * 50, "CT1")
    assert spool.quiet_series(60) == []
    first = spool.close_series(spool.quiet_series(0, now=time.time() + 1)[0])
    assert (first.series_uid, first.instances, first.calling_ae, first.state) == ("1.2.3", 2, "CT1", QUEUED)
    assert spool.store("1.2.3", "1.2.3.1", b"a" * 100, "CT1")  # sent again: a new sending
    second = spool.close_series(spool.quiet_series(0, now=time.time() + 1)[0])
    assert second.job != first.job

    (tmp_path / "tmp" / "half-written.dcm").write_bytes(b"x")
    (tmp_path / "jobs" / second.job / "job.json").unlink()  # killed between the move and the record
    first.state = SENT
    spool.save(first)  # killed while filing a delivered job away
    counted = spool.size
    again = Spool(tmp_path, 1 << 30)
    notes = again.recover()
    assert any("unacknowledged" in n for n in notes) and any("recovered a series" in n for n in notes)
    assert [j.job for j in again.jobs()] == [second.job] and again.jobs()[0].state == QUEUED
    assert (tmp_path / "sent" / first.job).is_dir() and not list((tmp_path / "tmp").iterdir())
    assert again.size == sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) >= counted - 200
    job = again.jobs()[0]
    job.state = SENT
    again.finish(job)
    # the CT's bytes are freed; what is left is the records (rewritten job.json files are not recounted)
    left = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert 0 <= again.size and abs(again.size - left) < 2000 and left < 3000
