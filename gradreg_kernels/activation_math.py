"""Elementwise activations and their first two derivatives, written in plain torch ops.

Each kind of the activation table (activation_table.py) is described by ``ActivationSpec``:
a name, its hyper-parameters, whether its second derivative is non-zero (``smooth``), and
three functions of the pre-activation z: value σ(z), first derivative σ'(z) and second
derivative σ''(z). These match, at every z
including the kinks, the derivatives PyTorch's own autograd formulas use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activation_table import BY_NAME, kind_of

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_C = 0.044715


@dataclass(frozen=True)
class ActivationSpec:
    """σ, σ', σ'' of one activation kind with fixed hyper-parameters.

    name:   kind ("relu", "leaky_relu", "softplus", "tanh", "sigmoid", "gelu", "gelu_tanh", "elu",
            "silu", "hardtanh", "hardsigmoid", "hardswish", "mish", "selu", "celu", "logsigmoid",
            "softsign", "tanhshrink")
    params: hyper-parameters (slope, beta/threshold, alpha), as floats
    smooth: whether σ'' is not identically zero (piecewise-linear kinds skip that work)
    """

    name: str
    params: tuple[float, ...]
    smooth: bool
    value: Callable[[Tensor], Tensor]
    d1: Callable[[Tensor], Tensor]
    d2: Callable[[Tensor], Tensor]


def _relu() -> ActivationSpec:
    return ActivationSpec(
        "relu", (), False, torch.relu, lambda z: (z > 0).to(z.dtype), lambda z: torch.zeros_like(z)
    )


def _leaky_relu(slope: float) -> ActivationSpec:
    def d1(z: Tensor) -> Tensor:
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))

    return ActivationSpec(
        "leaky_relu", (slope,), False, lambda z: F.leaky_relu(z, slope), d1,
        lambda z: torch.zeros_like(z),
    )


def _softplus(beta: float, threshold: float) -> ActivationSpec:
    # σ' = sigmoid(βz) where βz ≤ threshold, else 1; σ'' = β s (1 − s) there, else 0.
    def d1(z: Tensor) -> Tensor:
        bz = z * beta
        return torch.where(bz > threshold, torch.ones_like(z), torch.sigmoid(bz))

    def d2(z: Tensor) -> Tensor:
        bz = z * beta
        s = torch.sigmoid(bz)
        return torch.where(bz > threshold, torch.zeros_like(z), beta * s * (1 - s))

    return ActivationSpec(
        "softplus", (beta, threshold), True, lambda z: F.softplus(z, beta, threshold), d1, d2
    )


def _tanh() -> ActivationSpec:
    def d1(z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return 1 - t * t

    def d2(z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)

    return ActivationSpec("tanh", (), True, torch.tanh, d1, d2)


def _sigmoid() -> ActivationSpec:
    def d1(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s)

    def d2(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s) * (1 - 2 * s)

    return ActivationSpec("sigmoid", (), True, torch.sigmoid, d1, d2)


def _gelu() -> ActivationSpec:
    # σ = z Φ(z);  σ' = Φ(z) + z φ(z);  σ'' = φ(z) (2 − z²)
    def pdf(z: Tensor) -> Tensor:
        return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI

    def d1(z: Tensor) -> Tensor:
        return 0.5 * (1 + torch.erf(z * _INV_SQRT_2)) + z * pdf(z)

    def d2(z: Tensor) -> Tensor:
        return pdf(z) * (2 - z * z)

    return ActivationSpec("gelu", (), True, F.gelu, d1, d2)


def _gelu_tanh() -> ActivationSpec:
    # σ = ½ z (1 + t), t = tanh(u), u = k (z + c z³)
    # σ' = ½ (1 + t) + ½ z (1 − t²) u'
    # σ'' = (1 − t²) (u' + ½ z (u'' − 2 t u'²)),  u' = k (1 + 3c z²),  u'' = 6 k c z
    def parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_C * z * z * z))
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * z * z)
        return t, du, 6 * _SQRT_2_OVER_PI * _GELU_C * z

    def d1(z: Tensor) -> Tensor:
        t, du, _ = parts(z)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * du

    def d2(z: Tensor) -> Tensor:
        # g z first: where t = ±1 (g = 0) the products stay 0 until u' itself overflows
        t, du, ddu = parts(z)
        g = 1 - t * t
        gz = g * z
        return g * du + 0.5 * gz * ddu - gz * t * du * du

    return ActivationSpec(
        "gelu_tanh", (), True, lambda z: F.gelu(z, approximate="tanh"), d1, d2
    )


def _elu(alpha: float) -> ActivationSpec:
    # σ' = 1 for z > 0, α eᶻ for z ≤ 0 (PyTorch's convention at 0); σ'' = 0 / α eᶻ.
    def d1(z: Tensor) -> Tensor:
        return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(torch.clamp(z, max=0)))

    def d2(z: Tensor) -> Tensor:
        return torch.where(z > 0, torch.zeros_like(z), alpha * torch.exp(torch.clamp(z, max=0)))

    return ActivationSpec("elu", (alpha,), True, lambda z: F.elu(z, alpha), d1, d2)


def _silu() -> ActivationSpec:
    # σ = z s, s = sigmoid(z);  σ' = s (1 + z (1 − s));  σ'' = s (1 − s) (2 + z (1 − 2 s))
    def d1(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))

    def d2(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))

    return ActivationSpec("silu", (), True, F.silu, d1, d2)


def _hardtanh(lo: float, hi: float) -> ActivationSpec:
    # clamp(z, lo, hi): σ' = 1 strictly inside (lo, hi), else 0 (torch's hardtanh_backward)
    def d1(z: Tensor) -> Tensor:
        return ((z > lo) & (z < hi)).to(z.dtype)

    return ActivationSpec("hardtanh", (lo, hi), False, lambda z: F.hardtanh(z, lo, hi), d1,
                          lambda z: torch.zeros_like(z))


def _hardsigmoid() -> ActivationSpec:
    # relu6(z + 3)/6: σ' = 1/6 strictly inside (−3, 3), else 0
    def d1(z: Tensor) -> Tensor:
        return ((z > -3) & (z < 3)).to(z.dtype) / 6

    return ActivationSpec("hardsigmoid", (), False, F.hardsigmoid, d1,
                          lambda z: torch.zeros_like(z))


def _hardswish() -> ActivationSpec:
    # z relu6(z + 3)/6: σ' = 0 below −3, z/3 + 1/2 up to 3 (3 included, as torch's
    # hardswish_backward), 1 above; σ'' = 1/3 strictly inside (−3, 3), else 0
    def d1(z: Tensor) -> Tensor:
        return torch.where(z < -3, 0.0, torch.where(z <= 3, z / 3 + 0.5, 1.0)).to(z.dtype)

    def d2(z: Tensor) -> Tensor:
        return ((z > -3) & (z < 3)).to(z.dtype) / 3

    return ActivationSpec("hardswish", (), True, F.hardswish, d1, d2)


def _mish() -> ActivationSpec:
    # σ = z t, t = tanh(softplus(z)), s = sigmoid(z), g = 1 − t²:
    # σ' = t + z s g;  σ'' = s g (2 + z (1 − s − 2 t s))
    def parts(z: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(F.softplus(z)), torch.sigmoid(z)

    def d1(z: Tensor) -> Tensor:
        t, s = parts(z)
        return t + z * s * (1 - t * t)

    def d2(z: Tensor) -> Tensor:
        t, s = parts(z)
        return s * (1 - t * t) * (2 + z * (1 - s - 2 * t * s))

    return ActivationSpec("mish", (), True, F.mish, d1, d2)


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _selu() -> ActivationSpec:
    # scale · ELU(α) with torch's fixed constants
    elu = _elu(_SELU_ALPHA)
    return ActivationSpec("selu", (), True, F.selu, lambda z: _SELU_SCALE * elu.d1(z),
                          lambda z: _SELU_SCALE * elu.d2(z))


def _celu(alpha: float) -> ActivationSpec:
    # z for z > 0, α (e^{z/α} − 1) below: σ' = e^{z/α}, σ'' = e^{z/α}/α there
    def e(z: Tensor) -> Tensor:
        return torch.exp(torch.clamp(z, max=0) / alpha)

    def d1(z: Tensor) -> Tensor:
        return torch.where(z > 0, torch.ones_like(z), e(z))

    def d2(z: Tensor) -> Tensor:
        return torch.where(z > 0, torch.zeros_like(z), e(z) / alpha)

    return ActivationSpec("celu", (alpha,), True, lambda z: F.celu(z, alpha), d1, d2)


def _logsigmoid() -> ActivationSpec:
    # log sigmoid(z): σ' = sigmoid(−z) = 1 − s, σ'' = −s (1 − s)
    def d2(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return -s * (1 - s)

    return ActivationSpec("logsigmoid", (), True, F.logsigmoid, lambda z: torch.sigmoid(-z), d2)


def _softsign() -> ActivationSpec:
    # z / (1 + |z|): σ' = 1/(1 + |z|)², σ'' = −2 sign(z)/(1 + |z|)³
    def d1(z: Tensor) -> Tensor:
        return (1 + z.abs()).pow(-2)

    def d2(z: Tensor) -> Tensor:
        return -2 * torch.sign(z) * (1 + z.abs()).pow(-3)

    return ActivationSpec("softsign", (), True, F.softsign, d1, d2)


def _tanhshrink() -> ActivationSpec:
    # z − tanh z: σ' = tanh² z, σ'' = 2 tanh z (1 − tanh² z)
    def d1(z: Tensor) -> Tensor:
        return torch.tanh(z) ** 2

    def d2(z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return 2 * t * (1 - t * t)

    return ActivationSpec("tanhshrink", (), True, F.tanhshrink, d1, d2)


#: the table's name → the maker of its spec from its hyper-parameters
_MAKERS: dict[str, Callable[..., ActivationSpec]] = {
    "relu": _relu, "leaky_relu": _leaky_relu, "softplus": _softplus, "tanh": _tanh,
    "sigmoid": _sigmoid, "gelu": _gelu, "gelu_tanh": _gelu_tanh, "elu": _elu,
    "silu": _silu, "hardtanh": _hardtanh, "hardsigmoid": _hardsigmoid,
    "hardswish": _hardswish, "mish": _mish, "selu": _selu, "celu": _celu,
    "logsigmoid": _logsigmoid, "softsign": _softsign, "tanhshrink": _tanhshrink,
}
if set(_MAKERS) != set(BY_NAME):
    raise AssertionError("activation_math and activation_table name different kinds")


def activation_spec(module: nn.Module) -> ActivationSpec | None:
    """The spec of a supported activation module (its row of the activation table, with the
    module's hyper-parameters), or None if the module is not one."""
    kind = kind_of(module)
    return None if kind is None else _MAKERS[kind.name](*kind.params(module))


def derivs_from_output(spec: ActivationSpec) -> bool:
    """Whether σ'(z) and σ''(z) are functions of the output y = σ(z), so that a backend may
    keep y alone: tanh (1 − y², −2y(1 − y²)), sigmoid (y(1 − y), y(1 − y)(1 − 2y)), ELU with
    α > 0 (below 0 both are y + α) and Softplus with β > 0 and a threshold ≥ 15 (s = 1 − e^{−βy},
    then s and βs(1 − s); below that threshold log(1 + e^{βz}) > threshold for some
    βz ≤ threshold, and y would not tell torch's linear region apart)."""
    if spec.name in ("tanh", "sigmoid"):
        return True
    if spec.name == "elu":
        return spec.params[0] > 0
    if spec.name == "softplus":
        return spec.params[0] > 0 and spec.params[1] >= 15
    return False


def output_derivs(spec: ActivationSpec, y: Tensor) -> tuple[Tensor, Tensor]:
    """σ'(z) and σ''(z) from y = σ(z) for a spec with ``derivs_from_output`` (the formulas
    there; the C++ and Triton kernels compute the same in their own sweeps)."""
    p = tuple(float(v) for v in spec.params) + (0.0, 0.0)
    if spec.name == "softplus":
        x = p[0] * y
        s, lin = -torch.expm1(-x), x > p[1]
        return torch.where(lin, 1.0, s), torch.where(lin, 0.0, p[0] * s * (1.0 - s))
    if spec.name == "tanh":
        d1 = 1.0 - y * y
        return d1, -2.0 * y * d1
    if spec.name == "sigmoid":
        d1 = y * (1.0 - y)
        return d1, d1 * (1.0 - 2.0 * y)
    if spec.name == "elu":
        e, pos = y + p[0], y > 0
        return torch.where(pos, 1.0, e), torch.where(pos, 0.0, e)
    raise ValueError(f"{spec.name} has no derivatives from its output")


def spec_by_name(name: str, *params: float) -> ActivationSpec:
    """The spec of an activation given by name and hyper-parameters (for functional use)."""
    if name not in _MAKERS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_MAKERS)}")
    return _MAKERS[name](*params)


