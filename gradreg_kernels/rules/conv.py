"""nn.Conv2d (zero padding, any stride / padding / dilation / groups): z = W ⋆ a + b; nn.Conv1d
as a Conv2d of height 1.

chain:    Jᵀd = Wᵀ ⋆ d (transposed convolution)     tangent:  J r = W ⋆ r,   ΔW += G(d, r)
backward: ā = Wᵀ ⋆ z̄,  ΔW += G(z̄, a),  Δb += Σ_{n,h,w} z̄
G(d, a) = ∂⟨d, W ⋆ a⟩/∂W is the convolution's weight gradient. G(d, r) is computed in the
tangent pass, so d and r (activation-sized) are released there instead of in pass 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend_protocol import Backend
from ..registry import register_function, register_module
from .activation import with_act
from .base import Rule, wants_grad
from .height_one import HeightOneRule
from .linear import as_param_of
from .reshape import IndexPadRule
from .residual import SequenceRule


def conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric integer padding of a Conv2d, or None when 'same' needs asymmetric padding."""
    p = module.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        pads = []
        for k, dil in zip(module.kernel_size, module.dilation):
            total = dil * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(p[0]), int(p[1]))


class Conv2dRule(Rule):
    def __init__(self, module: nn.Conv2d, kernels: Backend) -> None:
        self.module, self.kernels = module, kernels
        self.w, self.b = module.weight, module.bias
        self.geom = (tuple(module.stride), conv_padding(module), tuple(module.dilation),
                     module.groups)
        self.need_w = wants_grad(self.w)
        self.wp = kernels.product_weight(self.w.detach())  # as the products read it
        self.a = self.d = self.gw_tangent = None

    def forward(self, a: Tensor) -> Tensor:
        self.in_shape = a.shape
        if self.need_w:
            self.a = a
        return self.kernels.conv2d(a, self.wp, self.b, self.geom)

    def chain(self, d: Tensor) -> Tensor:
        if self.need_w:
            self.d = d
        return self.kernels.conv2d_input_grad(d, self.wp, self.in_shape, self.geom)

    def tangent(self, r: Tensor) -> Tensor:
        if self.need_w:
            self.gw_tangent = self.kernels.conv2d_weight_grad([(self.d, r)], self.wp, self.geom)
            if not self.keep_saved:
                self.d = None
        return self.kernels.conv2d(r, self.wp, None, self.geom)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        if self.need_w:
            gw = self.kernels.conv2d_weight_grad([(abar, self.a)], self.wp, self.geom)
            self.gw = self.add_tangent_term(gw)
        if wants_grad(self.b):
            self.gb = self.kernels.conv2d_bias_grad(abar)
        if not need_input_grad:
            return None
        return self.kernels.conv2d_input_grad(abar, self.wp, self.in_shape, self.geom)

    def param_grads(self):
        out = [(self.w, self.gw)] if self.need_w else []
        return out + ([(self.b, self.gb)] if wants_grad(self.b) else [])


class UnpaddedConv2dRule(Conv2dRule):
    """The convolution of a Conv2d whose padding runs as a rule of its own (padding_mode
    'reflect' / 'replicate': pad first, then convolve without padding, as torch does)."""

    def __init__(self, module: nn.Conv2d, kernels: Backend) -> None:
        super().__init__(module, kernels)
        stride, _, dilation, groups = self.geom
        self.geom = (stride, (0, 0), dilation, groups)


def conv1d_padding(module: nn.Conv1d) -> int | None:
    """Symmetric integer padding of a Conv1d, or None when 'same' needs asymmetric padding."""
    p = module.padding
    if p == "valid":
        return 0
    if p == "same":
        total = module.dilation[0] * (module.kernel_size[0] - 1)
        return None if total % 2 else total // 2
    return int(p[0])


class Conv1dRule(Conv2dRule):
    """nn.Conv1d as a Conv2d of height 1, to run inside a ``HeightOneRule`` on (N, C, 1, L):
    the kernel (O, C/G, 1, K), stride (1, s), padding (0, p) and dilation (1, d); every pass
    of the 2-D rule unchanged, its weight gradient viewed back as (O, C/G, K)."""

    def __init__(self, module: nn.Conv1d, kernels: Backend) -> None:
        self.module, self.kernels = module, kernels
        self.w, self.b = module.weight.detach().unsqueeze(2), module.bias
        self.geom = ((1, module.stride[0]), (0, conv1d_padding(module)),
                     (1, module.dilation[0]), module.groups)
        self.need_w = wants_grad(module.weight)
        self.wp = kernels.product_weight(self.w)
        self.a = self.d = self.gw_tangent = None

    def param_grads(self):
        out = [(self.module.weight, self.gw.squeeze(2))] if self.need_w else []
        return out + ([(self.b, self.gb)] if wants_grad(self.b) else [])


def _conv2d(m: nn.Conv2d):
    if m.padding_mode in ("reflect", "replicate"):  # torch pads, then convolves unpadded
        pad = tuple(m._reversed_padding_repeated_twice)
        return with_act(m, lambda kernels: SequenceRule(
            [IndexPadRule(m.padding_mode, pad), UnpaddedConv2dRule(m, kernels)], m))
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (zeros, reflect and replicate run fused)"
    if conv_padding(m) is None:
        return "padding='same' with an even kernel extent needs asymmetric padding"
    return with_act(m, lambda kernels: Conv2dRule(m, kernels))


def _conv1d(m: nn.Conv1d):
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only 'zeros' runs fused)"
    if conv1d_padding(m) is None:
        return "padding='same' with an even kernel extent needs asymmetric padding"
    return lambda kernels: HeightOneRule(Conv1dRule(m, kernels), m)


def _conv_options(m: nn.Module) -> tuple:
    return m.padding_mode, m.padding


register_module(nn.Conv2d, options=_conv_options)(_conv2d)
register_module(nn.Conv1d, options=_conv_options)(_conv1d)


def conv_of(cls: type, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
            dilation=1, groups: int = 1) -> nn.Module:
    """An nn.Conv1d / nn.Conv2d computing ``F.conv1d`` / ``F.conv2d`` with these very tensors
    and this geometry (a traced functional convolution runs as this module)."""
    m = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
            padding=padding, dilation=dilation, groups=groups, bias=bias is not None,
            device="meta")
    as_param_of(m, "weight", weight)
    as_param_of(m, "bias", bias)
    return m


register_function(F.conv2d, torch.conv2d, module=lambda *a, **kw: conv_of(nn.Conv2d, *a, **kw))
register_function(F.conv1d, torch.conv1d, module=lambda *a, **kw: conv_of(nn.Conv1d, *a, **kw))
