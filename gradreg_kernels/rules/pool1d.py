"""1-D pooling (MaxPool1d, AvgPool1d, AdaptiveAvgPool1d) as the 2-D rules on a height-1 view.

(N, C, L) runs as (N, C, 1, L) through the rule of the 2-D pooling with a (1, k) window,
stride (1, s), padding (0, p) and dilation (1, d), so every pass is the 2-D one; the
output's height 1 is dropped again.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Rule
from .pool import AdaptiveAvgPool2dRule, AvgPool2dRule, MaxPool2dRule


def _one(v) -> int:
    return int(v[0]) if isinstance(v, tuple | list) else int(v)


class _HeightOne(Rule):
    """A parameter-free 2-D rule run on (N, C, 1, L) views of (N, C, L) tensors."""

    def __init__(self, inner: Rule, module: nn.Module) -> None:
        self.inner, self.module = inner, module

    def set_keep_saved(self, keep: bool) -> None:
        self.keep_saved = keep
        self.inner.set_keep_saved(keep)

    def forward(self, a: Tensor) -> Tensor:
        if a.dim() != 3:
            raise ValueError(f"{type(self.module).__name__} runs fused on batched inputs "
                             f"(N, C, L), got shape {tuple(a.shape)}")
        return self.inner.forward(a.unsqueeze(2)).squeeze(2)

    def chain(self, d: Tensor) -> Tensor:
        return self.inner.chain(d.unsqueeze(2)).squeeze(2)

    def tangent(self, r: Tensor) -> Tensor:
        return self.inner.tangent(r.unsqueeze(2)).squeeze(2)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        out = self.inner.backward(abar.unsqueeze(2), need_input_grad)
        return None if out is None else out.squeeze(2)


def pool1d_rule(module: nn.Module, bk) -> Rule:
    """The rule of a MaxPool1d, AvgPool1d or AdaptiveAvgPool1d."""
    m = module
    if isinstance(m, nn.MaxPool1d):
        k = _one(m.kernel_size)
        s = k if m.stride is None else _one(m.stride)
        flat = nn.MaxPool2d((1, k), (1, s), (0, _one(m.padding)), (1, _one(m.dilation)),
                            ceil_mode=m.ceil_mode)
        return _HeightOne(MaxPool2dRule(flat, bk), m)
    if isinstance(m, nn.AvgPool1d):
        k = _one(m.kernel_size)
        s = k if m.stride is None else _one(m.stride)
        flat = nn.AvgPool2d((1, k), (1, s), (0, _one(m.padding)), m.ceil_mode,
                            m.count_include_pad)
        return _HeightOne(AvgPool2dRule(flat, bk), m)
    if isinstance(m, nn.AdaptiveAvgPool1d):
        size = m.output_size if not isinstance(m.output_size, tuple) else m.output_size[0]
        return _HeightOne(AdaptiveAvgPool2dRule(nn.AdaptiveAvgPool2d((1, size)), bk), m)
    raise TypeError(f"no 1-D pooling rule for {type(m).__name__}")
