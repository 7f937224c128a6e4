"""Segmenting a batch on a Dask cluster: ``prostateseg segment|organs ... --workers N`` or ``--scheduler ADDRESS``.

The batch is planned exactly as a serial one (`segcore.batch.plan_batch`: the
same checks, output names, refusals and `resume`). Each input is one task. A
worker process loads the model once and keeps it for its next tasks, segments,
and writes the input's result set into the output folder itself, with the same
transaction as a serial run (on a real cluster the output folder lies on a
file system every node mounts). It sends back only a small record; this
process appends the manifest line as each record arrives, so the manifest is
written by one process and never interleaved.

A worker that dies (killed, out of memory) loses only the case it was running:
this process keeps one task per worker thread in flight, so no worker holds a
queue of cases; a local scheduler is told to give up on a task at the first
death (``allowed-failures`` 0), and this process sends the case again, once; a
case whose worker dies twice is recorded as failed and the batch goes on. An
existing scheduler keeps its own settings (with Dask's default a task may kill
several workers before the scheduler gives up on it). Ctrl-C or SIGTERM cancels what is
left, stops a local cluster, and then finishes or removes whatever result set
a stopped worker was writing, so each input's outputs are complete or absent.

Dask is optional: ``pip install "prostateseg[cluster]"``.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from segcore.anatomy import Structure
from segcore.batch import (
    BatchItem,
    BatchPlan,
    BatchProgress,
    ModelId,
    clear_leftovers,
    close_output_folder,
    input_key,
    model_of,
    open_output_folder,
    plan_batch,
    record,
    resume_model,
    segment_one,
    where_it_ran,
)
from segcore.errors import SegcoreError

INSTALL_HINT = ('--workers and --scheduler need Dask, which is not installed: pip install "prostateseg[cluster]" '
                '(in a checkout: pip install -e ".[cluster]")')
# Sent again once after its worker died; a second death marks the case failed.
RETRIES = 1


def import_distributed():
    """Dask's distributed scheduler, or a SegcoreError saying how to install it."""
    try:
        import distributed
    except ImportError as error:
        raise SegcoreError(INSTALL_HINT) from error
    return distributed


# --------------------------------------------------------------------------- on a worker


def dask_setup(worker) -> None:
    """Run by each worker of a local cluster as it starts (Dask's preload): Ctrl-C in the terminal reaches
    the whole process group, but the workers are this process's to stop, after it has cancelled the
    tasks, not in the middle of writing a case."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


_loaded: dict[bytes, object] = {}   # this worker process's segmenters, by their pickled factory
_loading = threading.Lock()


def loaded_segmenter(factory: Callable) -> tuple[object, float]:
    """The worker's segmenter made by `factory`, loaded at the first call; the seconds spent loading it now."""
    import time

    key = pickle.dumps(factory)
    with _loading:
        if key in _loaded:
            return _loaded[key], 0.0
        tick = time.perf_counter()
        _loaded[key] = factory()
        return _loaded[key], time.perf_counter() - tick