_AT_INFINITY: dict[tuple, tuple[float, float]] = {}


def values_at_infinity(spec: ActivationSpec) -> tuple[float, float]:
    """(σ(+inf), σ(−inf)) as torch's own forward gives them (NaN where torch gives NaN:
    GELU(+inf), SiLU(−inf), ...), for kernels that map the infinities as torch does while
    their branch-free formulas serve the finite values (NaN maps to NaN everywhere)."""
    key = (spec.name, tuple(spec.params))
    if key not in _AT_INFINITY:
        with torch.no_grad():
            v = spec.value(torch.tensor([math.inf, -math.inf], dtype=torch.float32))
        _AT_INFINITY[key] = (float(v[0]), float(v[1]))
    return _AT_INFINITY[key]


def autograd_derivatives(spec: ActivationSpec, z: Tensor) -> tuple[Tensor, Tensor]:
    """(σ'(z), σ''(z)) as torch's own autograd gives them through ``spec.value``, for the
    few non-finite z a kernel's branch-free formulas would get wrong. z: any shape; both
    results in z's shape.

    At a NaN torch's CPU backward formulas choose per kind, and for some per code path:
    ELU, SELU, CELU and Hardswish give NaN in their vectorized loop but the positive
    branch in its scalar tail, Hardtanh 0 against 1. Each value is evaluated inside a row
    of 64 copies, so the answer is the vectorized loop's, which a layer's tensor (all but
    its last few elements) gets."""
    row = z.detach().reshape(-1, 1).expand(-1, 64).contiguous()
    with torch.enable_grad():
        v = row.requires_grad_(True)
        (d1,) = torch.autograd.grad(spec.value(v).sum(), v, create_graph=spec.smooth)
        d2 = None
        if spec.smooth and d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), v, allow_unused=True)
    first = d1.detach()[:, 0].reshape(z.shape)
    return first, torch.zeros_like(z) if d2 is None else d2.detach()[:, 0].reshape(z.shape)
