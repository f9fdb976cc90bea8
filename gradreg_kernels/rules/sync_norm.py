"""SyncBatchNorm in train mode across the processes of its group: batch norm whose batch is
every process's batch together, all four passes exact.

The train-mode rule of rules/norm.py with N the global count: every per-channel mean on
the input path (μ, var in pass 1; mean(d), mean(x̂ d) in pass 2; mean(ṙ), mean(x̂ ṙ) and
⟨d, P ṙ⟩ in pass 3; mean(ā), mean(x̂ ā) in pass 4) is a sum all-reduced over the group
divided by N, one all-reduce of the packed (C,) sums per pass (two in pass 3, whose dot
needs P ṙ). The parameter-gradient sums (Σ ā x̂, Σ ā, Σ d P ṙ/σ) stay local: each process
contributes its examples' terms and DDP's reducer averages them, so the result is the
gradient of the mean loss over the global batch (equal local batches). Running statistics
use the global count, as nn.SyncBatchNorm's do. torch's own SyncBatchNorm runs on GPUs only
and its backward is not differentiable again; this rule runs wherever the process group's
backend does (gloo on the CPU, nccl on CUDA).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..backend_protocol import Backend
from ..registry import register_module
from ..tensor_ops import batchnorm_second_order, channel_sum, channel_view
from .base import wants_grad
from .norm import BatchNormEvalRule, BatchNormTrainRule, uses_batch_stats


def sync_group(m: nn.SyncBatchNorm):
    """The process group m synchronizes over, or None when there is nothing to sync (not
    distributed, one process, or eval mode)."""
    if not (uses_batch_stats(m) and dist.is_available() and dist.is_initialized()):
        return None
    group = m.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class SyncBatchNormTrainRule(BatchNormTrainRule):
    def __init__(self, module: nn.SyncBatchNorm, kernels: Backend, group) -> None:
        super().__init__(module, kernels)
        self.group = group

    def _allsum(self, *parts: Tensor) -> list[Tensor]:
        """The (C,) parts summed over the group, in one all-reduce of their concatenation."""
        flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
        dist.all_reduce(flat, group=self.group)
        return list(flat.split([p.numel() for p in parts]))

    def _means(self, *parts: Tensor, like: Tensor) -> list[Tensor]:
        """Global per-channel means of the local (C,) sums, broadcastable against like."""
        return [channel_view((s / self.n).to(like.dtype), like) for s in self._allsum(*parts)]

    def _project(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """P v = v − mean(v) − x̂ mean(x̂ v) with global means; (P v, mean v, mean x̂ v)."""
        xhat = self.xhat
        v = v.to(torch.promote_types(v.dtype, xhat.dtype))
        mv, mxv = self._means(channel_sum(v), channel_sum(xhat * v), like=v)
        return v - mv - xhat * mxv, mv, mxv

    def forward(self, a: Tensor) -> Tensor:
        m = self.module
        if a.dim() < 2 or a.shape[1] != m.num_features:
            raise ValueError(f"{type(m).__name__} expects {m.num_features} channels in dim 1, "
                             f"got input of shape {tuple(a.shape)}")
        n_local = a.numel() // a.shape[1]
        sums = self._allsum(channel_sum(a), a.new_tensor([float(n_local)]))
        self.n = n = float(sums[1])
        if n <= 1:
            raise ValueError(f"{type(m).__name__} in train mode needs more than 1 value per "
                             f"channel over the group, got {int(n)}")
        mean = channel_view((sums[0] / n).to(a.dtype), a)
        xc = a - mean
        (sq,) = self._allsum(channel_sum(xc * xc))
        var = (sq / n).to(a.dtype)
        self.inv_std = channel_view(torch.rsqrt(var + m.eps), a)
        self.xhat = xc * self.inv_std
        gamma = None if self.gamma is None else self.gamma.detach()
        self.gamma_c = channel_view(gamma, a) if gamma is not None else a.new_ones(())
        self.k = self.gamma_c * self.inv_std
        y = self.xhat if gamma is None else self.xhat * self.gamma_c + channel_view(
            self.beta.detach(), a)
        if m.training and m.track_running_stats:
            self.batch_stats = (mean.flatten(), var, int(n))
        return y

    def chain(self, d: Tensor) -> Tensor:
        pd, md, mxd = self._project(d)
        self.chain_saved = (d, md, mxd)
        return pd * self.k

    def tangent(self, r: Tensor) -> Tensor:
        d, md, mxd = self.chain_saved
        pr, _, mxr = self._project(r)
        d_pr = channel_sum(d * pr)  # local: Σ δ P ṙ over this process's values
        (d_pr_all,) = self._allsum(d_pr)
        if wants_grad(self.gamma):
            self.tan_gamma = d_pr * self.inv_std.flatten()
        dots = channel_view((d_pr_all / self.n).to(pr.dtype), pr)
        self.s = batchnorm_second_order(self.xhat, self.inv_std, self.gamma_c, d, md, mxd, pr,
                                        mxr, dots)
        if not self.keep_saved:
            self.chain_saved = None
        return pr * self.k

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        pa, _, _ = self._project(abar)
        if wants_grad(self.gamma):
            g_xhat = channel_sum(abar * self.xhat)
            self.g_gamma = g_xhat if self.tan_gamma is None else g_xhat + self.tan_gamma
        if wants_grad(self.beta):
            self.g_beta = channel_sum(abar)
        if not need_input_grad:
            return None
        out = pa * self.k
        return out if self.s is None else out + self.s


def _sync_batch_norm(m: nn.SyncBatchNorm):
    group = sync_group(m)
    if group is not None:
        return lambda kernels: SyncBatchNormTrainRule(m, kernels, group)
    if uses_batch_stats(m):
        return lambda kernels: BatchNormTrainRule(m, kernels)
    return lambda kernels: BatchNormEvalRule(m)


def _options(m: nn.SyncBatchNorm):
    group = sync_group(m)
    return (m._buffers.get("running_mean") is None, m._buffers.get("running_var") is None,
            None if group is None else (id(group), dist.get_world_size(group)))


register_module(nn.SyncBatchNorm, options=_options)(_sync_batch_norm)
