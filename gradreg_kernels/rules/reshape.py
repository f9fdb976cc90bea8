"""Flatten, Unflatten, Identity, padding (constant, reflection, replication), the reshapes a
forward writes (view, reshape, flatten, unsqueeze, ...) and means or sums over dims: fixed
linear maps without parameters."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Call, HostArg, Made, TensorArg, flat_args, register_function, register_module
from .base import FixedLinearRule, Rule


class ReshapeRule(FixedLinearRule):
    """A fixed reshape y = R a: its transpose is the inverse reshape."""

    def _transpose(self, d: Tensor) -> Tensor:
        return d.reshape(self.in_shape)


class FlattenRule(ReshapeRule):
    def __init__(self, module: nn.Flatten) -> None:
        self.module = module

    def _apply(self, t: Tensor) -> Tensor:
        return t.flatten(self.module.start_dim, self.module.end_dim)


class UnflattenRule(ReshapeRule):
    def __init__(self, module: nn.Unflatten) -> None:
        self.module = module

    def _apply(self, t: Tensor) -> Tensor:
        return t.unflatten(self.module.dim, self.module.unflattened_size)


class ConstantPadRule(FixedLinearRule):
    """nn.ZeroPad1d/2d/3d, nn.ConstantPad1d/2d/3d: y = P a + c (padding c around a; negative
    amounts crop). The tangent pads r with zeros (P r), chain and backward apply Pᵀ: the
    padding taken off again, a crop being undone with zeros."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.pad = tuple(int(p) for p in module.padding)
        self.unpad = tuple(-p for p in self.pad)

    def forward(self, a: Tensor) -> Tensor:
        return F.pad(a, self.pad, value=float(self.module.value))

    def _apply(self, t: Tensor) -> Tensor:
        return F.pad(t, self.pad)

    def _transpose(self, d: Tensor) -> Tensor:
        return F.pad(d, self.unpad)


class IndexPadRule(FixedLinearRule):
    """Reflection or replication padding: y = P a with P a fixed gather of input positions.
    The tangent applies P (the same padding of r), chain and backward Pᵀ (ATen's padding
    backward: the border values summed back onto the positions they were copied from)."""

    def __init__(self, mode: str, pad: tuple[int, ...], module: nn.Module | None = None) -> None:
        self.module, self.mode, self.pad = module, mode, tuple(int(p) for p in pad)
        kind = "reflection" if mode == "reflect" else "replication"
        self.aten_transpose = getattr(torch.ops.aten,
                                      f"{kind}_pad{len(self.pad) // 2}d_backward")

    def _apply(self, t: Tensor) -> Tensor:
        return F.pad(t, self.pad, mode=self.mode)

    def _transpose(self, d: Tensor) -> Tensor:
        return self.aten_transpose(d, self._shape_only_input(d), list(self.pad))


class IdentityRule(Rule):
    def __init__(self, module: nn.Module) -> None:
        self.module = module


