"""nn.Linear: z = a Wᵀ + b over the last dimension.

chain:    Jᵀd = d W                      tangent:  J r = r Wᵀ,   ΔW += dᵀ r
backward: ā = z̄ W,  ΔW += z̄ᵀ a,  Δb += Σ z̄
The two ΔW terms are handed to the backend as one doubled-batch product.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Rule, wants_grad


class LinearRule(Rule):
    def __init__(self, module: nn.Linear, bk) -> None:
        self.module, self.bk = module, bk
        self.w, self.b = module.weight, module.bias
        self.need_w = wants_grad(self.w)
        self.a = self.d = self.r = None

    def _flat(self, t: Tensor, width: int) -> Tensor:
        return t.reshape(-1, width)

    def forward(self, a: Tensor) -> Tensor:
        if a.dim() < 1 or a.shape[-1] != self.w.shape[1]:
            raise ValueError(f"Linear expects inputs of width {self.w.shape[1]} in the last "
                             f"dimension, got shape {tuple(a.shape)}")
        self.lead = a.shape[:-1]
        a2 = self._flat(a, self.w.shape[1])
        if self.need_w:
            self.a = a2
        return self.bk.linear(a2, self.w, self.b).view(*self.lead, self.w.shape[0])

    def chain(self, d: Tensor) -> Tensor:
        d2 = self._flat(d, self.w.shape[0])
        if self.need_w:
            self.d = d2
        return self.bk.linear_input_grad(d2, self.w).view(*self.lead, self.w.shape[1])

    def tangent(self, r: Tensor) -> Tensor:
        r2 = self._flat(r, self.w.shape[1])
        if self.need_w:
            self.r = r2
        return self.bk.linear(r2, self.w, None).view(*self.lead, self.w.shape[0])

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        z = self._flat(abar, self.w.shape[0])
        if self.need_w:
            pairs = [(z, self.a)] + ([(self.d, self.r)] if self.r is not None else [])
            self.gw = self.bk.linear_weight_grad(pairs)
        if wants_grad(self.b):
            self.gb = z.sum(0)
        if not need_input_grad:
            return None
        return self.bk.linear_input_grad(z, self.w).view(*self.lead, self.w.shape[1])

    def param_grads(self):
        out = [(self.w, self.gw)] if self.need_w else []
        return out + ([(self.b, self.gb)] if wants_grad(self.b) else [])
