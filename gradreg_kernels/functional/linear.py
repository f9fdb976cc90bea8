"""linear_act: y = σ(a Wᵀ + b) over the last dimension, twice differentiable.

The products come from the backend (``linear``, ``linear_input_grad``,
``linear_weight_grad``). Both gradient products are bilinear, so each one's backward is
made of the other two products:
    LinearInputGrad  (d, W) ↦ d W:    for g (N, in):  d(d) = g Wᵀ,   d(W) = dᵀ g
    LinearWeightGrad (d, a) ↦ dᵀ a:   for G (out, in): d(d) = a Gᵀ,   d(a) = d G
and every derivative stays inside these three Functions, to any order.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..activation_math import ActivationSpec
from ..autocast import Function
from ._common import (
    activate_and_save,
    apply,
    input_needed,
    load_with_act,
    record_inputs,
    resolve_act,
    resolve_backend,
)
from .activation import ActivationGrad


class LinearInputGrad(Function):
    """d W: (N, out), (out, in) → (N, in)."""

    @staticmethod
    def forward(ctx, d: Tensor, w: Tensor, kernels) -> Tensor:
        record_inputs(ctx, d, w, kernels)
        ctx.kernels = kernels
        ctx.save_for_backward(d, w)
        ctx.set_materialize_grads(False)
        return kernels.linear_input_grad(d, w)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is None:
            return None, None, None
        d, w = ctx.saved_tensors
        gd = apply(LinearAct, g, w, None, None, ctx.kernels) if input_needed(ctx, 0) else None
        gw = apply(LinearWeightGrad, d, g, ctx.kernels) if input_needed(ctx, 1) else None
        return gd, gw, None


class LinearWeightGrad(Function):
    """dᵀ a: (N, out), (N, in) → (out, in)."""

    @staticmethod
    def forward(ctx, d: Tensor, a: Tensor, kernels) -> Tensor:
        record_inputs(ctx, d, a, kernels)
        ctx.kernels = kernels
        ctx.save_for_backward(d, a)
        ctx.set_materialize_grads(False)
        return kernels.linear_weight_grad([(d, a)])

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is None:
            return None, None, None
        d, a = ctx.saved_tensors
        gd = apply(LinearAct, a, g, None, None, ctx.kernels) if input_needed(ctx, 0) else None
        ga = apply(LinearInputGrad, d, g, ctx.kernels) if input_needed(ctx, 1) else None
        return gd, ga, None


def _linear_pullback(kernels):
    """s at z = a Wᵀ + b ↦ (s W, sᵀ a, Σ_n s) for (a, W, b)."""
    def pull(s: Tensor, src, needs):
        a, w, _ = src
        gw, gb = kernels.linear_param_grads([(s, a)], None, needs[1], needs[2])
        return (kernels.linear_input_grad(s, w) if needs[0] else None), gw, gb
    return pull


class LinearAct(Function):
    """σ(a Wᵀ + b) for 2-D a (N, in); spec None means no activation."""

    @staticmethod
    def forward(ctx, a: Tensor, w: Tensor, b: Tensor | None, spec: ActivationSpec | None,
                kernels) -> Tensor:
        record_inputs(ctx, a, w, b, spec, kernels)
        ctx.spec, ctx.kernels = spec, kernels
        ctx.set_materialize_grads(False)
        return activate_and_save(ctx, kernels, spec, kernels.linear(a, w, b), (a, w, b))

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        if dy is None:
            return None, None, None, None, None
        (a, w, b), act_saved = load_with_act(ctx, 3)
        kernels, spec = ctx.kernels, ctx.spec
        dz = dy
        if spec is not None:
            dz = apply(ActivationGrad, dy, act_saved, spec, kernels,
                       _linear_pullback(kernels), a, w, b)
        da = apply(LinearInputGrad, dz, w, kernels) if input_needed(ctx, 0) else None
        dw = apply(LinearWeightGrad, dz, a, kernels) if input_needed(ctx, 1) else None
        db = dz.sum(0) if b is not None and input_needed(ctx, 2) else None
        return da, dw, db, None, None


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None = None,
               act: str | ActivationSpec | None = "linear", act_args: Sequence[float] = (),
               backend: str = "auto") -> Tensor:
    """y = σ(x Wᵀ + b): x (..., in), W (out, in), b (out,) → (..., out); twice differentiable.

    ``act`` / ``act_args`` as in ``bias_act``; bias and activation are applied in one step.
    """
    spec = resolve_act(act, tuple(act_args))
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension must be in_features={in_f}, got shape "
                         f"{tuple(x.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    kernels = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    y = apply(LinearAct, x.reshape(-1, in_f), weight, bias, spec, kernels)
    return y.view(*lead, out_f)
