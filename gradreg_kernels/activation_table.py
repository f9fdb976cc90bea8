"""The activation table: every supported activation kind, its integer code, the torch
module it stands for and which kernels implement it. One row per kind; everything else
reads it:

- ``activation_math`` builds each kind's σ, σ', σ'' (``ActivationSpec``) from its row;
- the CUDA and Triton backends pass ``code`` to their kernels, the C++ CPU backend too;
- ``csrc/common/activation_codes.h`` is generated from this table
  (``activation_table.write_header()`` rewrites it; tests/test_activation_table.py
  fails when the committed header differs);
- the rule registry and the drop-in modules cover every ``module`` listed here.

A leaf module: it imports torch alone.

Adding an activation: one row here (a new, unused code), its σ, σ', σ'' in
``activation_math``, a drop-in class in ``nn/modules.py``; then, for a native kernel, the
case of its code in the kernels and ``native=True`` (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn


def _no_params(m: nn.Module) -> tuple[float, ...]:
    return ()


@dataclass(frozen=True)
class ActivationKind:
    """One row of the table.

    name:      the kind's name (``spec_by_name``, ``bias_act(act=...)``)
    code:      the integer the kernels switch on (C++ ``act_code::k<Name>``, Triton constexpr ACT)
    module:    the torch.nn class it stands for (subclasses included: nn.ReLU6 is a Hardtanh)
    params:    the hyper-parameters read off a module, as floats (p0, p1 of the kernels)
    smooth:    whether σ'' is not identically zero (piecewise-linear kinds skip that work)
    piecewise: whether the kernels keep a 1-bit mask z > 0 as state (σ' a function of the sign)
    native:    whether the CUDA, Triton and C++ CPU kernels implement this code (others run
               the portable torch steps on every backend)
    matches:   further test on the module (nn.GELU is "gelu" or "gelu_tanh" by ``approximate``)
    """

    name: str
    code: int
    module: type[nn.Module]
    params: Callable[[nn.Module], tuple[float, ...]] = _no_params
    smooth: bool = True
    piecewise: bool = False
    native: bool = False
    matches: Callable[[nn.Module], bool] = lambda m: True


ACTIVATIONS: tuple[ActivationKind, ...] = (
    ActivationKind("relu", 0, nn.ReLU, smooth=False, piecewise=True, native=True),
    ActivationKind("leaky_relu", 1, nn.LeakyReLU, lambda m: (float(m.negative_slope),),
                   smooth=False, piecewise=True, native=True),
    ActivationKind("softplus", 2, nn.Softplus, lambda m: (float(m.beta), float(m.threshold)),
                   native=True),
    ActivationKind("tanh", 3, nn.Tanh, native=True),
    ActivationKind("sigmoid", 4, nn.Sigmoid, native=True),
    ActivationKind("gelu", 5, nn.GELU, native=True, matches=lambda m: m.approximate != "tanh"),
    ActivationKind("gelu_tanh", 6, nn.GELU, native=True,
                   matches=lambda m: m.approximate == "tanh"),
    ActivationKind("elu", 7, nn.ELU, lambda m: (float(m.alpha),), native=True),
    ActivationKind("silu", 8, nn.SiLU, native=True),
    ActivationKind("mish", 9, nn.Mish, native=True),
    ActivationKind("hardswish", 10, nn.Hardswish, native=True),
    ActivationKind("hardtanh", 11, nn.Hardtanh, lambda m: (float(m.min_val), float(m.max_val)),
                   smooth=False),
    ActivationKind("hardsigmoid", 12, nn.Hardsigmoid, smooth=False),
    ActivationKind("selu", 13, nn.SELU),
    ActivationKind("celu", 14, nn.CELU, lambda m: (float(m.alpha),)),
    ActivationKind("logsigmoid", 15, nn.LogSigmoid),
    ActivationKind("softsign", 16, nn.Softsign),
    ActivationKind("tanhshrink", 17, nn.Tanhshrink),
)

#: name → row
BY_NAME: dict[str, ActivationKind] = {k.name: k for k in ACTIVATIONS}

#: name → code of every kind the native kernels implement (the codes the backends pass)
NATIVE_CODES: dict[str, int] = {k.name: k.code for k in ACTIVATIONS if k.native}

#: codes whose kernel state is a 1-bit mask (and whose σ'' is zero)
PIECEWISE_CODES: frozenset[int] = frozenset(k.code for k in ACTIVATIONS if k.piecewise)

#: every torch.nn activation class the table covers
MODULE_TYPES: tuple[type[nn.Module], ...] = tuple(dict.fromkeys(k.module for k in ACTIVATIONS))


def kind_of(module: nn.Module) -> ActivationKind | None:
    """The row of an activation module (the first whose class and test match), or None."""
    for k in ACTIVATIONS:
        if isinstance(module, k.module) and k.matches(module):
            return k
    return None


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def header_text() -> str:
    """The C++ header of the codes (csrc/common/activation_codes.h), as generated."""
    lines = [
        "// Generated from gradreg_kernels/activation_table.py by its write_header();",
        "// do not edit by hand.",
        "// The activation codes the CPU and CUDA kernels switch on (those of the Python table).",
        "#pragma once",
        "",
        "namespace gradreg {",
        "namespace act_code {",
        "",
    ]
    lines += [f"constexpr int k{_camel(k.name)} = {k.code};" for k in ACTIVATIONS if k.native]
    lines += ["", "}  // namespace act_code", "}  // namespace gradreg", ""]
    return "\n".join(lines)


HEADER_PATH = Path(__file__).resolve().parent.parent / "csrc" / "common" / "activation_codes.h"


def _check_table() -> None:
    codes = [k.code for k in ACTIVATIONS]
    if len(set(codes)) != len(codes) or len(BY_NAME) != len(ACTIVATIONS):
        raise AssertionError("activation table: names and codes must be unique")


_check_table()

def write_header() -> Path:
    """Rewrite csrc/common/activation_codes.h from the table; returns its path."""
    HEADER_PATH.write_text(header_text())
    return HEADER_PATH
