"""nn.PReLU: y = a ⊙ x where x ≤ 0, x elsewhere, with a learnable slope a per channel (dim 1)
or one for all.

With m = [x > 0] and σ' = m + (1 − m) a (torch's convention at 0), the layer is the diagonal
J = σ' for a fixed slope, and bilinear in (a, x) on the negative side:
  chain:    σ' ⊙ d                  tangent:  σ' ⊙ r,  Δa += R((1 − m) ⊙ d ⊙ r)
  backward: σ' ⊙ ā,  Δa += R((1 − m) ⊙ x ⊙ ā)
with R the sum over every dimension a is broadcast along; σ'' = 0, so there is no
second-order term in x. The rule keeps x (the mask and the negative part come from it).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register_module
from ..tensor_ops import channel_sum, channel_view
from .base import Rule, wants_grad


class PReLURule(Rule):
    def __init__(self, module: nn.PReLU) -> None:
        self.module = module
        self.a = module.weight
        self.x = self.d = self.tan_a = None

    def _slope(self, like: Tensor) -> Tensor:
        a = self.a.detach()
        if a.numel() == 1 or like.dim() < 2:
            return a.reshape(())
        return channel_view(a, like)

    def _reduce(self, t: Tensor) -> Tensor:
        if self.a.numel() == 1:
            return t.sum().reshape(self.a.shape)
        return channel_sum(t)

    def _d1(self, t: Tensor) -> Tensor:
        """σ' ⊙ t."""
        return t.where(self.x > 0, t * self._slope(t))

    def forward(self, x: Tensor) -> Tensor:
        c = self.a.numel()
        if c > 1 and (x.dim() < 2 or x.shape[1] != c):
            raise ValueError(f"PReLU with {c} slopes expects {c} channels in dim 1, got input "
                             f"of shape {tuple(x.shape)}")
        self.x = x
        return x.where(x > 0, x * self._slope(x))

    def chain(self, d: Tensor) -> Tensor:
        if wants_grad(self.a):
            self.d = d
        return self._d1(d)

    def tangent(self, r: Tensor) -> Tensor:
        if wants_grad(self.a):
            self.tan_a = self._reduce((self.d * r).masked_fill(self.x > 0, 0))
            if not self.keep_saved:
                self.d = None
        return self._d1(r)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        if wants_grad(self.a):
            g = self._reduce((self.x * abar).masked_fill(self.x > 0, 0))
            self.g_a = g if self.tan_a is None else g + self.tan_a
        return self._d1(abar) if need_input_grad else None

    def param_grads(self):
        return [(self.a, self.g_a)] if wants_grad(self.a) else []


register_module(nn.PReLU)(lambda m: lambda kernels: PReLURule(m))
