"""A 1-D layer as its 2-D rule on a height-1 view: (N, C, L) runs as (N, C, 1, L) in every
pass and the height is dropped again (Conv1d, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Rule


class HeightOneRule(Rule):
    """``inner``, a 2-D rule set up with the 1-D layer's geometry as (1, k) windows, run on
    (N, C, 1, L) views of (N, C, L) tensors; its parameter gradients are its own."""

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

    def param_grads(self):
        return self.inner.param_grads()