class ShapeRule(ReshapeRule):
    """A reshape written in the forward (``view``, ``reshape``, ``flatten``, ``unsqueeze``,
    ``squeeze``, ``contiguous``): y = ``fn(a)``, which keeps the elements' row-major order, so
    Jᵀ d is d reshaped back to a's shape."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def _apply(self, t: Tensor) -> Tensor:
        return self.fn(t)


class MeanRule(FixedLinearRule):
    """y = a.mean(dims, keepdim) or a.sum(dims, keepdim) (global average pooling written by
    hand): J r is the same reduction of r, Jᵀ d is d / count (1 for a sum) broadcast back
    over the reduced dims."""

    def __init__(self, dims: tuple[int, ...] | None, keepdim: bool, mean: bool) -> None:
        self.dims, self.keepdim, self.mean = dims, keepdim, mean

    def forward(self, a: Tensor) -> Tensor:
        self.in_shape = a.shape
        nd = a.dim()
        self.dims_ = tuple(range(nd)) if self.dims is None else tuple(d % nd for d in self.dims)
        self.count = math.prod(a.shape[d] for d in self.dims_) if self.mean else 1
        return self._apply(a)

    def _apply(self, t: Tensor) -> Tensor:
        if self.mean:
            return t.mean(self.dims_, keepdim=self.keepdim)
        return t.sum(self.dims_, keepdim=self.keepdim)

    def _transpose(self, d: Tensor) -> Tensor:
        if not self.keepdim:
            d = d.reshape([1 if i in self.dims_ else s for i, s in enumerate(self.in_shape)])
        d = d / self.count if self.count != 1 else d
        return d.expand(self.in_shape).contiguous()


# --- registrations ------------------------------------------------------------------------

register_module(nn.Flatten, aliases=True)(lambda m: lambda kernels: FlattenRule(m))
register_module(nn.Unflatten, aliases=True)(lambda m: lambda kernels: UnflattenRule(m))
register_module(nn.Identity, aliases=True)(lambda m: lambda kernels: IdentityRule(m))
register_module(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                nn.ConstantPad3d)(lambda m: lambda kernels: ConstantPadRule(m))

#: reflection / replication padding modules → their F.pad mode
INDEX_PADS = {nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
              nn.ReflectionPad3d: "reflect", nn.ReplicationPad1d: "replicate",
              nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate"}
register_module(*INDEX_PADS)(
    lambda m: lambda kernels: IndexPadRule(INDEX_PADS[type(m)], m.padding, m))


def _tensor_first(call: Call) -> str | None:
    if not call.args or not isinstance(call.args[0], TensorArg):
        return "its first argument is not a tensor computed from the input"
    if any(isinstance(v, TensorArg) for v in flat_args((call.args[1:], call.kwargs))):
        return "it reads a second tensor computed from the input"
    return None


def _shape_op(apply: Callable[..., Tensor]):
    """A reshape call ``apply(t, *args, **kwargs)``; sizes computed at run time (x.size(0))
    are resolved when the rule is made, in pass 1."""

    def factory(call: Call) -> Made | str:
        why = _tensor_first(call)
        if why:
            return why
        rest, kw = call.args[1:], call.kwargs
        if any(isinstance(v, torch.dtype) for v in flat_args((rest, kw))):
            return "a view as another dtype"

        def make(kernels, resolve) -> Rule:
            args, kwargs = resolve(rest), resolve(kw)
            return ShapeRule(lambda t: apply(t, *args, **kwargs))

        return Made([call.args[0]], make, aliases=True)

    return factory


def _reduce_op(mean: bool):
    def factory(call: Call) -> Made | str:
        why = _tensor_first(call)
        if why:
            return why
        dims = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
        keepdim = call.args[2] if len(call.args) > 2 else call.kwargs.get("keepdim", False)
        if call.kwargs.get("dtype") is not None or any(
                isinstance(v, HostArg) for v in flat_args((dims, keepdim))):
            return "a dtype, or dims computed at run time"
        dims = None if dims is None else ((dims,) if isinstance(dims, int) else tuple(dims))
        return Made([call.args[0]], lambda kernels, resolve: MeanRule(dims, bool(keepdim), mean))

    return factory


def _pad(call: Call) -> Made | str:
    why = _tensor_first(call)
    if why:
        return why
    pad = call.args[1] if len(call.args) > 1 else call.kwargs.get("pad")
    mode = call.args[2] if len(call.args) > 2 else call.kwargs.get("mode", "constant")
    value = call.args[3] if len(call.args) > 3 else call.kwargs.get("value")
    if any(isinstance(v, HostArg) for v in flat_args((pad, mode, value))):
        return "padding computed at run time"
    pad = tuple(int(p) for p in pad)
    if mode == "constant":
        shim = nn.ConstantPad1d(0, 0.0 if value is None else float(value))
        shim.padding = pad
        return Made([call.args[0]], lambda kernels, resolve: ConstantPadRule(shim))
    if mode in ("reflect", "replicate"):
        return Made([call.args[0]], lambda kernels, resolve: IndexPadRule(mode, pad))
    return f"mode={mode!r} (constant, reflect and replicate run fused)"


def _reshape_to(t: Tensor, *shape) -> Tensor:
    """``t.view(*shape)`` / ``t.reshape(shape)``: one tuple or the sizes one by one."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    return t.reshape(shape)


def _shape_kw(t: Tensor, shape=None, size=None) -> Tensor:
    return t.reshape(tuple(shape if shape is not None else size))


register_function("view", "reshape", torch.reshape,
                  factory=_shape_op(lambda t, *a, **kw: _shape_kw(t, **kw) if kw
                                    else _reshape_to(t, *a)))
register_function(torch.flatten, "flatten", factory=_shape_op(torch.flatten))
register_function(torch.unflatten, "unflatten", factory=_shape_op(torch.unflatten))
register_function(torch.unsqueeze, "unsqueeze", factory=_shape_op(torch.unsqueeze))
register_function(torch.squeeze, "squeeze", factory=_shape_op(torch.squeeze))
register_function("contiguous", factory=_shape_op(lambda t, *a, **kw: t))
register_function(torch.mean, "mean", factory=_reduce_op(True))
register_function(torch.sum, "sum", factory=_reduce_op(False))
register_function(F.pad, factory=_pad)
