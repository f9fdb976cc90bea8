"""nn.Linear: z = a Wᵀ + b over the last dimension.

chain:    Jᵀd = d W                      tangent:  J r = r Wᵀ,   ΔW += dᵀ r
backward: ā = z̄ W,  ΔW += z̄ᵀ a,  Δb += Σ z̄
The two ΔW terms cost the same products either way; where they run is a memory choice:
- small batches: both in pass 4 as one doubled-batch product [z̄; d]ᵀ [a; r] (d and r are
  held from passes 2-3 to pass 4; the backend may keep a and r as one (2N, in) buffer from
  the tangent pass on, so that the product reads [a; r] without stacking it then);
- from 2 N (in + out) ≥ in · out on: dᵀ r at once in pass 3, so d and r are released there
  and pass 4 adds z̄ᵀ a into it in place (``acc``; a copy of it under keep_saved). Pass 2
  then keeps d in the form the backend's weight product reads (``kernels.keep_delta``: the cpu
  backend's transposed copy, made once the chain's product is done, instead of d and its
  copy side by side in pass 3, where the step's memory peaks).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..backend_protocol import Backend
from ..registry import register_function, register_module
from .activation import with_act
from .base import Rule, wants_grad


class LinearRule(Rule):
    def __init__(self, module: nn.Linear, kernels: Backend) -> None:
        self.module, self.kernels = module, kernels
        self.w, self.b = module.weight, module.bias
        # the products take the parameters as plain tensors: nothing inside the fused step
        # records an autograd graph, so they are detached once here instead of per product
        self.wd = self.w.detach()
        self.bd = None if self.b is None else self.b.detach()
        self.wp = kernels.product_weight(self.wd)  # as the products read it (autocast: cast once)
        self.need_w, self.need_b = wants_grad(self.w), wants_grad(self.b)
        self.lead = None  # the leading shape of an N-D input (None for the usual (N, in))
        self.a = self.d = self.r = self.gw_tangent = None
        self.term_in_pass_3 = False

    def has_trainable_params(self) -> bool:
        return self.need_w or self.need_b

    def _flat(self, t: Tensor, width: int) -> Tensor:
        return t if self.lead is None else t.reshape(-1, width)

    def _shaped(self, t: Tensor) -> Tensor:
        return t if self.lead is None else t.view(*self.lead, t.shape[-1])

    def forward(self, a: Tensor) -> Tensor:
        in_f = self.w.shape[1]
        if a.dim() < 1 or a.shape[-1] != in_f:
            raise ValueError(f"Linear expects inputs of width {in_f} in the last "
                             f"dimension, got shape {tuple(a.shape)}")
        if a.dim() != 2:
            self.lead = a.shape[:-1]
            a = a.reshape(-1, in_f)
        a = self.kernels.product_input(a)
        if self.need_w:
            self.a = a
        return self._shaped(self.kernels.linear(a, self.wp, self.bd))

    def chain(self, d: Tensor) -> Tensor:
        d2 = self._flat(d, self.w.shape[0])
        u = self._shaped(self.kernels.linear_input_grad(d2, self.wp))
        if self.need_w:
            # where the dᵀ r term runs, decided once: pass 2 keeps d for it, pass 3 follows
            out_f, in_f = self.w.shape
            self.term_in_pass_3 = self.kernels.weight_term_in_tangent_pass(d2.shape[0], out_f,
                                                                           in_f)
            self.d = self.kernels.keep_delta(d2, in_f) if self.term_in_pass_3 else d2
        return u

    def tangent(self, r: Tensor) -> Tensor:
        r2 = self._flat(r, self.w.shape[1])
        if self.need_w:
            if self.term_in_pass_3:
                self.gw_tangent = self.kernels.linear_weight_term(self.d, r2)
                if not self.keep_saved:
                    self.d = None
            else:
                self.a, self.r = self.kernels.weight_grad_operands(self.a, r2)
        return self._shaped(self.kernels.linear(r2, self.wp, None))

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        z = self._flat(abar, self.w.shape[0])
        if self.need_w or self.need_b:
            pairs = [(z, self.a)] if self.r is None else [(z, self.a), (self.d, self.r)]
            acc = self.take_tangent_term() if self.need_w else None
            self.gw, self.gb = self.kernels.linear_param_grads(pairs, acc, self.need_w, self.need_b)
        if not need_input_grad:
            return None
        return self._shaped(self.kernels.linear_input_grad(z, self.wp))

    def param_grads(self):
        out = [(self.w, self.gw)] if self.need_w else []
        return (out + [(self.b, self.gb)]) if self.need_b else out


register_module(nn.Linear)(lambda m: with_act(m, lambda kernels: LinearRule(m, kernels)))


def as_param_of(m: nn.Module, name: str, t: Tensor | None) -> None:
    """Make ``m.<name>`` the very tensor ``t`` (a Parameter stays the same object, so its
    gradient reaches the user's parameter)."""
    m._parameters.pop(name, None)
    if t is None or isinstance(t, nn.Parameter):
        m.register_parameter(name, t)
    else:
        object.__setattr__(m, name, t)


def linear_of(weight: Tensor, bias: Tensor | None = None) -> nn.Linear:
    """An nn.Linear computing ``F.linear(x, weight, bias)`` with these very tensors (a traced
    ``F.linear`` with a module's parameters runs as this module)."""
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    as_param_of(m, "weight", weight)
    as_param_of(m, "bias", bias)
    return m


register_function(F.linear, module=linear_of)
