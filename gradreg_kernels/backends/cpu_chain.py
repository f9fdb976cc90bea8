"""The cpu backend's native runner of a plain Linear chain under bf16 autocast.

A plan that is one chain

    [Flatten] → Linear → [σ] → ... → Linear (K ≤ THIN_MAX outputs) → logits

with σ ReLU, LeakyReLU or a smooth activation the extension's sweeps implement (Softplus,
SiLU, GELU, Tanh, Sigmoid, ELU, Mish, Hardswish), every hidden layer wider than THIN_MAX,
every weight and bias float32 and trainable and x a float32 CPU tensor, runs its four
passes in the extension's ``LinearChain`` (csrc/cpu/linear_chain.cpp) when the step's
products run in bf16: the kernels and storage of the Python schedule on this backend,
called from C++ (each weight gradient one doubled-batch product, rounded once), so that the
schedule's per-step cost in Python (a few hundred µs) is not paid on models whose products
are short. The head, the penalty and its seed stay in Python, as with the Python schedule.
A smooth activation's pre-activation with a NaN / ±inf declines the call in pass 1
(``NativeScheduleDeclined``): the Python schedule, which sets torch's σ', σ'' there, runs
it instead. ``GRADREG_KERNELS_NATIVE_CHAIN=0`` turns the native chain off (the Python
schedule then runs these plans).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from ..activation_math import activation_spec, derivs_from_output
from ..activation_table import MODULE_TYPES
from ..backend_protocol import NativeScheduleDeclined
from . import cpu_autocast

#: an activation as the native chain takes it: (slope, kind, p0, p1, from_output); slope
#: finite for ReLU / LeakyReLU, kind ≥ 0 for a smooth one, neither for no activation
Act = tuple[float, int, float, float, bool]
NO_ACT: Act = (math.nan, -1, 0.0, 0.0, False)


def _activation(m: nn.Module, smooth_kinds: dict[str, int]) -> Act | None:
    """The native chain's form of the activation module m, or None (not one it runs)."""
    if type(m) not in MODULE_TYPES:
        return None
    spec = activation_spec(m)
    if spec.name in ("relu", "leaky_relu"):
        slope = 0.0 if spec.name == "relu" else float(spec.params[0])
        return (slope, -1, 0.0, 0.0, False) if math.isfinite(slope) else None
    kind = smooth_kinds.get(spec.name)
    if kind is None:
        return None
    p = tuple(float(v) for v in spec.params) + (0.0, 0.0)
    return (math.nan, kind, p[0], p[1], derivs_from_output(spec))


def _layers(mods: list[nn.Module], thin_max: int, smooth_kinds: dict[str, int]
            ) -> list[tuple[nn.Linear, Act]] | None:
    """(Linear, the activation after it) per layer of a plain chain (a ``Plan``'s
    ``chain_modules``), or None."""
    layers: list[tuple[nn.Linear, Act]] = []
    for m in mods:
        t = type(m)
        if t is nn.Flatten and not layers and m.start_dim == 1 and m.end_dim == -1:
            continue
        if t is nn.Linear and getattr(m, "act", None) is None:
            layers.append((m, NO_ACT))
            continue
        act = _activation(m, smooth_kinds) if layers and layers[-1][1] is NO_ACT else None
        if act is None:
            return None
        layers[-1] = (layers[-1][0], act)
    if not layers or layers[-1][1] is not NO_ACT or layers[-1][0].out_features > thin_max:
        return None
    if any(lin.out_features <= thin_max for lin, _ in layers[:-1]):
        return None
    return layers


def _plain_param(p: Tensor | None) -> bool:
    return p is None or (p.dtype == torch.float32 and p.is_cpu and p.is_contiguous()
                         and p.requires_grad)


def schedule_for(backend, plan, x: Tensor, head, keep_saved: bool, thin_max: int,
                 smooth_kinds: dict[str, int]):
    """A ``LinearChainSchedule`` for this call, or None (the Python schedule runs it);
    ``smooth_kinds``: the smooth activations the extension's sweeps implement, by name."""
    if cpu_autocast.product_dtype() is None:
        return None
    if os.environ.get("GRADREG_KERNELS_NATIVE_CHAIN", "1") == "0":
        return None
    mods = plan.chain_modules()
    layers = None if mods is None else _layers(mods, thin_max, smooth_kinds)
    if layers is None or x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous():
        return None
    if x.dim() < 2 or (x.dim() != 2 and type(mods[0]) is not nn.Flatten):
        return None
    if any(not (_plain_param(lin.weight) and _plain_param(lin.bias)) for lin, _ in layers):
        return None
    return LinearChainSchedule(backend, layers, head, keep_saved)


class LinearChainSchedule:
    """``Schedule``'s interface over the extension's LinearChain (one per call)."""

    def __init__(self, backend, layers: list[tuple[nn.Linear, Act]], head,
                 keep_saved: bool) -> None:
        self.backend, self.layers, self.head, self.keep_saved = backend, layers, head, keep_saved
        self.native = None

    def forward(self, x: Tensor) -> Tensor:
        """Pass 1: the logits (B, K), float32."""
        be = self.backend
        ws = [lin.weight.detach() for lin, _ in self.layers]
        low = [be.product_weight(w) for w in ws[:-1]] + [ws[-1]]
        bias = [None if lin.bias is None else lin.bias.detach() for lin, _ in self.layers]
        acts = [a for _, a in self.layers]
        self.native = be.ext.LinearChain(low, ws, bias, *[list(v) for v in zip(*acts)],
                                         self.keep_saved)
        try:
            return self.native.forward(x)
        except be.ext.NonFinitePreActivation as e:
            raise NativeScheduleDeclined(str(e)) from e

    def commit(self) -> None:
        """Linear layers and activations keep no module state: nothing to apply."""

    def chain(self, pen_grad: Tensor) -> Tensor:
        """Pass 2: g = ∇_X Σ_n ℓ_n (bf16, x's shape)."""
        return self.native.chain(pen_grad.contiguous())

    def adjoint_and_backward(self, r: Tensor | None, zbar_data: Tensor, need_input_grad: bool
                             ) -> tuple[Tensor | None, list]:
        """Passes 3 and 4, as ``Schedule.adjoint_and_backward``."""
        zbar = zbar_data
        if r is not None:
            hr = self.head.hvp(self.native.tangent(r.contiguous()))
            if hr is not None:
                zbar = zbar + hr
        out = self.native.backward(zbar.float().contiguous(), need_input_grad, r is not None)
        grads = []
        for k, (lin, _) in enumerate(self.layers):
            grads.append((lin.weight, out[2 * k]))
            if lin.bias is not None:
                grads.append((lin.bias, out[2 * k + 1]))
        if not self.keep_saved:
            self.native = None
        return (out[-1] if need_input_grad else None), grads
