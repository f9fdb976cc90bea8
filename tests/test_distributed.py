"""DistributedDataParallel around the module form of the loss: two CPU processes with the
gloo backend, each on its half of one global batch, against one process on the whole batch.
The gradients after one step are equal (float64 to 1e-10, float32 to 1e-5) with the fused
path taken in every process: an MLP, a model with its own forward, a CNN whose batch norms
are converted to SyncBatchNorm (fused across the processes; compared with plain batch norm
on the whole batch, running statistics included), and gradient accumulation under
``no_sync()``; a two-process torchrun training run against one process, and its resume;
an FSDP-sharded model's error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from distributed_worker import LAM, global_batch, make_model, worker

from gradreg_kernels import GradRegLoss

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(case: str, dtype: torch.dtype, tmp_path) -> list[dict]:
    """The ranks' saved results. A child killed by a signal is run once more, on a fresh
    port: under load a gloo process now and then aborts ("terminate called without an
    active exception", SIGABRT); an abort that repeats, an error and a wrong gradient
    still fail the test."""
    for attempt in range(2):
        try:
            mp.spawn(worker, args=(WORLD, _free_port(), case, str(dtype).split(".")[1],
                                   str(tmp_path)), nprocs=WORLD, join=True)
            break
        except mp.ProcessExitedException as e:
            if attempt == 1 or e.exit_code >= 0:
                raise
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _one_process(case: str, dtype: torch.dtype) -> tuple[dict, dict]:
    model = make_model(case, dtype)
    x, y = global_batch(case, dtype)
    loss = GradRegLoss(model, LAM)
    if case == "accumulate":  # the first halves of every shard, then the second halves
        shard = x.shape[0] // WORLD
        half = shard // 2
        first = torch.cat([torch.arange(r * shard, r * shard + half) for r in range(WORLD)])
        second = torch.cat([torch.arange(r * shard + half, (r + 1) * shard)
                            for r in range(WORLD)])
        loss(x[first], y[first]).loss.backward()
        loss(x[second], y[second]).loss.backward()
    else:
        out = loss(x, y)
        assert out.backend != "autograd"
        out.loss.backward()
    return ({n: p.grad for n, p in model.named_parameters()},
            {n: b for n, b in model.named_buffers()})


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", ["mlp", "graph", "syncbn", "accumulate"])
def test_ddp_gradients_equal_one_process_on_the_whole_batch(case, dtype, tol, tmp_path):
    ranks = _run(case, dtype, tmp_path)
    want, want_buffers = _one_process(case, dtype)
    scale = max(float(g.norm()) for g in want.values())
    for r, got in enumerate(ranks):
        assert all(b == "cpu" if dtype == torch.float32 else b in ("cpu", "torch")
                   for b in got["backends"]), got["backends"]
        for n, g in want.items():
            # floored at 1 % of the largest: a gradient zero in exact arithmetic (a bias
            # before train-mode BN) is rounding noise of a few ulps of it on both sides
            err = float((got["grads"][n] - g).norm()) / max(float(g.norm()), 1e-2 * scale)
            assert err < tol, (r, n, err)
        for n, b in want_buffers.items():
            assert torch.allclose(got["buffers"][n].to(b.dtype), b, rtol=tol, atol=tol), (r, n)


def _train_cmd(out, nproc: int, *extra: str) -> list[str]:
    """``python -m gradreg_kernels.train`` on the bundled digits, under torchrun with
    ``nproc`` processes (or plainly with 1)."""
    args = ["-m", "gradreg_kernels.train", "--data", "digits", "--model", "mlp", "--width",
            "32", "--defense", "gradreg", "--lam", "0.5", "--batch-size", "64", "--lr", "1e-2",
            "--epochs", "2", "--out", str(out), "--no-progress", *extra]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(_free_port()), *args]
    return [sys.executable, *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _metrics(out) -> list[dict]:
    path = out / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def _train(tmp_path, name: str, nproc: int, *extra: str) -> list[dict]:
    """Run the trainer to its end; returns metrics.jsonl. As in ``_run``, a run in which gloo
    aborted a process (under load, now and then, at teardown) is run once more: a fresh run
    into the same folder and a resumed one both end where the first would have (the trainer
    is deterministic and resuming a finished run changes nothing); an abort that repeats, an
    error and wrong metrics still fail the test."""
    out = tmp_path / name
    for attempt in range(2):
        res = subprocess.run(_train_cmd(out, nproc, *extra), capture_output=True, text=True,
                             env=ENV, timeout=240)
        if res.returncode == 0:
            break
        assert attempt == 0 and GLOO_TEARDOWN_ABORT in res.stderr, res.stdout + res.stderr
    return _metrics(out)


def test_torchrun_training_matches_one_process_and_resumes(tmp_path):
    """Two processes on shards of each global batch follow the one-process loss curve; a
    run stopped after its first epoch and resumed under torchrun ends where the
    uninterrupted two-process run ends."""
    one = _train(tmp_path, "one", 1)
    two = _train(tmp_path, "two", 2)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("train_loss", "train_penalty", "test_acc"):
            assert abs(a[key] - b[key]) <= 1e-3 * max(1.0, abs(a[key])), (key, a, b)
        assert b["backend"] == "cpu"
    steps_per_epoch = one[0]["step"]
    first = _train(tmp_path, "resumed", 2, "--max-steps", str(steps_per_epoch))
    assert len(first) == 1
    resumed = _train(tmp_path, "resumed", 2, "--resume")
    assert len(resumed) == 2
    for key in ("train_loss", "test_acc", "step"):
        assert abs(resumed[-1][key] - two[-1][key]) <= 1e-6 * max(1.0, abs(two[-1][key])), key


def test_an_fsdp_sharded_model_gets_a_clear_error(tmp_path):
    from distributed_worker import fsdp_worker

    mp.spawn(fsdp_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        msg = (tmp_path / f"rank{r}.txt").read_text()
        assert msg.startswith("UnsupportedShardingError: gradreg_loss cannot run a model "
                              "sharded by FSDP"), msg
        assert "DistributedDataParallel(GradRegLoss(model))" in msg


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc")
def test_a_rank_killed_mid_run_resumes_from_the_last_checkpoint(tmp_path):
    """SIGKILL one of two processes after the first epoch's checkpoint: torchrun stops, and
    --resume ends where an uninterrupted two-process run of 3 epochs ends."""
    want = _train(tmp_path, "whole", 2, "--epochs", "3")
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(out, 2, "--epochs", "3"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_metrics(out)) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        ranks = _children(proc.pid)
        assert proc.poll() is None and len(ranks) == 2, "the run ended before the kill"
        os.kill(max(ranks), signal.SIGKILL)  # one rank, mid-epoch 2
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 1 <= len(_metrics(out)) < 3
    resumed = _train(tmp_path, "killed", 2, "--epochs", "3", "--resume")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for key in ("train_loss", "test_acc", "step"):
        assert abs(resumed[-1][key] - want[-1][key]) <= 1e-6 * max(1.0, abs(want[-1][key]))
