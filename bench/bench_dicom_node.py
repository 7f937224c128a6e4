"""Benchmark `prostateseg serve` (the DICOM node) end to end over real DICOM associations.

    python bench/bench_dicom_node.py [--task organs|prostate] [--repeat 3] [--concurrent 10] [--soak 100]
                                     [--concurrent-matrix 512|96] [--json FILE]

Three measurements, each with its own fresh node (`prostateseg serve --bind 127.0.0.1` on a free port), a
dcmtk `storescp` as the destination (its own free port, its own output folder) and dcmtk `storescu` as the
sender (calling AE STORESCU, the only one the node allows):

1. latency: the 512 x 512 x 150 benchmark series (`bench_common.make_dicom_case`) re-written `--repeat`
   times with new UIDs is sent with one storescu, one series at a time. From the job record in SPOOL/sent:
   latency = sent_at - received_last - quiet seconds (the time from the last instance received to the
   RT Structure Set delivered, the quiet period excluded), split into closing (queued_at - received_last
   - quiet: the worker's polling), segmenting (segmented_at - queued_at) and sending (sent_at -
   segmented_at). Also the time storescu took for the 150 instances. The RTSTRUCT must be in storescp's
   folder and reference the series sent. Median over the repeats.
2. throughput: `--concurrent` N distinct series sent at once by `--senders` storescu processes (N / senders
   series each, one association per process); wall time from the first send to the last RTSTRUCT written by
   storescp (its file's mtime), and series per minute. Every series must get exactly one RTSTRUCT that
   references it. `--concurrent-matrix 512` uses the 150-slice benchmark series (slow on 2 cores: about one
   segmentation at a time), `96` uses 96 x 96 phantoms (`make_phantom(seed, matrix=96)`, ~40 slices).
3. soak: `--soak` K small 96-matrix phantom series in batches of `--batch` (sent by up to `--senders`
   storescu processes, the next batch once the previous one is delivered) while the node's VmRSS is read from
   /proc/<pid>/status every second. Reported: RSS once 10 series are delivered (at that batch's end), at the end, the peak
   (and the kernel's VmHWM), and the slope in MB per 10 series over the second half (least squares over
   the RSS at each batch's end). All K must be delivered.

Test series are written by a child process of this script (the driver itself imports neither numpy nor
SimpleITK) under `--workdir` (default: prostateseg-bench in the system's temp folder); everything else lives
in a temporary folder that is removed at the end (`--keep` keeps it). Every process started is stopped in a
`finally` block (SIGTERM, then SIGKILL after a grace period), Ctrl-C included. The node's log is scanned for
WARNING / ERROR lines, and failed/ of its spool for series it could not segment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))

NODE_AET, SCP_AET, SCU_AET = "PROSTATESEG", "PLANNING", "STORESCU"


# ---------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def need_tool(name: str) -> str:
    """dcmtk's `name`: the virtual environment's bin folder (where pynetdicom installs Python apps of the same
    names) is skipped."""
    venv_bin = Path(sys.executable).parent.resolve()
    folders = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv_bin]
    path = shutil.which(name, path=os.pathsep.join(folders))
    if path is None:
        raise SystemExit(f"{name} (dcmtk) is not installed; this benchmark needs dcmtk's storescu and storescp")
    return path


def _terminated(*_):
    raise KeyboardInterrupt  # SIGTERM: the same clean-up as Ctrl-C


class Processes:
    """Every process the benchmark starts; `stop_all` ends each one by its own pid (TERM, then KILL)."""

    def __init__(self):
        self.started: list[tuple[str, subprocess.Popen, float]] = []

    def start(self, name: str, argv: list[str], log: Path, grace: float = 10.0) -> subprocess.Popen:
        with open(log, "ab") as handle:  # the child keeps its own descriptor
            # own session: Ctrl-C reaches only this driver, whose finally block then stops the children in order
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.started.append((name, proc, grace))
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        for entry in list(self.started):
            if entry[1] is proc:
                self._stop(*entry)
                self.started.remove(entry)

    @staticmethod
    def _stop(name: str, proc: subprocess.Popen, grace: float) -> None:
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"  ({name} pid {proc.pid} did not stop in {grace:.0f} s: killed)", file=sys.stderr)
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        while self.started:
            self._stop(*self.started.pop())


def series_uid_of(folder: Path) -> str:
    import pydicom

    first = next(iter(sorted(folder.glob("*.dcm"))))
    return str(pydicom.dcmread(str(first), stop_before_pixels=True).SeriesInstanceUID)


def write_series(specs: list[tuple[str, str, str]], dest: Path) -> list[Path]:
    """Write test series in a child process: each spec is (kind, source-or-seed, uid seed), kind 'copy' (the
    CT of folder `source` re-written with new UIDs) or 'phantom96' (make_phantom(int(seed), matrix=96)).
    Series already written are kept."""
    folders = [dest / f"{kind}-{uid_seed}" for kind, _, uid_seed in specs]
    todo = [(kind, src, uid_seed, str(folder)) for (kind, src, uid_seed), folder in zip(specs, folders)
            if not (folder / ".done").is_file()]
    if todo:
        subprocess.run([sys.executable, str(HERE), "--child-write", json.dumps(todo)], check=True)
    return folders


def child_write(todo: list[list[str]]) -> None:
    from segcore.dicom.ct import write_ct_series
    from segcore.image import read_image
    from segcore.phantom import make_phantom

    images = {}
    for kind, source, uid_seed, folder in todo:
        folder = Path(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if kind == "copy":
            if source not in images:
                images[source] = read_image(source)
            image = images[source]
        else:
            image = make_phantom(int(source), matrix=96).ct
        write_ct_series(image, folder, seed=uid_seed)
        (folder / ".done").write_text("")


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def median(values):
    return round(statistics.median(values), 3) if values else None


# ---------------------------------------------------------------------------------------------- the setup


class Setup:
    """One storescp destination and one node, in `root`; `stop()` ends both."""

    def __init__(self, procs: Processes, root: Path, args, quiet: float, name: str):
        self.procs, self.root, self.quiet, self.name = procs, root, quiet, name
        root.mkdir(parents=True)
        self.recv, self.spool = root / "recv", root / "spool"
        self.recv.mkdir()
        self.scp_port, self.node_port = free_port(), free_port()
        self.scp_log, self.node_log = root / "storescp.log", root / "node.log"
        self.scp = procs.start("storescp", [need_tool("storescp"), "-aet", SCP_AET, "-od", str(self.recv),
                                            "--fork" if args.scp_fork else "-v", str(self.scp_port)],
                               self.scp_log, grace=5)
        cli = str(Path(sys.executable).with_name("prostateseg"))
        self.node = procs.start("prostateseg serve", [
            cli, "serve", "--port", str(self.node_port), "--bind", "127.0.0.1", "--ae-title", NODE_AET,
            "--spool", str(self.spool), "--destination", f"{SCP_AET}@127.0.0.1:{self.scp_port}",
            "--allow", f"{SCU_AET}@127.0.0.1", "--quiet-seconds", str(quiet), "--task", args.task,
            "--device", args.device, *(["--model", args.model] if args.model else [])], self.node_log, grace=60)
        tick = time.perf_counter()
        while "listening on" not in self.node_log.read_text(errors="replace"):
            if self.node.poll() is not None:
                raise SystemExit(f"the node exited ({self.node.returncode}):\n{self.node_log.read_text()[-3000:]}")
            if time.perf_counter() - tick > 300:
                raise SystemExit("the node did not start listening within 300 s")
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - tick
        print(f"[{name}] node pid {self.node.pid} on 127.0.0.1:{self.node_port} ({args.task}, quiet {quiet} s) "
              f"ready in {self.startup_s:.1f} s; storescp on 127.0.0.1:{self.scp_port}", flush=True)

    def storescu(self, folders: list[Path], log_name: str) -> subprocess.Popen:
        files = [str(p) for folder in folders for p in sorted(folder.glob("*.dcm"))]
        return self.procs.start("storescu", [need_tool("storescu"), "-aet", SCU_AET, "-aec", NODE_AET,
                                             "127.0.0.1", str(self.node_port), *files],
                                self.root / log_name, grace=5)

    def sent_jobs(self) -> dict[str, dict]:
        """Delivered jobs by series UID (the last one when a series was sent twice)."""
        jobs = {}
        for path in sorted((self.spool / "sent").glob("*/job.json")):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written
            jobs[job["series_uid"]] = job
        return jobs

    def failed_jobs(self) -> list[dict]:
        found = []
        for path in sorted((self.spool / "failed").glob("*/job.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                pass
        return found

    def wait_delivered(self, uids: set[str], timeout: float) -> dict[str, dict]:
        tick = time.perf_counter()
        while True:
            sent = self.sent_jobs()
            failed = {j["series_uid"] for j in self.failed_jobs()}
            if uids <= set(sent) | failed:
                return {uid: sent[uid] for uid in uids if uid in sent}
            if self.node.poll() is not None:
                text = self.node_log.read_text(errors="replace")
                why = " after a SIGTERM/SIGINT from outside this script" if "stopping: finishing" in text else ""
                raise SystemExit(f"the node ended ({self.node.returncode}){why}; log:\n{text[-3000:]}")
            if time.perf_counter() - tick > timeout:
                missing = uids - set(sent) - failed
                print(f"  timeout after {timeout:.0f} s: {len(missing)} series neither sent nor failed", flush=True)
                return {uid: sent[uid] for uid in uids if uid in sent}
            time.sleep(0.2)

    def received(self) -> dict[str, list[tuple[Path, float]]]:
        """RT Structure Sets in storescp's folder by the series UID they reference: (file, its mtime)."""
        import pydicom

        by_series: dict[str, list[tuple[Path, float]]] = {}
        for path in sorted(self.recv.iterdir()):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            except Exception:  # noqa: BLE001, S112 - a file storescp is still writing, or not DICOM: skipped
                continue
            if ds.get("Modality") != "RTSTRUCT":
                continue
            try:
                ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
                uid = str(ref.RTReferencedSeriesSequence[0].SeriesInstanceUID)
            except (AttributeError, IndexError):
                uid = "?"
            by_series.setdefault(uid, []).append((path, path.stat().st_mtime))
        return by_series

    def log_problems(self) -> list[str]:
        lines = self.node_log.read_text(errors="replace").splitlines()
        return [line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]

    def stop(self) -> None:
        self.procs.stop(self.node)
        self.procs.stop(self.scp)


