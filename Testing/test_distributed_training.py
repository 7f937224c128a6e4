"""Training with torchrun (DistributedDataParallel, gloo on the CPU): tiny real two-process runs of
train_prostate and train_hmrnet whose ranks end with identical weights, whose files only rank 0 writes,
whose package installs and segments, and which resume; the batch sharing, the weight check and the
timeout as units."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file
from test_train_hmrnet import TINY as HMR_TINY
from test_train_prostate import TINY as PROSTATE_TINY
from training_runs import install_and_segment, run_args

from segcore import networks, packages
from segcore.errors import SegcoreError
from training import distributed, runs

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_LINE = re.compile(r"^rank (\d+)/(\d+): (\S+) weights sha256 ([0-9a-f]{64})$", re.MULTILINE)


def torchrun(module: str, args: list[str], home: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone`` of a training module, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROSTATESEG_HOME": str(home),
           distributed.TIMEOUT_VARIABLE: "5"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone",
               "-m", module, *args]
    return subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def weight_hashes(stderr: str) -> dict[str, dict[int, str]]:
    """{what: {rank: sha256}} from the ranks' weight lines; every line names a world of 2."""
    found: dict[str, dict[int, str]] = {}
    for rank, size, what, digest in WEIGHTS_LINE.findall(stderr):
        assert int(size) == 2
        assert int(rank) not in found.setdefault(what, {}), f"rank {rank} reported {what} twice"
        found[what][int(rank)] = digest
    return found


