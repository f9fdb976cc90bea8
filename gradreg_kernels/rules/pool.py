"""Pooling: both kinds are linear once the forward pass has fixed them.

MaxPool2d: y = gather(a, idx) with idx the argmax of each window (saved in pass 1);
    chain / backward scatter-add into the input positions, tangent gathers at idx.
AvgPool2d, AdaptiveAvgPool2d: y = A a with A the fixed averaging operator;
    chain / backward apply Aᵀ, tangent applies A.
None has parameters or a second-order term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend_protocol import Backend
from ..registry import register_function, register_module
from .base import FixedLinearRule, Rule


def disjoint_windows(kernel_size, stride, padding, dilation
                     ) -> tuple[int, int, int, int] | None:
    """(stride_h, stride_w, pad_h, pad_w) when no two max-pool windows share an input
    position, i.e. stride ≥ dilation·(kernel − 1) + 1 (the window's extent) along both dims
    (then input row h lies in window row (h + pad_h) // stride_h or in none); else None."""
    pair = torch.nn.modules.utils._pair
    if stride is None or (isinstance(stride, tuple | list) and len(stride) == 0):
        stride = kernel_size  # as F.max_pool2d reads a missing stride
    k, s, p, d = (pair(v) for v in (kernel_size, stride, padding, dilation))
    if all(s[i] >= d[i] * (k[i] - 1) + 1 for i in (0, 1)):
        return int(s[0]), int(s[1]), int(p[0]), int(p[1])
    return None


class MaxPool2dRule(Rule):
    def __init__(self, module: nn.MaxPool2d, kernels: Backend) -> None:
        self.module, self.kernels = module, kernels
        m = module
        self.args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        self.disjoint = disjoint_windows(m.kernel_size, m.stride, m.padding, m.dilation)

    def forward(self, a: Tensor) -> Tensor:
        self.in_shape = a.shape
        y, self.idx = self.kernels.max_pool2d(a, *self.args)
        return y

    def chain(self, d: Tensor) -> Tensor:
        return self.kernels.pool_scatter(d, self.idx, self.in_shape, disjoint=self.disjoint)

    def tangent(self, r: Tensor) -> Tensor:
        return self.kernels.pool_gather(r, self.idx)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        if not need_input_grad:
            return None
        return self.kernels.pool_scatter(abar, self.idx, self.in_shape, disjoint=self.disjoint)


class AvgPool2dRule(FixedLinearRule):
    def __init__(self, module: nn.AvgPool2d) -> None:
        self.module = module
        m = module
        stride = m.stride if m.stride is not None else m.kernel_size
        self.args = (m.kernel_size, stride, m.padding, m.ceil_mode, m.count_include_pad,
                     m.divisor_override)

    def _apply(self, a: Tensor) -> Tensor:
        return F.avg_pool2d(a, *self.args)

    def _transpose(self, d: Tensor) -> Tensor:
        k, s, p, ceil, inc, div = self.args
        pair = torch.nn.modules.utils._pair
        return torch.ops.aten.avg_pool2d_backward(d, self._shape_only_input(d), pair(k),
                                                  pair(s), pair(p), ceil, inc, div)


class AdaptiveAvgPool2dRule(FixedLinearRule):
    """nn.AdaptiveAvgPool2d (e.g. a ResNet's global average pooling, output size 1)."""

    def __init__(self, module: nn.AdaptiveAvgPool2d) -> None:
        self.module = module
        self.output_size = module.output_size

    def _apply(self, a: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(a, self.output_size)

    def _transpose(self, d: Tensor) -> Tensor:
        return torch.ops.aten._adaptive_avg_pool2d_backward(d, self._shape_only_input(d))


def _max_pool2d(m: nn.MaxPool2d):
    if m.return_indices:
        return "return_indices=True returns a tuple"
    return lambda kernels: MaxPool2dRule(m, kernels)


register_module(nn.MaxPool2d, options=lambda m: m.return_indices)(_max_pool2d)
register_module(nn.AvgPool2d)(lambda m: lambda kernels: AvgPool2dRule(m))
register_module(nn.AdaptiveAvgPool2d)(lambda m: lambda kernels: AdaptiveAvgPool2dRule(m))
register_function(F.max_pool2d, module=lambda kernel_size, stride=None, padding=0, dilation=1,
                  ceil_mode=False, return_indices=False: nn.MaxPool2d(
                      kernel_size, stride, padding, dilation, return_indices, ceil_mode))
register_function(F.avg_pool2d, torch._C._nn.avg_pool2d, module=nn.AvgPool2d)
register_function(F.adaptive_avg_pool2d, module=nn.AdaptiveAvgPool2d)
