"""conv2d_act: y = σ(W ⋆ a + b) (2-D cross-correlation, zero padding), twice differentiable.

The products come from the backend (``conv2d``, ``conv2d_input_grad`` = Wᵀ ⋆ d,
``conv2d_weight_grad`` = G(d, a) = ∂⟨d, W ⋆ a⟩/∂W). Both gradient products are bilinear,
and each one's backward is made of the other two products:
    Conv2dInputGrad  (d, W) ↦ Wᵀ ⋆ d:   for g (N, C, H, W):  d(d) = W ⋆ g,   d(W) = G(d, g)
    Conv2dWeightGrad (d, a) ↦ G(d, a):  for G like W:        d(d) = G ⋆ a,   d(a) = Gᵀ ⋆ d
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.nn.modules.utils import _pair

from ..activation_math import ActivationSpec
from ..autocast import Function
from ..tensor_ops import ConvGeom
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


def _shape_only(like: Tensor, shape: Sequence[int]) -> Tensor:
    """An uninitialised tensor of ``shape``, for kernels that only read a shape from it
    (contiguous: kernels copy an expanded one to make it contiguous)."""
    return like.new_empty(shape)


class Conv2dInputGrad(Function):
    """Wᵀ ⋆ d: (N, O, H', W') → (N, C, H, W) with (N, C, H, W) = in_shape."""

    @staticmethod
    def forward(ctx, d: Tensor, w: Tensor, in_shape: tuple[int, ...], geom: ConvGeom,
                kernels) -> Tensor:
        record_inputs(ctx, d, w, in_shape, geom, kernels)
        ctx.geom, ctx.kernels = geom, kernels
        ctx.save_for_backward(d, w)
        ctx.set_materialize_grads(False)
        return kernels.conv2d_input_grad(d, w, in_shape, geom)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is None:
            return None, None, None, None, None
        d, w = ctx.saved_tensors
        geom, kernels = ctx.geom, ctx.kernels
        gd = apply(Conv2dAct, g, w, None, geom, None, kernels) if input_needed(ctx, 0) else None
        gw = (apply(Conv2dWeightGrad, d, g, tuple(w.shape), geom, kernels)
              if input_needed(ctx, 1) else None)
        return gd, gw, None, None, None


class Conv2dWeightGrad(Function):
    """G(d, a): (N, O, H', W'), (N, C, H, W) → w_shape (O, C/groups, kh, kw)."""

    @staticmethod
    def forward(ctx, d: Tensor, a: Tensor, w_shape: tuple[int, ...], geom: ConvGeom,
                kernels) -> Tensor:
        record_inputs(ctx, d, a, w_shape, geom, kernels)
        ctx.geom, ctx.kernels = geom, kernels
        ctx.save_for_backward(d, a)
        ctx.set_materialize_grads(False)
        return kernels.conv2d_weight_grad([(d, a)], _shape_only(d, w_shape), geom)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is None:
            return None, None, None, None, None
        d, a = ctx.saved_tensors
        geom, kernels = ctx.geom, ctx.kernels
        gd = apply(Conv2dAct, a, g, None, geom, None, kernels) if input_needed(ctx, 0) else None
        ga = (apply(Conv2dInputGrad, d, g, tuple(a.shape), geom, kernels)
              if input_needed(ctx, 1) else None)
        return gd, ga, None, None, None


def _conv_pullback(kernels, geom: ConvGeom):
    """s at z = W ⋆ a + b ↦ (Wᵀ ⋆ s, G(s, a), Σ_{n,h,w} s) for (a, W, b)."""
    def pull(s: Tensor, src, needs):
        a, w, _ = src
        return (kernels.conv2d_input_grad(s, w, a.shape, geom) if needs[0] else None,
                kernels.conv2d_weight_grad([(s, a)], w, geom) if needs[1] else None,
                s.sum((0, 2, 3)) if needs[2] else None)
    return pull


class Conv2dAct(Function):
    """σ(W ⋆ a + b) for a (N, C, H, W); spec None means no activation."""

    @staticmethod
    def forward(ctx, a: Tensor, w: Tensor, b: Tensor | None, geom: ConvGeom,
                spec: ActivationSpec | None, kernels) -> Tensor:
        record_inputs(ctx, a, w, b, geom, spec, kernels)
        ctx.geom, ctx.spec, ctx.kernels = geom, spec, kernels
        ctx.set_materialize_grads(False)
        return activate_and_save(ctx, kernels, spec, kernels.conv2d(a, w, b, geom), (a, w, b))

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        if dy is None:
            return (None,) * 6
        (a, w, b), act_saved = load_with_act(ctx, 3)
        geom, spec, kernels = ctx.geom, ctx.spec, ctx.kernels
        dz = dy
        if spec is not None:
            dz = apply(ActivationGrad, dy, act_saved, spec, kernels,
                       _conv_pullback(kernels, geom), a, w, b)
        da = (apply(Conv2dInputGrad, dz, w, tuple(a.shape), geom, kernels)
              if input_needed(ctx, 0) else None)
        dw = (apply(Conv2dWeightGrad, dz, a, tuple(w.shape), geom, kernels)
              if input_needed(ctx, 1) else None)
        db = dz.sum((0, 2, 3)) if b is not None and input_needed(ctx, 2) else None
        return da, dw, db, None, None, None


def conv2d_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
               dilation=1, groups: int = 1, act: str | ActivationSpec | None = "linear",
               act_args: Sequence[float] = (), backend: str = "auto") -> Tensor:
    """y = σ(W ⋆ x + b): x (N, C, H, W), W (O, C/groups, kh, kw), b (O,) → (N, O, H', W').

    stride / padding / dilation: ints or pairs (symmetric zero padding, as F.conv2d);
    ``act`` / ``act_args`` as in ``bias_act``. Twice differentiable.
    """
    spec = resolve_act(act, tuple(act_args))
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d_act needs 4-D x and weight, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects "
                         f"{weight.shape[1] * groups} (= {weight.shape[1]} × groups {groups})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(padding, str):
        raise ValueError("conv2d_act takes integer padding; resolve 'same'/'valid' first")
    geom = (tuple(_pair(stride)), tuple(_pair(padding)), tuple(_pair(dilation)), int(groups))
    return apply(Conv2dAct, x, weight, bias, geom, spec, resolve_backend(backend, x.device))
