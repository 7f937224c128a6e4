"""Training on several processes with torchrun: DistributedDataParallel (DDP), one concept in one place.

    torchrun --nproc_per_node=2 -m training.train_prostate --config ...
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m training.train_hmrnet --config ...

torchrun starts one process per device and tells each its place in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``); `start` reads it. When ``WORLD_SIZE`` is unset or 1, nothing here does
anything: a plain ``python -m training...`` run is exactly the single-process run.

With several processes:
- the process group uses NCCL when the device is CUDA (each process on ``cuda:LOCAL_RANK``) and gloo
  on the CPU;
- every rank builds the same seeded network and loads the same checkpoint (``--resume``); DDP also
  broadcasts rank 0's weights when it wraps the network (`wrap`), and averages the gradients of every
  step, so the ranks stay identical; buffers (batch-norm statistics) are broadcast from rank 0 after
  each epoch or validation (`sync_buffers`);
- each step's batch is the single-process batch, split between the ranks (`share`): the union of the
  ranks' shares is exactly the single-process batch, so ``batch_size``, the iterations per epoch and
  the learning-rate schedule mean what they mean in a single process (each process runs about
  ``batch_size / WORLD_SIZE`` patches a step);
- rank 0 alone prepares the case cache first (`main_first`), validates, logs, writes log.csv,
  curves.png, TensorBoard, checkpoints and the package; the others wait at barriers;
- at the end every rank reports a sha256 of its weights and all must agree (`check_weights`).

Timeouts: a rank that waits for another (a barrier while rank 0 validates or exports, a collective in
a step) gives up after ``PROSTATESEG_DDP_TIMEOUT_MINUTES`` (default 60) minutes with an error instead
of hanging; raise it when rank 0's preparation of the cases, a validation or the export takes longer. torchrun also stops the other
ranks as soon as one fails.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from segcore.errors import SegcoreError

TIMEOUT_VARIABLE = "PROSTATESEG_DDP_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 60.0


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (size 1: a single process)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_world = World()


def world() -> World:
    return _world


def is_main() -> bool:
    """Whether this process writes the run's files and logs (always, in a single process)."""
    return _world.main


def from_environment(environ=None) -> World:
    """The world torchrun describes in ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (a single process when
    they are unset)."""
    environ = os.environ if environ is None else environ
    try:
        size = int(environ.get("WORLD_SIZE", "1") or 1)
        rank = int(environ.get("RANK", "0") or 0)
        local_rank = int(environ.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError as error:
        raise SegcoreError(f"WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers ({error})") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise SegcoreError(f"RANK {rank} is not within WORLD_SIZE {size}")
    return World(size, rank, local_rank)


def timeout() -> datetime.timedelta:
    """How long a rank waits for the others at a barrier or collective."""
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        minutes = float(text) if text else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        raise SegcoreError(f"{TIMEOUT_VARIABLE} must be a number of minutes, not {text!r}") from None
    return datetime.timedelta(minutes=minutes)


def start(device):
    """Join the process group torchrun describes (nothing for a single process); the device this rank
    trains on: ``cuda:LOCAL_RANK`` on GPUs, else ``device`` itself."""
    global _world
    import torch
    import torch.distributed as dist

    world_now = from_environment()
    if not world_now.distributed:
        return device
    if dist.is_initialized():
        raise SegcoreError("a distributed training run is already going on in this process")
    if device.type == "cuda":
        if world_now.local_rank >= torch.cuda.device_count():
            raise SegcoreError(f"LOCAL_RANK {world_now.local_rank} has no GPU: this machine has "
                               f"{torch.cuda.device_count()}; start at most that many processes per node")
        device = torch.device("cuda", world_now.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout(), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout())
    _world = world_now
    return device


def stop(finished: bool = False) -> None:
    """Leave the process group (also after an error); nothing when none was joined. ``finished``: the run
    ended well, so wait for the others first, so that no rank leaves while another still talks to it."""
    global _world
    if finished and _world.distributed:
        barrier()
    _world = World()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # The DDP wrappers (their reducers hold the process group) go first, and with the barrier above
        # this stopped the occasional "terminate called without an active exception" abort at exit seen
        # without them (a group torn down only at the interpreter's exit, it seems).
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank is here (at most `timeout`); nothing in a single process."""
    if not _world.distributed:
        return
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def main_first(make: Callable):
    """``make()`` on rank 0 first, then (after a barrier) on the other ranks: rank 0 fills the cache of
    prepared cases, the others read it. On several machines, put the cache on a shared folder (without
    one, every rank of another machine prepares its own cases)."""
    if not _world.distributed:
        return make()
    result = make() if _world.main else None
    barrier()
    return result if _world.main else make()


def share(batch, rank: int | None = None, size: int | None = None):
    """This rank's part of one step's batch (a sequence of indices or picks): contiguous parts whose sizes
    differ by at most one and whose union, in rank order, is the whole batch. The whole batch in a single
    process."""
    rank = _world.rank if rank is None else rank
    size = _world.size if size is None else size
    n = len(batch)
    return batch[n * rank // size: n * (rank + 1) // size]


def share_weight(part: int, whole: int) -> float:
    """The factor on a rank's mean loss over its ``part`` of a ``whole`` batch, so that DDP's average of
    the ranks' gradients is the gradient of the mean over the whole batch (1 when the parts are equal)."""
    return part * _world.size / whole if _world.distributed else 1.0


def check_batch(smallest_batch: int, what: str) -> None:
    """Refuse a schedule whose smallest batch cannot give every rank at least one sample."""
    if _world.distributed and smallest_batch < _world.size:
        raise SegcoreError(f"{what}: a batch of {smallest_batch} cannot be shared between {_world.size} "
                           "processes; use a larger batch_size (or fewer processes)")


def rank_seed(*seed: int) -> list[int] | None:
    """The extra seed words of this rank's augmentation: None in a single process (which keeps the
    single-process random streams), else the rank."""
    return [*seed, 7919, _world.rank] if _world.distributed else None


def wrap(network, device, find_unused: bool = False):
    """``network`` in DistributedDataParallel (it broadcasts rank 0's weights now and averages gradients
    in every backward); the network itself in a single process. ``find_unused`` where some parameters
    take no part in some steps (HF-UNet's cold start freezes its contour branch)."""
    if not _world.distributed:
        return network
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=find_unused)


