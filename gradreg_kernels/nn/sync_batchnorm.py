"""SyncBatchNorm that runs on any device the process group runs on (gloo on the CPU, nccl
on CUDA), with an eager forward that autograd differentiates twice, and the conversion of
a model's batch norms to it.

torch's nn.SyncBatchNorm runs on GPUs only (DistributedDataParallel refuses a CPU model that
holds one) and its backward is not differentiable again. This module has torch's
constructor, state_dict and running-statistics update; in train mode under an initialized
process group of more than one process its statistics are over every process's batch
(sums all-reduced with torch.distributed.nn.functional.all_reduce, which autograd
differentiates), elsewhere it is plain batch norm. The fused step runs it with the
synchronized rule of rules/sync_norm.py, as it runs nn.SyncBatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..registry import register_alias
from ..rules.sync_norm import sync_group
from ..tensor_ops import update_running_stats


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the union of the batches of ``process_group`` (default: the world)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        group = sync_group(self)
        if group is None:
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, input.dim()))
        count = torch.tensor([float(input.numel() // input.shape[1])], dtype=torch.float64)
        dist.all_reduce(count, group=group)
        n = float(count)
        if n <= 1:
            raise ValueError("SyncBatchNorm in train mode needs more than 1 value per channel "
                             f"over the group, got {int(n)}")
        shape = [1, -1] + [1] * (input.dim() - 2)
        mean = all_reduce(input.sum(dims), group=group) / n
        xc = input - mean.view(shape)
        var = all_reduce((xc * xc).sum(dims), group=group) / n
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            update_running_stats(self, mean, var, int(n))
        return y


register_alias(SyncBatchNorm, nn.SyncBatchNorm)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with every BatchNorm1d/2d/3d (and nn.SyncBatchNorm) replaced by this
    package's SyncBatchNorm: the same parameters, running statistics and mode, as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does for torch's."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]
