"""The library products of one training step, recorded once and replayed back to back.

A CPU step's time is its matrix products and convolutions (oneDNN and MKL, called through
ATen) plus everything else: the elementwise kernels, Python and the autograd engine.
Replaying only the products, on operands of the same shapes, strides and values, times
the first part alone. For the fused step that is the time it cannot go below on this
machine while it makes these products, so

    eager step ÷ fused products    is the most the fused step can gain on eager, and
    fused products ÷ ordinary step is the least it can cost against the ordinary step,

both measured in the same run (bench/cpu_table.py --ceiling). The extension's own
one-sweep kernels for thin layers (≤ 16 outputs) are not library products and are not
replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: the ATen / oneDNN ops that are matrix products or convolutions
PRODUCT_OPS = frozenset({
    "aten.mm.default", "aten.addmm.default", "aten.addmm_.default", "aten.bmm.default",
    "aten.baddbmm.default", "aten.convolution.default", "aten.convolution_backward.default",
    "aten.mkldnn_convolution.default", "mkldnn._linear_pointwise.default",
    "mkldnn._linear_pointwise.binary",
})


@dataclass
class RecordedProduct:
    """One product call: the op and copies of its operands (same shapes and strides)."""

    func: object
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.func(*self.args, **self.kwargs)


def _copy(v: object) -> object:
    """v with every tensor copied into a buffer of its own, viewed with the same sizes and
    strides (an expanded operand stays expanded, a transposed view stays transposed)."""
    if isinstance(v, torch.Tensor):
        v = v.detach()
        span = 1 + sum((n - 1) * s for n, s in zip(v.shape, v.stride()) if n > 0)
        if v.numel() == 0:
            return v.clone()
        region = v.as_strided((span,), (1,), v.storage_offset())
        return region.clone().as_strided(v.size(), v.stride())
    if isinstance(v, (list, tuple)):
        return type(v)(_copy(u) for u in v)
    return v


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[RecordedProduct] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) in PRODUCT_OPS:  # copied before the call: addmm_ writes its first operand
            self.calls.append(RecordedProduct(func, _copy(args), _copy(kwargs)))
        return func(*args, **kwargs)


def record_products(step: Callable[[], None]) -> list[RecordedProduct]:
    """The library products one call of ``step`` makes, in order (the step runs once)."""
    rec = _Recorder()
    with rec:
        step()
    return rec.calls


def replay(products: list[RecordedProduct]) -> Callable[[], None]:
    """A step that makes only ``products``, back to back."""

    def run() -> None:
        for p in products:
            p()

    return run
