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
the scheduler is told to give up on a task at the first death
(``allowed-failures`` 0, and ``worker-saturation`` 1.0 so that a worker holds
no queued task besides the one it runs), and this process sends the case again,
once; a case whose worker dies twice is recorded as failed and the batch goes
on. An existing scheduler keeps its own settings (Dask's default lets a task
kill three workers before it gives up). Ctrl-C or SIGTERM cancels what is
left, stops a local cluster, and then finishes or removes whatever result set
a stopped worker was writing, so each input's outputs are complete or absent.

Dask is optional: ``pip install "prostateseg[cluster]"``.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections import Counter
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

_loaded: dict[bytes, object] = {}   # this worker process's segmenters, by their pickled factory
_loading = threading.Lock()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loaded_segmenter(factory: Callable, share: int) -> tuple[object, float]:
    """The worker's segmenter made by `factory`, loaded at the first call (with this process's share of
    the host's cores as torch threads: cores / `share`); the seconds spent loading it now."""
    import time

    import torch

    key = pickle.dumps(factory)
    with _loading:
        if key in _loaded:
            return _loaded[key], 0.0
        tick = time.perf_counter()
        segmenter = factory()
        torch.set_num_threads(max(1, available_cores() // max(1, share)))
        _loaded[key] = segmenter
        return segmenter, time.perf_counter() - tick


def segment_on_worker(factory: Callable, model: ModelId, plan: BatchPlan, path: Path, problem: str | None,
                      stem: str, threads_in_host: dict[str, int]) -> BatchItem:
    """One task: segment one input with the worker's model and write its result set; the item goes back
    without its label map."""
    import distributed

    worker = distributed.get_worker()
    item = BatchItem(path, where={**where_it_ran(), "worker": worker.address})
    try:
        segmenter, load_seconds = loaded_segmenter(factory, threads_in_host.get(worker.address, 1))
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

    quiet = {"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 1.0,
             "distributed.logging.distributed": "critical"}
    logging.getLogger("distributed").setLevel(logging.CRITICAL)  # its notes would break into the progress bar
    cluster = None
    with dask.config.set(quiet if scheduler is None else {}):
        try:
            if scheduler is None:
                if workers < 1:
                    raise SegcoreError(f"--workers must be at least 1, not {workers}")
                cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                   dashboard_address=None)
            client = distributed.Client(cluster or scheduler, timeout="30s", set_as_default=False)
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


def threads_in_host(client) -> dict[str, int]:
    """For each worker, how many threads all the workers on its host run together: each worker gives torch
    its host's cores divided by that number."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    per_host = Counter()
    for info in workers.values():
        per_host[info["host"]] += int(info.get("nthreads", 1))
    return {address: per_host[info["host"]] for address, info in workers.items()}


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
    from distributed import as_completed

    report = progress or (lambda done, total, name, message: None)
    shares = threads_in_host(client)
    task_plan = replace(plan, inputs=[], stems=[], skipped=[])  # what writing a case needs, kept small
    total = len(plan.inputs)
    pending = {}

    def submit(n: int, attempt: int):
        path, problem = plan.inputs[n]
        future = client.submit(segment_on_worker, factory, model, task_plan, Path(input_key(path)), problem,
                               plan.stems[n], shares, pure=False, key=f"segment-{plan.stems[n]}-{os.urandom(6).hex()}")
        pending[future] = (n, attempt)
        return future

    tasks = as_completed([submit(n, 1) for n in range(total)], loop=client.loop)
    try:
        for future in tasks:
            n, attempt = pending.pop(future)
            item = _finished(future, plan.inputs[n][0], attempt)
            if item is None:
                tasks.add(submit(n, attempt + 1))
                continue
            record(plan, item, model)
            items.append(item)
            report(len(items), total, item.input.name, "done" if item.ok else "failed")
            if on_item is not None:
                on_item(item)
    finally:
        client.cancel(list(pending), force=True)


def _finished(future, path: Path, attempt: int) -> BatchItem | None:
    """The item of a finished task; None when its worker died and the case should be sent again. A failure
    to write (full disk, read-only folder) stops the batch, as in a serial run."""
    try:
        item = future.result()
    except SegcoreError:
        raise
    except Exception as error:  # noqa: BLE001 - the worker died or was lost, or the task broke: try once more
        if attempt <= RETRIES:
            return None
        what = "its worker died" if type(error).__name__ == "KilledWorker" else f"{type(error).__name__}: {error}"
        item = BatchItem(path, error=f"failed {attempt} times ({what}); the batch went on")
    item.input, item.attempts = path, attempt
    return item