# ---------------------------------------------------------------------------------------------- the measurements


def run_latency(procs, tmp: Path, args, source: Path) -> dict:
    folders = write_series([("copy", str(source), f"nodelat{i}") for i in range(args.repeat)],
                           args.workdir / "node_series")
    setup = Setup(procs, tmp / "latency", args, args.quiet_seconds, "latency")
    rows = []
    try:
        for i, folder in enumerate(folders):
            uid = series_uid_of(folder)
            tick = time.time()
            scu = setup.storescu([folder], f"storescu-lat{i}.log")
            rc = scu.wait()
            send_end = time.time()
            if rc:
                print(f"  storescu exited {rc}: {(setup.root / f'storescu-lat{i}.log').read_text()[-1500:]}")
            job = setup.wait_delivered({uid}, args.timeout).get(uid)
            arrived = setup.received().get(uid, [])
            if job is None:
                rows.append({"series_uid": uid, "delivered": False})
                print(f"  repeat {i + 1}: series {uid} NOT delivered")
                continue
            row = {
                "series_uid": uid, "instances": job["instances"], "storescu_s": round(send_end - tick, 3),
                "latency_s": round(job["sent_at"] - job["received_last"] - args.quiet_seconds, 3),
                "close_delay_s": round(job["queued_at"] - job["received_last"] - args.quiet_seconds, 3),
                "segment_s": round(job["segmented_at"] - job["queued_at"], 3),
                "send_s": round(job["sent_at"] - job["segmented_at"], 3),
                "rtstruct_received": len(arrived),
                "after_storescu_end_s": round(max(m for _, m in arrived) - send_end - args.quiet_seconds, 3)
                if arrived else None,
                "delivered": True,
            }
            rows.append(row)
            print(f"  repeat {i + 1}: {row['instances']} instances sent in {row['storescu_s']:.2f} s; latency "
                  f"{row['latency_s']:.2f} s (close {row['close_delay_s']:.2f} + segment {row['segment_s']:.2f} + "
                  f"send {row['send_s']:.2f}); RTSTRUCT in storescp's folder: {len(arrived)}", flush=True)
    finally:
        problems = setup.log_problems()
        setup.stop()
    ok = [r for r in rows if r["delivered"]]
    summary = {key: median([r[key] for r in ok]) for key in
               ("storescu_s", "latency_s", "close_delay_s", "segment_s", "send_s")}
    return {"runs": rows, "median": summary, "node_startup_s": round(setup.startup_s, 2),
            "all_delivered": len(ok) == len(rows) and all(r["rtstruct_received"] == 1 for r in ok),
            "log_problems": problems}


