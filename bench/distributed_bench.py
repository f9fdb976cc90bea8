"""Steps per second of DDP(GradRegLoss(model)) with 1 and 2 processes on this machine: the
MLP 784-512-512-10 (ReLU) on a global batch of 256 (each of N processes takes 256/N), gloo
on the CPU, threads split evenly (2 cores: one process with 2 threads, or two with 1). The
fused step runs in every process; DDP all-reduces the gradients when its backward returns.

    python bench/distributed_bench.py [--steps 30] [--procs 1,2]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

GLOBAL_BATCH, LAM, CORES = 256, 0.5, os.cpu_count() or 2


def _worker(rank: int, world: int, port: int, steps: int, folder: str) -> None:
    from workloads import mlp

    from gradreg_kernels import GradRegLoss

    torch.set_num_threads(max(1, CORES // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = mlp()
        ddp = DDP(GradRegLoss(model, LAM))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(GLOBAL_BATCH // world, 784, generator=g)
        y = torch.randint(0, 10, (GLOBAL_BATCH // world,), generator=g)
        for i in range(steps + 3):
            if i == 3:
                dist.barrier()
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = ddp(x, y)
            out.loss.backward()
            opt.step()
        dist.barrier()
        if rank == 0:
            rate = steps / (time.perf_counter() - t0)
            (Path(folder) / "result.txt").write_text(f"{rate} {out.backend}")
    finally:
        dist.destroy_process_group()


def steps_per_second(world: int, steps: int) -> tuple[float, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, port, steps, tmp), nprocs=world, join=True)
        rate, backend = (Path(tmp) / "result.txt").read_text().split()
    return float(rate), backend


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--procs", default="1,2")
    args = p.parse_args(argv)
    print("| processes | threads each | steps/s (global batch 256) | backend |")
    print("|---:|---:|---:|---|")
    for world in [int(w) for w in args.procs.split(",")]:
        rate, backend = steps_per_second(world, args.steps)
        print(f"| {world} | {max(1, CORES // world)} | {rate:.1f} | {backend} |")


if __name__ == "__main__":
    main()
