"""The linear nodes of a traced forward: sums, constant scalings, concatenation and pieces.

All but the product are linear in their tensor inputs with fixed coefficients, so their
passes have no second-order term and keep no activation (docs/math.md, "Graphs"):

- ``SumRule``          y = Σ_i c_i a_i (``a + b``, ``a - b``, ``torch.add(a, b, alpha=)``, ``+=``),
                        broadcasting: J_iᵀ d = c_i d summed down to a_i's shape;
- ``ProductRule``      y = a ⊙ b (a gate): bilinear, with a second-order term per input;
- ``ScaleShiftRule``   y = c a + k (``x * 0.5``, ``x / 2``, ``-x``, ``1 - x``): J = c;
- ``CatRule``          y = [a_1; ...; a_k] along a dim: J_iᵀ d is d's i-th block;
- ``PieceRule``        y = the i-th piece of ``chunk`` / ``split`` of a: J is a narrow, Jᵀ d
                        is d written into zeros of a's shape.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from ..registry import Call, HostArg, Made, TensorArg, flat_args, register_function
from .base import FixedLinearRule, MultiInputRule


def _reduced(g: Tensor, shape: torch.Size) -> Tensor:
    """g summed over the dimensions that broadcasting expanded from ``shape``."""
    return g if g.shape == shape else g.sum_to_size(shape)


class SumRule(MultiInputRule):
    """y = Σ_i c_i a_i with constant coefficients (broadcasting like torch's add)."""

    def __init__(self, coefs: tuple[float, ...]) -> None:
        self.coefs = coefs
        self.shapes: list[torch.Size] = []

    def _combine(self, ts: tuple[Tensor, ...]) -> Tensor:
        c0 = self.coefs[0]
        out = ts[0] if c0 == 1 else ts[0] * c0
        for c, t in zip(self.coefs[1:], ts[1:]):
            out = torch.add(out, t, alpha=c)  # a new tensor: no input is written
        return out

    def _adjoints(self, d: Tensor) -> tuple[Tensor, ...]:
        return tuple(_reduced(d if c == 1 else d * c, s) for c, s in zip(self.coefs, self.shapes))

    def forward(self, *a: Tensor) -> Tensor:
        self.shapes = [t.shape for t in a]
        return self._combine(a)

    def chain(self, d: Tensor) -> tuple[Tensor, ...]:
        return self._adjoints(d)

    def tangent(self, *r: Tensor) -> Tensor:
        return self._combine(r)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> tuple[Tensor, ...] | None:
        return self._adjoints(abar) if need_input_grad else None


class ProductRule(MultiInputRule):
    """y = a ⊙ b for two tensors computed from the input (a gate, broadcasting): bilinear, so
    its chain reads the forward values and pass 3 keeps a second-order term at each input.

    chain:    (R_a(b ⊙ d), R_b(a ⊙ d))                 (R: sum down to the input's shape)
    tangent:  r_a ⊙ b + a ⊙ r_b,  s_a = R_a(d ⊙ r_b),  s_b = R_b(d ⊙ r_a)
    backward: (R_a(b ⊙ ā) + s_a, R_b(a ⊙ ā) + s_b)
    """

    def __init__(self) -> None:
        self.a = self.b = self.d = self.s = None

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        self.a, self.b, self.shapes = a, b, (a.shape, b.shape)
        return a * b

    def chain(self, d: Tensor) -> tuple[Tensor, Tensor]:
        self.d = d
        return _reduced(d * self.b, self.shapes[0]), _reduced(d * self.a, self.shapes[1])

    def tangent(self, ra: Tensor, rb: Tensor) -> Tensor:
        d = self.d
        self.s = (_reduced(d * rb, self.shapes[0]), _reduced(d * ra, self.shapes[1]))
        if not self.keep_saved:
            self.d = None
        return ra * self.b + self.a * rb

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> tuple[Tensor, ...] | None:
        s = self.s
        if not self.keep_saved:
            self.s = None
        if not need_input_grad:
            return None
        ga = _reduced(abar * self.b, self.shapes[0])
        gb = _reduced(abar * self.a, self.shapes[1])
        return (ga, gb) if s is None else (ga + s[0], gb + s[1])


class ScaleShiftRule(FixedLinearRule):
    """y = c a + k for constants c, k: tangent c r, chain and backward c d."""

    def __init__(self, scale: float, shift: float = 0.0) -> None:
        self.scale, self.shift = float(scale), float(shift)

    def forward(self, a: Tensor) -> Tensor:
        y = self._apply(a)
        return y + self.shift if self.shift != 0 else y

    def _apply(self, t: Tensor) -> Tensor:
        return t if self.scale == 1 else t * self.scale

    _transpose = _apply


class CatRule(MultiInputRule):
    """y = torch.cat(a, dim): the tangent concatenates, chain and backward split."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.sizes: list[int] = []

    def forward(self, *a: Tensor) -> Tensor:
        self.dim_ = self.dim % a[0].dim()
        self.sizes = [t.shape[self.dim_] for t in a]
        return torch.cat(a, self.dim_)

    def chain(self, d: Tensor) -> tuple[Tensor, ...]:
        return d.split(self.sizes, self.dim_)

    def tangent(self, *r: Tensor) -> Tensor:
        return torch.cat(r, self.dim_)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> tuple[Tensor, ...] | None:
        return abar.split(self.sizes, self.dim_) if need_input_grad else None


class PieceRule(FixedLinearRule):
    """The ``index``-th piece of ``a.chunk(spec, dim)`` (how="chunk") or ``a.split(spec, dim)``
    (how="split"): y = a.narrow(dim, start, length), Jᵀ d = zeros with d at that place."""

    def __init__(self, how: str, spec, dim: int, index: int) -> None:
        self.how, self.spec, self.dim, self.index = how, spec, dim, index

    def forward(self, a: Tensor) -> Tensor:
        self.in_shape = a.shape
        pieces = a.chunk(self.spec, self.dim) if self.how == "chunk" else a.split(self.spec,
                                                                                 self.dim)
        self.dim_ = self.dim % a.dim()
        self.start = sum(p.shape[self.dim_] for p in pieces[:self.index])
        self.length = pieces[self.index].shape[self.dim_]
        return pieces[self.index]

    def _apply(self, t: Tensor) -> Tensor:
        return t.narrow(self.dim_, self.start, self.length)

    def _transpose(self, d: Tensor) -> Tensor:
        out = d.new_zeros(self.in_shape)
        out.narrow(self.dim_, self.start, self.length).copy_(d)
        return out


# --- what traced calls run these rules -------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalar_or_reason(v, what: str) -> str | None:
    if isinstance(v, HostArg) or _is_number(v):
        return None
    if isinstance(v, torch.Tensor):
        return f"{what} a tensor that is not computed from the input (a constant or attribute)"
    return f"{what} {type(v).__name__}"


def _linear_combination(a, b, ca: float, cb: float) -> Made | str:
    """c_a a + c_b b for tensors or numbers (a HostArg is a number known at run time)."""
    if isinstance(a, TensorArg) and isinstance(b, TensorArg):
        return Made([a, b], lambda kernels, resolve: SumRule((ca, cb)))
    t, c, other, co = (a, ca, b, cb) if isinstance(a, TensorArg) else (b, cb, a, ca)
    why = _scalar_or_reason(other, "adds")
    if why:
        return why
    return Made([t], lambda kernels, resolve: ScaleShiftRule(c, co * resolve(other)))


def _add(call: Call) -> Made | str:
    alpha = call.kwargs.get("alpha", 1)
    if not _is_number(alpha):
        return "alpha must be a constant number"
    return _linear_combination(call.args[0], call.args[1], 1.0, float(alpha))


def _sub(call: Call) -> Made | str:
    alpha = call.kwargs.get("alpha", 1)
    if not _is_number(alpha):
        return "alpha must be a constant number"
    return _linear_combination(call.args[0], call.args[1], 1.0, -float(alpha))


def _rsub(call: Call) -> Made | str:  # torch.rsub(a, b) = b - a
    return _linear_combination(call.args[0], call.args[1], -1.0, 1.0)


def _mul(call: Call) -> Made | str:
    a, b = call.args[:2]
    if isinstance(a, TensorArg) and isinstance(b, TensorArg):
        return Made([a, b], lambda kernels, resolve: ProductRule())
    t, c = (a, b) if isinstance(a, TensorArg) else (b, a)
    why = _scalar_or_reason(c, "multiplies by")
    return why or Made([t], lambda kernels, resolve: ScaleShiftRule(resolve(c)))


def _div(call: Call) -> Made | str:
    a, b = call.args[:2]
    if not isinstance(a, TensorArg) or isinstance(b, TensorArg):
        return "divides by a tensor computed from the input (division by constants runs fused)"
    if call.kwargs.get("rounding_mode") is not None:
        return "rounding_mode is not differentiable"
    why = _scalar_or_reason(b, "divides by")
    return why or Made([a], lambda kernels, resolve: ScaleShiftRule(1.0 / resolve(b)))


def _neg(call: Call) -> Made | str:
    return Made([call.args[0]], lambda kernels, resolve: ScaleShiftRule(-1.0))


def _pos(call: Call) -> Made | str:
    return Made([call.args[0]], lambda kernels, resolve: ScaleShiftRule(1.0))


def _cat(call: Call) -> Made | str:
    tensors = call.args[0] if call.args else call.kwargs.get("tensors")
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, TensorArg)
                                                          for t in tensors):
        return "concatenates tensors that are not all computed from the input"
    if not isinstance(dim, int):
        return "the dim must be a constant"
    if len(tensors) == 1:
        return Made(list(tensors), lambda kernels, resolve: ScaleShiftRule(1.0))
    return Made(list(tensors), lambda kernels, resolve: CatRule(dim))


def _pieces(how: str):
    """chunk / split: a tuple of pieces; each ``getitem`` of it is one PieceRule (sizes read
    off tensors, ``x.shape[1] // 2``, are resolved in pass 1)."""

    def factory(call: Call) -> Made | str:
        a = call.args[0]
        spec = call.args[1] if len(call.args) > 1 else call.kwargs.get(
            "chunks" if how == "chunk" else "split_size_or_sections",
            call.kwargs.get("split_size"))
        dim = call.args[2] if len(call.args) > 2 else call.kwargs.get("dim", 0)
        if any(isinstance(v, TensorArg) for v in flat_args((spec, dim))):
            return f"{how} with sizes taken from a tensor's values"
        return Made([a], None, pieces=lambda i: Made(
            [a], lambda kernels, resolve: PieceRule(how, resolve(spec), resolve(dim), i),
            aliases=True))

    return factory


register_function(operator.add, operator.iadd, torch.add, "add", "add_", "__add__",
                  "__radd__", "__iadd__", factory=_add)
register_function(operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_",
                  "__sub__", "__isub__", factory=_sub)
register_function(torch.rsub, "__rsub__", factory=_rsub)
register_function(operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_",
                  "__mul__", "__rmul__", "__imul__", factory=_mul)
register_function(operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide,
                  "div", "div_", "true_divide", "__truediv__", "__itruediv__", factory=_div)
register_function(operator.neg, torch.neg, torch.negative, "neg", "__neg__", factory=_neg)
register_function(operator.pos, torch.positive, "__pos__", factory=_pos)
register_function(torch.cat, torch.concat, torch.concatenate, factory=_cat)
register_function(torch.chunk, "chunk", factory=_pieces("chunk"))
register_function(torch.split, "split", factory=_pieces("split"))
