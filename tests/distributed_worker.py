"""What each process of the distributed tests runs (test_distributed.py): a gloo process
group on this machine, DDP(GradRegLoss(model)) on the process's shard of one global batch,
and its gradients saved for the parent to compare with one process on the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradreg_kernels import GradRegLoss

GLOBAL_BATCH = 8
LAM = 0.7


def make_model(case: str, dtype: torch.dtype) -> nn.Module:
    """The same model (same seed) in every process and in the parent."""
    torch.manual_seed(0)
    if case in ("mlp", "accumulate"):
        model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Softplus(),
                              nn.Linear(7, 4))
    elif case == "syncbn":
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                              nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.Softplus(),
                              nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
        with torch.no_grad():  # γ, β away from 1, 0 so that their terms are visible
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    elif case == "graph":
        from graph_models import TanhSkipMLP

        model = TanhSkipMLP(in_features=6, hidden=8, depth=3, num_classes=4)
    else:
        raise ValueError(case)
    return model.to(dtype).train()


def global_batch(case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (GLOBAL_BATCH, 2, 6, 6) if case == "syncbn" else (GLOBAL_BATCH, 6)
    return (torch.randn(shape, generator=g).to(dtype),
            torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))


def worker(rank: int, world: int, port: int, case: str, dtype_name: str, out: str) -> None:
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    os.environ.setdefault("GRADREG_TEST_TIMEOUT_S", "0")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model = make_model(case, dtype)
        if case == "syncbn":
            from gradreg_kernels.nn import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
        ddp = DDP(GradRegLoss(model, LAM))
        x, y = global_batch(case, dtype)
        shard = GLOBAL_BATCH // world
        xs, ys = x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]
        backends = []
        if case == "accumulate":  # two half-shards, the first without the all-reduce
            half = shard // 2
            with ddp.no_sync():
                o = ddp(xs[:half], ys[:half])
                o.loss.backward()
                backends.append(o.backend)
            o = ddp(xs[half:], ys[half:])
        else:
            o = ddp(xs, ys)
        o.loss.backward()
        backends.append(o.backend)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        torch.save({"grads": grads, "buffers": buffers, "backends": backends},
                   Path(out) / f"rank{rank}.pt")
        # no rank tears its process group down while the other still has gloo work in
        # flight (an early teardown aborts the other process: "terminate called …")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    """fully_shard(model) then the loss: the error it raises, saved for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        model = make_model("mlp", torch.float32)
        fully_shard(model)
        x, y = global_batch("mlp", torch.float32)
        try:
            GradRegLoss(model, LAM)(x, y).loss.backward()
            message = "no error"
        except Exception as e:  # noqa: BLE001 - the parent checks which
            message = f"{type(e).__name__}: {e}"
        (Path(out) / f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()
