"""The trainer's processes under torchrun: the process group from the environment, the
shard of a global batch each process takes, gradients averaged over the processes and
step sums added over them.

One process (no WORLD_SIZE, or 1) is the identity everywhere, so the trainer's code path is
the same with and without torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Processes:
    """This process's rank among ``world`` processes; ``owns_group``: the group was started
    here (and is ended by ``close``)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: torch.device) -> Processes:
        """torchrun's WORLD_SIZE / RANK (and MASTER_ADDR, MASTER_PORT): a process group with
        nccl on CUDA, gloo on the CPU; one process without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owns_group=True)

    @property
    def leader(self) -> bool:
        """Rank 0, which writes the files."""
        return self.rank == 0

    def shard(self, idx: Tensor) -> Tensor:
        """This process's contiguous part of a global batch's indices (len divisible by
        world)."""
        if self.world == 1:
            return idx
        n = idx.shape[0] // self.world
        return idx[self.rank * n:(self.rank + 1) * n]

    def average_gradients(self, model: nn.Module) -> None:
        """Every parameter's gradient averaged over the processes, in one all-reduce of one
        flat buffer (the gradient of the mean loss over the global batch)."""
        if self.world == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def add_up(self, sums: dict[str, float]) -> dict[str, float]:
        """The step's sums (loss · b, correct, count, ...) added over the processes."""
        if self.world == 1:
            return sums
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