def split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def run_throughput(procs, tmp: Path, args, source: Path) -> dict:
    n = args.concurrent
    if args.concurrent_matrix == 512:
        specs = [("copy", str(source), f"nodetp{i}") for i in range(n)]
    else:
        specs = [("phantom96", str(1000 + i), f"nodetp96-{i}") for i in range(n)]
    folders = write_series(specs, args.workdir / "node_series")
    uids = {series_uid_of(f): f for f in folders}
    setup = Setup(procs, tmp / "throughput", args, args.quiet_seconds, "throughput")
    try:
        tick = time.time()
        senders = [setup.storescu(group, f"storescu-tp{k}.log") for k, group in enumerate(split(folders, args.senders))]
        codes = [p.wait() for p in senders]
        send_end = time.time()
        jobs = setup.wait_delivered(set(uids), args.timeout)
        arrived = setup.received()
        last = max((m for uid in uids for _, m in arrived.get(uid, [])), default=None)
        failed = setup.failed_jobs()
    finally:
        problems = setup.log_problems()
        setup.stop()
    wall = last - tick if last else None
    own = sum(1 for uid in uids if len(arrived.get(uid, [])) == 1)
    strays = sorted(set(arrived) - set(uids))
    result = {
        "series": n, "matrix": args.concurrent_matrix, "senders": len(senders), "storescu_exit_codes": codes,
        "instances_per_series": [len(list(f.glob("*.dcm"))) for f in folders][:3],
        "send_wall_s": round(send_end - tick, 2), "wall_s": round(wall, 2) if wall else None,
        "series_per_minute": round(60 * len(jobs) / wall, 2) if wall else None,
        "delivered": len(jobs), "rtstruct_referencing_own_series": own,
        "rtstruct_stray_references": strays, "failed": [j.get("error") for j in failed],
        "segment_s_median": median([j["segmented_at"] - j["queued_at"] for j in jobs.values()]),
        "log_problems": problems,
    }
    print(f"  {n} series ({args.concurrent_matrix}-matrix) by {len(senders)} storescu: all sent in "
          f"{result['send_wall_s']} s; last RTSTRUCT after {result['wall_s']} s -> {result['series_per_minute']} "
          f"series/min; delivered {len(jobs)}/{n}, RTSTRUCTs referencing their own series {own}/{n}", flush=True)
    return result


