"""Elementwise activations a = σ(z) (σ, σ', σ'' in activation_math.py).

chain:    σ'(z) ⊙ d, keeping u = d for smooth σ
tangent:  σ'(z) ⊙ r, and s = σ''(z) ⊙ u ⊙ r (smooth σ only: the extra gradient at z)
backward: σ'(z) ⊙ ā + s
"""

from __future__ import annotations

from torch import Tensor, nn

from .activation_math import ActivationSpec
from .base import Rule


class ActivationRule(Rule):
    def __init__(self, module: nn.Module, spec: ActivationSpec, bk) -> None:
        self.module, self.spec, self.bk = module, spec, bk
        self.u = self.s = None

    def forward(self, a: Tensor) -> Tensor:
        y, self.saved = self.bk.act_forward(self.spec, a)
        return y

    def chain(self, d: Tensor) -> Tensor:
        if self.spec.smooth:
            self.u = d
        return self.bk.act_chain(self.spec, self.saved, d)

    def tangent(self, r: Tensor) -> Tensor:
        out, self.s = self.bk.act_tangent(self.spec, self.saved, r, self.u)
        if not self.keep_saved:
            self.u = None
        return out

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        if not need_input_grad:
            return None
        return self.bk.act_backward(self.spec, self.saved, abar, self.s)
