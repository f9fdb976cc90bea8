"""nn.ConvTranspose2d (padding_mode 'zeros'; any stride / padding / output_padding / dilation /
groups, bias or not): z = A_W a + b, A_W the transposed convolution (N, C, H, W) →
(N, O, H', W'), H' = (H − 1)·s − 2p + dil·(k − 1) + op + 1 (the module's plain forward(a); a
call with output_size is not what this rule runs). The weight W is (C, O/G, kH, kW).

chain:    Jᵀd = A_Wᵀ d (an ordinary convolution W ⋆ d, cut to H × W)
tangent:  J r = A_W r,   ΔW += G(d, r)
backward: ā = A_Wᵀ z̄,  ΔW += G(z̄, a),  Δb += Σ_{n,h,w} z̄
G(d, x) = ∂⟨d, A_W x⟩/∂W is the transposed convolution's weight gradient. As in Conv2dRule,
G(d, r) is computed in the tangent pass, so d and r (activation-sized) are released there
instead of in pass 4; a is saved only when W wants a gradient.

A_Wᵀ is the adjoint of the transposed convolution, i.e. the convolution whose input gradient
A_W is: conv2d(d, W) with the module's stride, padding, dilation and groups gives
H + ⌊op/s⌋ rows (op < s, the usual case, gives H exactly), of which the first H are A_Wᵀ d
(the rows past H belong to input positions a transposed convolution of an H-row input never
reads). Everything runs on torch ops that every device has (F.conv_transpose2d, F.conv2d,
aten.convolution_backward), not on the backend object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_module
from .base import Rule, wants_grad


def conv_transpose2d_unsupported(m: nn.ConvTranspose2d) -> str | None:
    """Why ``ConvTranspose2dRule`` cannot run ``m``, or None when it can (padding_mode 'zeros'
    with integer padding, which is all that nn.ConvTranspose2d's forward accepts)."""
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only 'zeros' runs fused)"
    if not all(isinstance(p, int) for p in m.padding):
        return f"padding={m.padding!r} (only integer padding runs fused)"
    return None


def _common(x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x, y and w in the promoted dtype of x and y (d and a differ under autocast)."""
    dt = torch.promote_types(x.dtype, y.dtype)
    return x.to(dt), y.to(dt), w.to(dt)


class ConvTranspose2dRule(Rule):
    """The four passes of one nn.ConvTranspose2d (see the module docstring).

    Shapes: a, r (N, C, H, W); z, d, z̄ (N, O, H', W'); W (C, O/G, kH, kW); b (O,).
    """

    def __init__(self, module: nn.ConvTranspose2d, kernels: object) -> None:
        reason = conv_transpose2d_unsupported(module)
        if reason is not None:
            raise ValueError(f"ConvTranspose2dRule: {reason}")
        self.module, self.kernels = module, kernels
        self.w, self.b = module.weight, module.bias
        self.stride = tuple(int(s) for s in module.stride)
        self.padding = tuple(int(p) for p in module.padding)
        self.output_padding = tuple(int(p) for p in module.output_padding)
        self.dilation = tuple(int(d) for d in module.dilation)
        self.groups = int(module.groups)
        self.need_w = wants_grad(self.w)
        self.a = self.d = self.gw_tangent = None

    # ---- the three operators ------------------------------------------------------------
    def _apply(self, x: Tensor, b: Tensor | None) -> Tensor:
        """A_W x (+ b): (N, C, H, W) → (N, O, H', W')."""
        return F.conv_transpose2d(x, self.w, b, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)

    def _transpose(self, d: Tensor) -> Tensor:
        """A_Wᵀ d: (N, O, H', W') → (N, C, H, W) (the convolution, cut to the input's size)."""
        x = F.conv2d(d, self.w, None, self.stride, self.padding, self.dilation, self.groups)
        h, w = self.in_shape[2], self.in_shape[3]
        if x.shape[2] != h or x.shape[3] != w:  # output_padding ≥ stride (dilation > stride)
            x = x[:, :, :h, :w].contiguous()
        return x

    def _weight_grad(self, d: Tensor, x: Tensor) -> Tensor:
        """G(d, x) = ∂⟨d, A_W x⟩/∂W, the shape of W: d (N, O, H', W'), x (N, C, H, W)."""
        d, x, w = _common(d, x, self.w)
        return torch.ops.aten.convolution_backward(
            d, x, w, None, self.stride, self.padding, self.dilation, True,
            self.output_padding, self.groups, (False, True, False))[1]

    # ---- the four passes ----------------------------------------------------------------
    def forward(self, a: Tensor) -> Tensor:
        self.in_shape = a.shape
        if self.need_w:
            self.a = a
        return self._apply(a, self.b)

    def chain(self, d: Tensor) -> Tensor:
        if self.need_w:
            self.d = d
        return self._transpose(d)

    def tangent(self, r: Tensor) -> Tensor:
        if self.need_w:
            self.gw_tangent = self._weight_grad(self.d, r)
            if not self.keep_saved:
                self.d = None
        return self._apply(r, None)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        if self.need_w:
            self.gw = self.add_tangent_term(self._weight_grad(abar, self.a))
        if wants_grad(self.b):
            self.gb = abar.sum((0, 2, 3))
        if not need_input_grad:
            return None
        return self._transpose(abar)

    def param_grads(self) -> list[tuple[nn.Parameter, Tensor]]:
        out = [(self.w, self.gw)] if self.need_w else []
        return out + ([(self.b, self.gb)] if wants_grad(self.b) else [])


def _conv_transpose2d(m: nn.ConvTranspose2d):
    return conv_transpose2d_unsupported(m) or (lambda kernels: ConvTranspose2dRule(m, kernels))


register_module(nn.ConvTranspose2d, options=lambda m: (m.padding_mode, m.padding))(
    _conv_transpose2d)