def objective(network, loss: Callable):
    """A module whose forward is ``loss(network, *args, **kwargs)``, for a loss that calls the network part
    by part (HMR-Net's): DDP averages gradients only of what runs inside its own forward."""
    import torch

    class Objective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.network = network

        def forward(self, *args, **kwargs):
            return loss(self.network, *args, **kwargs)

    return Objective()


def mean_across(values: dict) -> dict:
    """Each value's mean over the ranks (the same dict in a single process): the losses of the ranks'
    shares, as one figure for the log."""
    if not _world.distributed or not values:
        return values
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: float(v) / _world.size for k, v in zip(keys, tensor.tolist())}


def unwrap(network):
    """The network inside a DDP wrapper (the network itself otherwise): its methods and state_dict, so that
    checkpoints and packages are the same as a single process's."""
    network = getattr(network, "module", network)
    return getattr(network, "network", network) if type(network).__name__ == "Objective" else network


def sync_buffers(network) -> None:
    """Rank 0's buffers (batch-norm running statistics) to every rank: each rank updates them from its own
    share of the batch."""
    if not _world.distributed:
        return
    import torch.distributed as dist

    for buffer in unwrap(network).buffers():
        dist.broadcast(buffer.data, src=0)


def weights_sha256(network) -> str:
    """A sha256 over the network's state (names, dtypes, shapes and values, in name order)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap(network).state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update((value.float() if value.dtype == torch.bfloat16 else value).numpy().tobytes())
    return digest.hexdigest()


def check_weights(network, what: str) -> None:
    """Every rank prints ``rank R/N: <what> weights sha256 <hex>`` and all of them compare the hashes;
    a SegcoreError when they differ. Nothing in a single process."""
    if not _world.distributed:
        return
    import torch.distributed as dist

    sync_buffers(network)
    mine = weights_sha256(network)
    # One write per line, so that the ranks' lines on a shared stderr never interleave.
    sys.stderr.write(f"rank {_world.rank}/{_world.size}: {what} weights sha256 {mine}\n")
    sys.stderr.flush()
    hashes: list = [None] * _world.size
    dist.all_gather_object(hashes, mine)
    if len(set(hashes)) != 1:
        raise SegcoreError(f"the {_world.size} training processes ended with different {what} weights: "
                           + ", ".join(f"rank {r} {h[:12]}" for r, h in enumerate(hashes)))


def describe(error: BaseException) -> str | None:
    """A one-line message for a failure of the process group under torchrun (another rank failed or never
    came, or a wait ran past the timeout), or None for any other error."""
    import torch.distributed as dist

    text = str(error).strip()
    ours = isinstance(error, dist.DistError) or (
        _world.distributed and any(word in text.lower() for word in ("gloo", "nccl")))
    if not ours:
        return None
    place = _world if _world.distributed else from_environment()
    first = text.splitlines()[0] if text else type(error).__name__
    return (f"rank {place.rank}/{place.size}: the training processes lost each other ({first[:300]}); "
            f"another rank failed, or a wait ran past {TIMEOUT_VARIABLE} ({timeout()})")
