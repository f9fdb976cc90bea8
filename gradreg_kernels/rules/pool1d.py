"""1-D pooling (MaxPool1d, AvgPool1d, AdaptiveAvgPool1d) as the 2-D rules on a height-1 view.

(N, C, L) runs as (N, C, 1, L) through the rule of the 2-D pooling with a (1, k) window,
stride (1, s), padding (0, p) and dilation (1, d), so every pass is the 2-D one; the
output's height 1 is dropped again.
"""

from __future__ import annotations

from torch import nn

from .base import Rule
from .height_one import HeightOneRule
from .pool import AdaptiveAvgPool2dRule, AvgPool2dRule, MaxPool2dRule


def _one(v) -> int:
    return int(v[0]) if isinstance(v, tuple | list) else int(v)


def pool1d_rule(module: nn.Module, bk) -> Rule:
    """The rule of a MaxPool1d, AvgPool1d or AdaptiveAvgPool1d."""
    m = module
    if isinstance(m, nn.MaxPool1d):
        k = _one(m.kernel_size)
        s = k if m.stride is None else _one(m.stride)
        flat = nn.MaxPool2d((1, k), (1, s), (0, _one(m.padding)), (1, _one(m.dilation)),
                            ceil_mode=m.ceil_mode)
        return HeightOneRule(MaxPool2dRule(flat, bk), m)
    if isinstance(m, nn.AvgPool1d):
        k = _one(m.kernel_size)
        s = k if m.stride is None else _one(m.stride)
        flat = nn.AvgPool2d((1, k), (1, s), (0, _one(m.padding)), m.ceil_mode,
                            m.count_include_pad)
        return HeightOneRule(AvgPool2dRule(flat, bk), m)
    if isinstance(m, nn.AdaptiveAvgPool1d):
        size = m.output_size if not isinstance(m.output_size, tuple) else m.output_size[0]
        return HeightOneRule(AdaptiveAvgPool2dRule(nn.AdaptiveAvgPool2d((1, size)), bk), m)
    raise TypeError(f"no 1-D pooling rule for {type(m).__name__}")