def run_soak(procs, tmp: Path, args) -> dict:
    k = args.soak
    folders = write_series([("phantom96", str(2000 + i), f"nodesoak-{i}") for i in range(k)],
                           args.workdir / "node_series")
    uids = [series_uid_of(f) for f in folders]
    setup = Setup(procs, tmp / "soak", args, args.soak_quiet_seconds, "soak")
    samples: list[tuple[float, float, int]] = []  # (time, RSS MB, series delivered)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = rss_mb(setup.node.pid)
            if value is not None:
                samples.append((time.time(), value, len(list((setup.spool / "sent").iterdir()))))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    batch_ends: list[tuple[int, float]] = []  # (series delivered, RSS MB)
    delivered: dict[str, dict] = {}
    hwm = None
    tick = time.time()
    try:
        sampler.start()
        for start in range(0, k, args.batch):
            batch = list(range(start, min(k, start + args.batch)))
            groups = split([folders[i] for i in batch], args.senders)
            senders = [setup.storescu(g, f"storescu-soak{start}-{j}.log") for j, g in enumerate(groups)]
            for p in senders:
                p.wait()
            delivered.update(setup.wait_delivered({uids[i] for i in batch}, args.timeout))
            batch_ends.append((len(delivered), rss_mb(setup.node.pid) or float("nan")))
            print(f"  soak: {len(delivered)}/{k} delivered, RSS {batch_ends[-1][1]:.0f} MB "
                  f"({time.time() - tick:.0f} s)", flush=True)
        hwm = rss_mb(setup.node.pid, "VmHWM")
    finally:
        stop.set()
        sampler.join(5)
        problems = setup.log_problems()
        failed = setup.failed_jobs()
        setup.stop()
    first10 = next((rss for count, rss in batch_ends if count >= min(10, k)), None)  # at that batch's end
    half = [(c, r) for c, r in batch_ends if c >= k / 2]
    slope = None
    if len(half) >= 2:
        mx, my = statistics.fmean(c for c, _ in half), statistics.fmean(r for _, r in half)
        var = sum((c - mx) ** 2 for c, _ in half)
        slope = round(10 * sum((c - mx) * (r - my) for c, r in half) / var, 2) if var else None
    result = {
        "series": k, "batch": args.batch, "delivered": len(delivered), "failed": [j.get("error") for j in failed],
        "wall_s": round(time.time() - tick, 1), "rss_after_10_mb": round(first10, 1) if first10 else None,
        "rss_end_mb": round(batch_ends[-1][1], 1) if batch_ends else None,
        "rss_peak_sampled_mb": round(max(r for _, r, _ in samples), 1) if samples else None,
        "vm_hwm_mb": round(hwm, 1) if hwm else None, "slope_mb_per_10_series_second_half": slope,
        "rss_at_batch_ends": [(c, round(r, 1)) for c, r in batch_ends], "log_problems": problems,
    }
    print(f"  soak {k} series: delivered {len(delivered)}/{k}; RSS after 10: {result['rss_after_10_mb']} MB, "
          f"end {result['rss_end_mb']} MB, peak {result['rss_peak_sampled_mb']} MB (VmHWM {result['vm_hwm_mb']}); "
          f"slope over the second half {slope} MB / 10 series", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("organs", "prostate"), default="organs", help="the node's task")
    parser.add_argument("--model", help="model package (default: the task's bundled model)")
    parser.add_argument("--device", default="cpu", help="the node's device: cpu (default), cuda or auto")
    parser.add_argument("--seed", type=int, default=2, help="phantom seed of the 512 x 512 x 150 CT (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="latency runs, each a new series (default 3; 0 skips)")
    parser.add_argument("--quiet-seconds", type=float, default=1.0,
                        help="the node's quiet period for latency and throughput (default 1)")
    parser.add_argument("--concurrent", type=int, default=10, help="series sent at once (default 10; 0 skips)")
    parser.add_argument("--concurrent-matrix", type=int, choices=(512, 96), default=512,
                        help="512: the 150-slice benchmark series (default); 96: small phantoms")
    parser.add_argument("--senders", type=int, default=5, help="storescu processes sending at once (default 5)")
    parser.add_argument("--soak", type=int, default=100, help="small series in the soak (default 100; 0 skips)")
    parser.add_argument("--batch", type=int, default=10, help="soak series per batch (default 10)")
    parser.add_argument("--soak-quiet-seconds", type=float, default=0.5, help="quiet period in the soak (0.5)")
    parser.add_argument("--timeout", type=float, default=1800, help="longest wait for a delivery, s (1800)")
    parser.add_argument("--scp-fork", action="store_true", help="run storescp with --fork")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "prostateseg-bench")
    parser.add_argument("--keep", action="store_true", help="keep the spools, logs and received files")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child-write", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_write:
        child_write(json.loads(args.child_write))
        return 0
    print(f"storescu: {need_tool('storescu')}, storescp: {need_tool('storescp')}")
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"task": args.task, "device": args.device, "cpus": os.cpu_count(),
                     "load_average_start": os.getloadavg()}
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="bench-node-"))
    try:
        source = None
        if args.repeat or (args.concurrent and args.concurrent_matrix == 512):
            from bench_common import make_dicom_case

            source = make_dicom_case(args.workdir, args.seed)[0]
        if args.repeat:
            print(f"latency: {args.repeat} x 512x512x150 series, one at a time", flush=True)
            results["latency"] = run_latency(procs, tmp, args, source)
        if args.concurrent:
            print(f"throughput: {args.concurrent} series at once", flush=True)
            results["throughput"] = run_throughput(procs, tmp, args, source)
        if args.soak:
            print(f"soak: {args.soak} 96-matrix series in batches of {args.batch}", flush=True)
            results["soak"] = run_soak(procs, tmp, args)
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["load_average_end"] = os.getloadavg()
    for name in ("latency", "throughput", "soak"):
        if name in results and results[name]["log_problems"]:
            print(f"{name}: node log WARNING/ERROR lines:\n  " + "\n  ".join(results[name]["log_problems"][:20]))
    if "latency" in results:
        m = results["latency"]["median"]
        print(f"latency median: {m['latency_s']} s (close {m['close_delay_s']} + segment {m['segment_s']} + send "
              f"{m['send_s']}); storescu 150 instances {m['storescu_s']} s")
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
