"""Elementwise activations a = σ(z) (σ, σ', σ'' in activation_math.py).

chain:    σ'(z) ⊙ d, keeping u = d for smooth σ
tangent:  σ'(z) ⊙ r, and s = σ''(z) ⊙ u ⊙ r (smooth σ only: the extra gradient at z)
backward: σ'(z) ⊙ ā + s
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activation_math import ActivationSpec, activation_spec
from ..activation_table import MODULE_TYPES
from ..backend_protocol import Backend
from ..registry import register_function, register_module
from .base import Rule
from .residual import SequenceRule


class ActivationRule(Rule):
    def __init__(self, module: nn.Module, spec: ActivationSpec, kernels: Backend) -> None:
        self.module, self.spec, self.kernels = module, spec, kernels
        self.u = self.s = None

    def forward(self, a: Tensor) -> Tensor:
        y, self.saved = self.kernels.act_forward(self.spec, a)
        return y

    def chain(self, d: Tensor) -> Tensor:
        if self.spec.smooth:
            self.u = d
        return self.kernels.act_chain(self.spec, self.saved, d)

    def tangent(self, r: Tensor) -> Tensor:
        out, self.s = self.kernels.act_tangent(self.spec, self.saved, r, self.u)
        if not self.keep_saved:
            self.u = None
        return out

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        if not need_input_grad:
            return None
        return self.kernels.act_backward(self.spec, self.saved, abar, self.s)


def with_act(m: nn.Module, make: Callable[[object], Rule]) -> Callable[[object], Rule]:
    """The layer's rule, then its fused activation's (a drop-in Linear / Conv2d with ``act``,
    read when the rules are made: a kept plan follows a changed ``act``)."""

    def made(kernels) -> Rule:
        spec = getattr(m, "act", None)
        layer = make(kernels)
        return layer if spec is None else SequenceRule([layer, ActivationRule(m, spec, kernels)], m)

    return made


#: every activation module type (each one's parameters are read when its rule is made)
ACTIVATION_TYPES = MODULE_TYPES + (nn.ReLU6,)  # the table's, and ReLU6 (a Hardtanh)
register_module(*ACTIVATION_TYPES)(
    lambda m: lambda kernels: ActivationRule(m, activation_spec(m), kernels))


def _no_inplace(ctor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A module constructor that also takes (and ignores) ``inplace``: the plan reads it."""

    def made(*args, inplace: bool = False, **kwargs) -> nn.Module:
        return ctor(*args, **kwargs)

    return made


# the functional and method forms: the call is the module run on its first argument
register_function(F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_",
                  module=_no_inplace(nn.ReLU))
register_function(F.leaky_relu, F.leaky_relu_,
                  module=_no_inplace(lambda negative_slope=0.01: nn.LeakyReLU(negative_slope)))
register_function(F.softplus, module=lambda beta=1.0, threshold=20.0: nn.Softplus(beta,
                                                                                   threshold))
register_function(torch.tanh, F.tanh, "tanh", "tanh_", module=nn.Tanh)
register_function(torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_", module=nn.Sigmoid)
register_function(F.gelu, module=lambda approximate="none": nn.GELU(approximate))
register_function(F.elu, F.elu_, module=_no_inplace(lambda alpha=1.0: nn.ELU(alpha)))
register_function(F.silu, module=_no_inplace(nn.SiLU))
register_function(F.mish, module=_no_inplace(nn.Mish))
register_function(F.relu6, module=_no_inplace(nn.ReLU6))
register_function(F.hardtanh, F.hardtanh_, module=_no_inplace(
    lambda min_val=-1.0, max_val=1.0: nn.Hardtanh(min_val, max_val)))
register_function(F.hardsigmoid, module=_no_inplace(nn.Hardsigmoid))
register_function(F.hardswish, module=_no_inplace(nn.Hardswish))
register_function(F.selu, torch.selu, module=_no_inplace(nn.SELU))
register_function(F.celu, torch.celu, module=_no_inplace(lambda alpha=1.0: nn.CELU(alpha)))
register_function(F.logsigmoid, module=nn.LogSigmoid)
register_function(F.softsign, module=nn.Softsign)
register_function(F.tanhshrink, module=nn.Tanhshrink)
