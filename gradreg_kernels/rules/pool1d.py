"""1-D pooling (MaxPool1d, AvgPool1d, AdaptiveAvgPool1d) as the 2-D rules on a height-1 view.

(N, C, L) runs as (N, C, 1, L) through the rule of the 2-D pooling with a (1, k) window,
stride (1, s), padding (0, p) and dilation (1, d), so every pass is the 2-D one; the
output's height 1 is dropped again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_function, register_module
from .base import Rule
from .height_one import HeightOneRule
from .pool import AdaptiveAvgPool2dRule, AvgPool2dRule, MaxPool2dRule


def _one(v) -> int:
    return int(v[0]) if isinstance(v, tuple | list) else int(v)


def pool1d_rule(module: nn.Module, kernels) -> Rule:
    """The rule of a MaxPool1d, AvgPool1d or AdaptiveAvgPool1d."""
    m = module
    if isinstance(m, nn.MaxPool1d):
        k = _one(m.kernel_size)
        s = k if m.stride is None else _one(m.stride)
        flat = nn.MaxPool2d((1, k), (1, s), (0, _one(m.padding)), (1, _one(m.dilation)),
                            ceil_mode=m.ceil_mode)
        return HeightOneRule(MaxPool2dRule(flat, kernels), m)
    if isinstance(m, nn.AvgPool1d):
        k = _one(m.kernel_size)
        s = k if m.stride is None else _one(m.stride)
        flat = nn.AvgPool2d((1, k), (1, s), (0, _one(m.padding)), m.ceil_mode,
                            m.count_include_pad)
        return HeightOneRule(AvgPool2dRule(flat), m)
    if isinstance(m, nn.AdaptiveAvgPool1d):
        size = m.output_size if not isinstance(m.output_size, tuple) else m.output_size[0]
        return HeightOneRule(AdaptiveAvgPool2dRule(nn.AdaptiveAvgPool2d((1, size))), m)
    raise TypeError(f"no 1-D pooling rule for {type(m).__name__}")


def _pool1d(m: nn.Module):
    if getattr(m, "return_indices", False):
        return "return_indices=True returns a tuple"
    return lambda kernels: pool1d_rule(m, kernels)


register_module(nn.MaxPool1d, options=lambda m: m.return_indices)(_pool1d)
register_module(nn.AvgPool1d, nn.AdaptiveAvgPool1d)(_pool1d)
register_function(F.max_pool1d, module=lambda kernel_size, stride=None, padding=0, dilation=1,
                  ceil_mode=False, return_indices=False: nn.MaxPool1d(
                      kernel_size, stride, padding, dilation, return_indices, ceil_mode))
register_function(F.avg_pool1d, torch.avg_pool1d, module=nn.AvgPool1d)
register_function(F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d, module=nn.AdaptiveAvgPool1d)
