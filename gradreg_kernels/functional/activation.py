"""bias_act: y = σ(x + b), and the activation step shared by the fused linear / conv ops.

With z = x + b (b broadcast along ``dim``), a = σ(z):
    backward:            dz = σ'(z) ⊙ dy,  dx = dz,  db = Σ_{all dims but dim} dz
    backward of that:    for a gradient g at dz,
                         d(dy) = σ'(z) ⊙ g             (the same step again: linear in dy)
                         d(z)  = σ''(z) ⊙ dy ⊙ g        (skipped where σ'' ≡ 0: ReLU, LeakyReLU)
d(z) reaches whatever made z (x and b here; a, W, b of a fused linear or convolution)
through a ``pullback``: s ↦ the gradients of those inputs for a gradient s at z.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ..activation_math import ActivationSpec
from ..autocast import Function
from ._common import (
    apply,
    input_needed,
    last_differentiable,
    load_with_act,
    record_inputs,
    resolve_act,
    resolve_backend,
    save_with_act,
)

#: s, the inputs z was made from, which of them need a gradient → their gradients
Pullback = Callable[[Tensor, Sequence[Tensor | None], Sequence[bool]], Sequence[Tensor | None]]


class ActivationGrad(Function):
    """dz = σ'(z) ⊙ dy, differentiable in dy and (for smooth σ) in what z was made from.

    apply(dy, saved, spec, kernels, pullback, *sources): ``saved`` is what ``kernels.act_forward``
    kept (a mask or z itself, a constant here); ``sources`` are the tensors z was computed
    from, passed only so the second-order term σ''(z) ⊙ dy ⊙ g can reach them.
    """

    @staticmethod
    def forward(ctx, dy: Tensor, saved, spec: ActivationSpec, kernels, pullback: Pullback,
                *sources: Tensor | None) -> Tensor:
        record_inputs(ctx, dy, saved, spec, kernels, pullback, *sources)
        ctx.n_src = len(sources)
        ctx.spec, ctx.kernels, ctx.pullback, ctx.saved = spec, kernels, pullback, saved
        if spec.smooth:
            ctx.save_for_backward(dy, *sources)
        ctx.set_materialize_grads(False)
        return kernels.act_chain(spec, saved, dy)

    @staticmethod
    @last_differentiable
    def backward(ctx, g: Tensor | None):
        n_src = ctx.n_src
        if g is None:
            return (None,) * (5 + n_src)
        spec, kernels = ctx.spec, ctx.kernels
        dy, src = None, ()
        if spec.smooth:
            dy, *src = ctx.saved_tensors
        d_dy, s = kernels.act_tangent(spec, ctx.saved, g, dy)
        src_grads: Sequence[Tensor | None] = (None,) * n_src
        if s is not None:
            needs = [input_needed(ctx, 5 + i) for i in range(n_src)]
            if any(needs):
                src_grads = ctx.pullback(s, src, needs)
        return (d_dy if input_needed(ctx, 0) else None, None, None, None, None, *src_grads)


def _bias_shape(b: Tensor, x: Tensor, dim: int) -> list[int]:
    shape = [1] * x.dim()
    shape[dim] = b.numel()
    return shape


def _bias_pullback(dim: int) -> Pullback:
    def pull(s: Tensor, src, needs):
        dims = [i for i in range(s.dim()) if i != dim]
        return (s if needs[0] else None, s.sum(dims) if needs[1] else None)
    return pull


class _BiasAct(Function):
    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor | None, spec: ActivationSpec, kernels,
                dim: int) -> Tensor:
        record_inputs(ctx, x, b, spec, kernels, dim)
        z = x if b is None else x + b.view(_bias_shape(b, x, dim))
        y, saved = kernels.act_forward(spec, z)
        ctx.spec, ctx.kernels, ctx.dim = spec, kernels, dim
        save_with_act(ctx, (x, b), saved)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        if dy is None:
            return None, None, None, None, None
        (x, b), act_saved = load_with_act(ctx, 2)
        dz = apply(ActivationGrad, dy, act_saved, ctx.spec, ctx.kernels,
                   _bias_pullback(ctx.dim), x, b)
        dims = [i for i in range(dz.dim()) if i != ctx.dim]
        db = dz.sum(dims) if b is not None and input_needed(ctx, 1) else None
        return dz, db, None, None, None


def bias_act(x: Tensor, b: Tensor | None = None, act: str | ActivationSpec | None = "linear",
             act_args: Sequence[float] = (), dim: int = 1, backend: str = "auto") -> Tensor:
    """y = σ(x + b), with b (C,) added along dimension ``dim`` of x; twice differentiable.

    act: an activation name ("relu", "leaky_relu", "softplus", "tanh", "sigmoid", "gelu",
    "gelu_tanh", "elu", "silu", "hardtanh", "hardsigmoid", "hardswish", "mish", "selu",
    "celu", "logsigmoid", "softsign", "tanhshrink"; "linear" or None for none), with
    ``act_args`` its hyper-parameters (torch.nn's defaults when empty), or an ActivationSpec.
    """
    spec = resolve_act(act, tuple(act_args))
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if b is not None:
        if x.dim() == 0 or not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim={dim} is out of range for x of shape {tuple(x.shape)}")
        dim = dim % x.dim()
        if b.dim() != 1 or b.numel() != x.shape[dim]:
            raise ValueError(f"b must have shape ({x.shape[dim]},) to match dim {dim} of x "
                             f"{tuple(x.shape)}, got {tuple(b.shape)}")
    if spec is None:
        return x if b is None else x + b.view(_bias_shape(b, x, dim))
    return _BiasAct.apply(x, b, spec, resolve_backend(backend, x.device), dim)
