"""What every drop-in Function shares: backend lookup, activation lookup, which grads to make.

A Function's backward computes an input's gradient only when the autograd engine will use
it. ``ctx.needs_input_grad`` only says an input requires grad; under
``torch.autograd.grad(out, x)`` the weights require grad yet nobody reads their gradient, so
``input_needed`` also asks the engine whether the input's node runs in this backward.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from ..activation_math import ActivationSpec, spec_by_name
from ..backends import get_backend

#: hyper-parameters each named activation takes when none are given (torch.nn's defaults)
_DEFAULT_ACT_ARGS: dict[str, tuple[float, ...]] = {
    "leaky_relu": (0.01,), "softplus": (1.0, 20.0), "elu": (1.0,), "hardtanh": (-1.0, 1.0),
    "celu": (1.0,),
}


def resolve_backend(name: str, device: torch.device):
    """The backend object for ``name`` ("auto", "torch", ...) on ``device``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a backend name (str), got {type(name).__name__}")
    return get_backend(name, device)


def resolve_act(act: str | ActivationSpec | None, act_args: tuple[float, ...] = ()
                ) -> ActivationSpec | None:
    """An activation spec from a name (with optional hyper-parameters), a spec, or None.

    None and "linear" mean no activation. Names: relu, leaky_relu (slope), softplus
    (beta, threshold), tanh, sigmoid, gelu, gelu_tanh, elu (alpha), silu, hardtanh (min, max),
    hardsigmoid, hardswish, mish, selu, celu (alpha), logsigmoid, softsign, tanhshrink.
    """
    if act is None or act == "linear":
        if act_args:
            raise ValueError(f"act_args {act_args} given without an activation")
        return None
    if isinstance(act, ActivationSpec):
        if act_args:
            raise ValueError("act_args cannot be combined with an ActivationSpec")
        return act
    if not isinstance(act, str):
        raise TypeError(f"act must be an activation name, an ActivationSpec or None, got "
                        f"{type(act).__name__}")
    args = tuple(float(v) for v in act_args) or _DEFAULT_ACT_ARGS.get(act, ())
    try:
        return spec_by_name(act, *args)
    except TypeError as e:
        raise ValueError(f"activation {act!r} does not take hyper-parameters {args}") from e


def record_inputs(ctx, *args: object) -> None:
    """Remember which forward arguments are tensors (call first in every forward, with all
    of its arguments in order): the engine keeps an edge for tensor arguments only."""
    pos, k = {}, 0
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            pos[i], k = k, k + 1
    ctx.edge_of = pos


def input_needed(ctx, i: int) -> bool:
    """Whether the backward running now must produce the gradient of forward argument ``i``."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[ctx.edge_of[i]][0]
    if node is None:
        return False
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:  # a torch without the query: compute every requested gradient
        return True
    try:
        return bool(will_execute(node))
    except RuntimeError:
        # a leaf under autograd.grad(): the engine cannot say whether it is captured
        return True


def save_with_act(ctx, tensors: tuple, act_saved: object) -> None:
    """save_for_backward of the inputs and of what ``act_forward`` kept, so autograd's
    version check catches an in-place change of either (the ReLU output, say).

    A state object that holds a tensor in a field ``tensor`` (a smooth activation's output,
    from which its derivatives are recomputed) has that tensor saved the same way: the
    output kept as an attribute of ctx would make a reference cycle (output → grad_fn → ctx →
    output) that is never freed.
    """
    held = getattr(act_saved, "tensor", None)
    if isinstance(act_saved, Tensor):
        ctx.save_for_backward(*tensors, act_saved)
        ctx.act_saved = None
    elif isinstance(held, Tensor):
        ctx.save_for_backward(*tensors, held)
        ctx.act_saved = dataclasses.replace(act_saved, tensor=None)
    else:
        ctx.save_for_backward(*tensors, None)
        ctx.act_saved = act_saved


def activate_and_save(ctx, kernels, spec, z: Tensor, inputs: tuple) -> Tensor:
    """σ(z) (z itself for spec None), saving ``inputs`` and what the activation keeps."""
    if spec is None:
        save_with_act(ctx, inputs, None)
        return z
    y, act_saved = kernels.act_forward(spec, z)
    save_with_act(ctx, inputs, act_saved)
    return y


def load_with_act(ctx, n: int) -> tuple[tuple, object]:
    """The inputs saved by ``save_with_act`` and the activation's saved state (detached:
    the backward treats it as a constant)."""
    *tensors, act = ctx.saved_tensors
    state, act = ctx.act_saved, None if act is None else act.detach()
    if state is None:
        return tuple(tensors), act  # the state was a tensor itself (or there was none)
    return tuple(tensors), state if act is None else dataclasses.replace(state, tensor=act)


class _NoGraphCtx:
    """Stands in for a Function's ctx when its forward is called directly (nothing records a
    graph, so what the forward saves for a backward is dropped)."""

    def save_for_backward(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass


def apply(fn: type[torch.autograd.Function], *args):
    """``fn.apply(*args)``, or, where no graph is being recorded (grad mode off: a backward
    without create_graph, or inference under no_grad), ``fn.forward`` on a stand-in ctx:
    the same values without the autograd Function's per-call bookkeeping, which at small
    sizes costs more than the kernels (every nested Function of a drop-in's backward)."""
    if torch.is_grad_enabled():
        return fn.apply(*args)
    return fn.forward(_NoGraphCtx(), *args)


def last_differentiable(backward):
    """Marks a backward that is not itself differentiable (the last level: second
    derivatives of the op). Asking for a graph through it (create_graph=True, i.e. third
    derivatives) raises instead of silently dropping terms, as once_differentiable can."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{backward.__qualname__.split('.')[0]} is differentiable twice, not three "
                "times: its backward ran with create_graph=True (third derivatives are not "
                "supported here; use plain torch ops for them)")
        return backward(ctx, *grads)

    return run
