"""nn.Dropout: y = a ⊙ m with m ∈ {0, 1/(1−p)} drawn once in pass 1 and reused in every pass.

The backend draws the mask exactly as torch's own dropout draws it (same RNG stream, shape
and device), so a fused step consumes the generator as a plain forward would.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Rule


class DropoutRule(Rule):
    def __init__(self, module: nn.Dropout, bk=None) -> None:
        if bk is None:
            from ..backends.torch_ops import TorchBackend

            bk = TorchBackend()
        self.module, self.bk = module, bk
        self.active = module.training and module.p > 0

    def forward(self, a: Tensor) -> Tensor:
        if not self.active:
            return a
        y, self.mask = self.bk.dropout_forward(a, float(self.module.p))
        return y

    def _apply(self, t: Tensor) -> Tensor:
        return self.bk.dropout_apply(self.mask, t) if self.active else t

    def chain(self, d: Tensor) -> Tensor:
        return self._apply(d)

    def tangent(self, r: Tensor) -> Tensor:
        return self._apply(r)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        return self._apply(abar) if need_input_grad else None