def share_of_cores(threads_in_host: int) -> int:
    """A worker thread's share of its host's cores, when `threads_in_host` worker threads run there."""
    from segcore.pipeline import available_cores

    return max(1, available_cores() // max(1, threads_in_host))


def use_share_of_cores(threads_in_host: int) -> None:
    """Give torch this task's share of the cores. Set at every task: torch's setting (OpenMP's) belongs to
    the thread that makes it, and Dask may run the next task on a new thread, which starts from
    OMP_NUM_THREADS (1 in a Dask worker)."""
    import torch

    torch.set_num_threads(share_of_cores(threads_in_host))


def report_stamp(plan: BatchPlan, stem: str) -> int | None:
    """When the report of `stem` was last written (None: there is none)."""
    try:
        return (plan.output_dir / f"{stem}.json").stat().st_mtime_ns
    except OSError:
        return None


def written_in_this_batch(plan: BatchPlan, stem: str, path: Path, model: ModelId, stamp: int | None):
    """The item of an input whose result set this batch has already written (its report changed since
    `stamp`, names this input and model version, and its outputs are all there), else None. A finished
    task's record lives in its worker's memory until this process fetches it: when the worker dies first,
    Dask runs the task again, and this tells that the work is done."""
    facts = plan.report(stem)
    outputs = [plan.output_dir / name for name in facts.get("outputs") or [] if isinstance(name, str)]
    ours = plan.reported_input(stem) == input_key(path) and (facts.get("model"), facts.get("model_version")) == tuple(model)
    if report_stamp(plan, stem) == stamp or not ours or not outputs or not all(p.is_file() for p in outputs):
        return None
    return BatchItem(path, outputs=outputs)


def segment_on_worker(factory: Callable, model: ModelId, plan: BatchPlan, path: Path, problem: str | None,
                      stem: str, stamp: int | None, threads_in_host: dict[str, int]) -> BatchItem:
    """One task: segment one input with the worker's model and write its result set; the item goes back
    without its label map. Done already in this batch (`written_in_this_batch`): that item."""
    import distributed

    worker = distributed.get_worker()
    item = written_in_this_batch(plan, stem, path, model, stamp) or BatchItem(path)
    item.where = {**where_it_ran(), "worker": worker.address}
    if item.outputs:
        return item
    use_share_of_cores(threads_in_host.get(worker.address, 1))
    try:
        segmenter, load_seconds = loaded_segmenter(factory)
    except SegcoreError as error:
        item.error = f"{item.where['host']} could not load the model: {error}"
        return item
    if model_of(segmenter) != tuple(model):
        item.error = (f"{item.where['host']} has model {' '.join(model_of(segmenter))}, but the batch uses "
                      f"{' '.join(model)}; install the same model package on every worker")
        return item
    done = segment_one(segmenter, segmenter.structures, plan, path, problem, stem, lambda *_: None)
    done.where, done.seconds["model_load"] = item.where, load_seconds
    if done.result is not None:
        done.result = replace(done.result, labelmap=None, contours={})
    return done


# --------------------------------------------------------------------------- on the client


@contextmanager
def cluster_client(workers: int | None, scheduler: str | None) -> Iterator[object]:
    """A Dask client: of a new local cluster of `workers` processes (one thread each), or of the cluster
    whose scheduler is at `scheduler`. Closed (a local cluster stopped) on the way out."""
    distributed = import_distributed()
    import dask

    # A local cluster gives up on a task at the first worker death (we send it again ourselves), and its
    # processes keep their log notes to themselves: they would break into the progress bar.
    # The workers' environment: the libraries' own thread pools (BLAS...) get the workers' share of the
    # cores, and Dask's MALLOC_TRIM_THRESHOLD_ is left out: it makes glibc map and unmap every large
    # array, which costs our pipeline half as much time again (bench/bench_cluster.py).
    local = {"distributed.scheduler.allowed-failures": 0, "distributed.logging.distributed": "critical",
             "distributed.nanny.pre-spawn-environ": {name: share_of_cores(workers or 1) for name in
                                                     ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    log = logging.getLogger("distributed")
    level, cluster = log.level, None
    log.setLevel(logging.CRITICAL)
    with dask.config.set(local if scheduler is None else {}):
        try:
            if scheduler is None:
                # silence_logs: the worker processes' notes too (a heartbeat that finds the scheduler gone
                # after Ctrl-C would print its traceback in the terminal)
                cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                   dashboard_address=None, preload=[__name__],
                                                   silence_logs=logging.CRITICAL)
            client = distributed.Client(cluster or scheduler, timeout="10s", set_as_default=False)
        except (OSError, TimeoutError) as error:
            if cluster is not None:
                cluster.close()
            raise SegcoreError(f"cannot reach the Dask scheduler at {scheduler}: {error}; start one with "
                               "`dask scheduler` and workers with `dask worker ADDRESS`") from error
        try:
            yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
            log.setLevel(level)


def cluster_threads(client) -> tuple[int, dict[str, int]]:
    """The cluster's worker threads in all, and for each worker how many threads all the workers on its
    host run together (each worker gives torch its host's cores divided by that number)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    per_host = Counter()
    for info in workers.values():
        per_host[info["host"]] += int(info.get("nthreads", 1))
    return sum(per_host.values()), {address: per_host[info["host"]] for address, info in workers.items()}


def segment_files_on_cluster(factory: Callable, structures: Sequence[Structure], paths, output_dir,
                             formats: Sequence[str] = ("seg.nrrd",), *, model: ModelId,
                             workers: int | None = None, scheduler: str | None = None, overwrite: bool = False,
                             roi_names: dict[str, str] | None = None, resume: bool = False,
                             progress: BatchProgress | None = None,
                             on_item: Callable[[BatchItem], None] | None = None) -> list[BatchItem]:
    """`segcore.batch.segment_files` on a Dask cluster: a local one of `workers` processes, or the one whose
    scheduler is at `scheduler`. `factory()` makes the segmenter on each worker (it must pickle: e.g.
    ``functools.partial(ProstateSegmenter, model, device)``); `model` is its package's (name, version),
    which every worker must have. Each finished item (in the order they finish) goes to `on_item` and to
    the manifest. The items, in the order they finished."""
    if scheduler is None and (workers is None or workers < 1):
        raise SegcoreError(f"--workers must be 1 or more, not {workers}")
    plan = plan_batch(paths, output_dir, formats, overwrite=overwrite, roi_names=roi_names,
                      resume=resume_model(resume, model))
    if not plan.inputs:
        return []
    created = open_output_folder(plan)
    items: list[BatchItem] = []
    try:
        with cluster_client(workers, scheduler) as client:
            _run_tasks(client, factory, plan, model, items, progress, on_item)
    finally:
        if plan.output_dir.is_dir():
            clear_leftovers(plan)  # what a stopped worker was writing
        close_output_folder(plan, created, items)
    return items


def _run_tasks(client, factory, plan: BatchPlan, model: ModelId, items: list, progress, on_item) -> None:
    """Keep one task per worker thread in flight (so that a dying worker holds no queued case besides
    the one it runs; Dask would otherwise hand out short task lists up front), collect each as it
    finishes, and send a case whose worker died once more, ahead of the rest."""
    from distributed import as_completed

    report = progress or (lambda done, total, name, message: None)
    task_plan = replace(plan, inputs=[], stems=[], skipped=[])  # what writing a case needs, kept small
    total = len(plan.inputs)
    stamps = [report_stamp(plan, stem) for stem in plan.stems]
    waiting = deque((n, 1) for n in range(total))
    pending = {}
    tasks = as_completed(loop=client.loop)

    def fill():
        threads, shares = cluster_threads(client)  # workers may come and go (an adaptive cluster)
        while waiting and len(pending) < max(1, threads):
            n, attempt = waiting.popleft()
            path, problem = plan.inputs[n]
            future = client.submit(segment_on_worker, factory, model, task_plan, Path(input_key(path)), problem,
                                   plan.stems[n], stamps[n], shares, pure=False,
                                   key=f"segment-{plan.stems[n]}-{os.urandom(6).hex()}")
            pending[future] = (n, attempt)
            tasks.add(future)

    try:
        fill()
        for future in tasks:
            n, attempt = pending.pop(future)
            item = _collect(future, plan, n, model, stamps[n], attempt)
            if item is None:
                waiting.appendleft((n, attempt + 1))
            else:
                record(plan, item, model)
                items.append(item)
                report(len(items), total, item.input.name, "done" if item.ok else "failed")
                if on_item is not None:
                    on_item(item)
            fill()
    finally:
        client.cancel(list(pending), force=True)


def _collect(future, plan: BatchPlan, n: int, model: ModelId, stamp: int | None, attempt: int) -> BatchItem | None:
    """The item of a finished task; None when its worker died first and the case should be sent again. A
    failure to write (full disk, read-only folder) stops the batch, as in a serial run."""
    path, stem = plan.inputs[n][0], plan.stems[n]
    try:
        item = future.result()
    except SegcoreError:
        raise
    except Exception as error:  # noqa: BLE001 - the worker died or was lost, or the task broke
        item = written_in_this_batch(plan, stem, path, model, stamp)  # it died after the work was done
        if item is None and attempt <= RETRIES:
            return None
        what = "its worker died" if type(error).__name__ == "KilledWorker" else f"{type(error).__name__}: {error}"
        item = item or BatchItem(path, error=f"failed {attempt} times ({what}); the batch went on")
    item.input, item.attempts = path, attempt
    return item