def checkpoint_sha256(folder: Path, architecture: str, arguments: dict) -> str:
    network = networks.build(architecture, arguments)
    runs.load_checkpoint(folder, "last", network, None)
    return distributed.weights_sha256(network)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_a_two_process_prostate_run_agrees_writes_once_installs_and_segments(tmp_path, monkeypatch):
    result = torchrun("training.train_prostate", run_args(tmp_path, PROSTATE_TINY), tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    hashes = weight_hashes(err)
    assert set(hashes) == {"stage1", "stage2"}
    for what, per_rank in hashes.items():
        assert set(per_rank) == {0, 1} and per_rank[0] == per_rank[1], what
    # Rank 0 alone logs, validates and writes: each line once, each file once, nothing half-written.
    assert err.count("exported model package prostate-tiny") == 1
    assert err.count("stage2 epoch 1:") == 1 and err.count("preparing 2 training") == 1
    assert "Traceback" not in err
    run = tmp_path / "run"
    assert files_under(run) - {"curves.png"} >= {
        "config.json", "log.csv", "package/model.json", "package/stage1.safetensors", "package/stage2.safetensors",
        *(f"{s}/{c}.{e}" for s in ("stage1", "stage2") for c in ("best", "last") for e in ("json", "safetensors"))}
    assert not [f for f in files_under(run) if "tmp" in f.lower() or f.startswith(".")]
    assert not any(p.is_dir() for p in (run / "stage1").iterdir())     # no TensorBoard folder from rank 1
    assert (run / "log.csv").read_text().count("\n") == 3                # header + one epoch per stage
    history = json.loads((run / "stage2" / "last.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1] and "dsc" in history[0]["validation"]
    # The checkpoints hold the weights every rank reported, under a single process's names.
    config = json.loads((run / "config.json").read_text())
    for stage in ("stage1", "stage2"):
        spec = config[stage]
        assert checkpoint_sha256(run / stage, spec["architecture"], spec["arguments"]) == hashes[stage][0]

    package = packages.open_package(run / "package")
    assert packages.verify_package(package.path).ok
    manifest = package.manifest
    assert manifest["training"]["epochs"] == 2
    stage2 = load_file(str(package.path / "stage2.safetensors"))
    assert set(stage2) == set(networks.build("metricunet", manifest["stages"]["stage2"]["arguments"]).state_dict())
    monkeypatch.setenv("PROSTATESEG_HOME", str(tmp_path / "home"))
    case, out = install_and_segment(package, tmp_path, "segment")
    assert sitk.ReadImage(str(out / "p_ct_seg.nii.gz")).GetSize() == case.ct.GetSize()


def test_a_two_process_run_resumes_exactly(tmp_path):
    """Stopped after one of two epochs and resumed under torchrun, stage 2 ends with the weights of an
    uninterrupted two-process run (every rank loads the last checkpoint)."""
    settings = PROSTATE_TINY + ["stage2.epochs=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    for folder, extra in ((straight, []), (split, ["--max-epochs", "1"]), (split, ["--resume"])):
        result = torchrun("training.train_prostate", run_args(folder, settings, ["--stages", "stage2", *extra]),
                          tmp_path / "home")
        assert result.returncode == 0, result.stderr[-3000:]
        hashes = weight_hashes(result.stderr)["stage2"]
        assert hashes[0] == hashes[1]
        if extra == ["--resume"]:
            assert result.stderr.count("stage2: resuming after epoch 1") == 1
    a = load_file(str(straight / "run" / "stage2" / "last.safetensors"))
    b = load_file(str(split / "run" / "stage2" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((split / "run" / "stage2" / "last.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2]


def test_a_two_process_hmrnet_run_agrees_and_exports(tmp_path):
    result = torchrun("training.train_hmrnet", run_args(tmp_path, HMR_TINY), tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    hashes = weight_hashes(result.stderr)["hmrnet"]
    assert set(hashes) == {0, 1} and hashes[0] == hashes[1]
    assert result.stderr.count("validation at 3:") == 1
    run = tmp_path / "run"
    assert (run / "log.csv").read_text().count("\n") == 2
    config = json.loads((run / "config.json").read_text())
    assert checkpoint_sha256(run / "hmrnet", config["architecture"], config["arguments"]) == hashes[0]
    package = packages.open_package(run / "package")
    assert package.task == "organs" and packages.verify_package(package.path).ok
    weights = load_file(str(package.path / "hmrnet.safetensors"))
    assert set(weights) == set(networks.build("hmrnet", config["arguments"]).state_dict())


def test_a_two_process_fine_tune_scores_exports_and_installs_on_rank_0(tmp_path):
    from segcore.phantom import write_phantoms

    write_phantoms(tmp_path / "cases", 3, seed=7300, matrix=96)
    home = tmp_path / "home"
    result = torchrun("training.finetune", ["--model", "prostate-metricunet-demo", "--data", str(tmp_path / "cases"),
                                            "--export", str(tmp_path / "tuned"), "--iterations", "4",
                                            "--output", str(tmp_path / "run"), "--name", "clinic-ddp", "--install"],
                      home)
    assert result.returncode == 0, result.stderr[-3000:]
    hashes = weight_hashes(result.stderr)["stage2"]
    assert set(hashes) == {0, 1} and hashes[0] == hashes[1]
    assert result.stderr.count("[100%] done") == 1 and result.stderr.count("[  2%] base model") == 1
    assert result.stdout.count("dsc base") == 1
    tuned = packages.open_package(tmp_path / "tuned")
    assert packages.verify_package(tuned.path).ok and tuned.manifest["lineage"]["stages"] == ["stage2"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["installed"] and Path(summary["installed"]).resolve().is_relative_to(home.resolve())


def test_a_rank_that_never_comes_ends_the_run_with_one_line(tmp_path):
    """Rank 0 of a world of 2 whose rank 1 never starts gives up after the timeout, with a one-line error."""
    with socket.socket() as probe:          # a free port for rank 0's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           distributed.TIMEOUT_VARIABLE: "0.05"}
    command = [sys.executable, "-m", "training.train_prostate", *run_args(tmp_path, PROSTATE_TINY)]
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: rank 0/2: the training processes lost each other" in result.stderr
    assert distributed.TIMEOUT_VARIABLE in result.stderr


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_the_ranks_shares_partition_every_batch_and_the_epoch(size):
    order = np.random.default_rng(0).permutation(30)
    batch_size = 8
    seen = []
    for b in range(int(np.ceil(len(order) / batch_size))):
        pick = order[b * batch_size:][:batch_size]
        shares = [distributed.share(pick, rank, size) for rank in range(size)]
        assert np.array_equal(np.concatenate(shares), pick)                      # the batch, in rank order
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        seen += [int(i) for s in shares for i in s]
    assert sorted(seen) == list(range(30)) and seen == list(order)               # each patch once, per epoch
    picks = [(0, 1), (0, 2), (1, 5)]
    assert [p for r in range(2) for p in distributed.share(picks, r, 2)] == picks


def test_the_loss_weights_make_the_mean_over_the_whole_batch(monkeypatch):
    monkeypatch.setattr(distributed, "_world", distributed.World(3, 1, 1))
    per_sample = np.arange(7.0) ** 2   # a loss term of each sample of a batch of 7
    shares = [distributed.share(list(range(7)), r, 3) for r in range(3)]
    assert sorted(map(len, shares)) == [2, 2, 3]
    # DDP averages the ranks' gradients: the mean of (weight x mean over the share) is the batch mean.
    ddp_mean = sum(distributed.share_weight(len(s), 7) * per_sample[s].mean() for s in shares) / 3
    assert ddp_mean == pytest.approx(per_sample.mean())
    with pytest.raises(SegcoreError, match="cannot be shared between 3 processes"):
        distributed.check_batch(2, "stage2.batch_size")
    distributed.check_batch(3, "stage2.batch_size")


def test_a_single_process_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_environment() == distributed.World(1, 0, 0)
    assert distributed.from_environment({"WORLD_SIZE": "1", "RANK": "0"}).distributed is False
    assert distributed.from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == \
        distributed.World(4, 3, 1)
    with pytest.raises(SegcoreError, match="not within WORLD_SIZE"):
        distributed.from_environment({"WORLD_SIZE": "2", "RANK": "2"})
    device = torch.device("cpu")
    assert distributed.start(device) is device and not torch.distributed.is_initialized()
    network = torch.nn.Linear(2, 2)
    assert distributed.wrap(network, device) is network and distributed.unwrap(network) is network
    assert distributed.share([1, 2, 3]) == [1, 2, 3] and distributed.share_weight(3, 3) == 1.0
    assert distributed.rank_seed(0, 1) is None and distributed.is_main()


def test_ranks_that_disagree_fail_loudly(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "_world", distributed.World(2, 0, 0))
    monkeypatch.setattr(distributed, "sync_buffers", lambda network: None)

    def gather(out, mine):
        out[:] = [mine, "f" * 64]
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    network = torch.nn.Linear(2, 2)
    with pytest.raises(SegcoreError, match="ended with different stage2 weights"):
        distributed.check_weights(network, "stage2")
    assert f"rank 0/2: stage2 weights sha256 {distributed.weights_sha256(network)}" in capsys.readouterr().err
