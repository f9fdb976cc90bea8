"""nn.Dropout: y = a ⊙ m with m ∈ {0, 1/(1−p)} drawn once in pass 1 and reused in every pass.

The mask is drawn exactly as torch's own dropout draws it (same RNG stream, shape and
device), so a fused step consumes the generator as a plain forward would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Rule


class DropoutRule(Rule):
    def __init__(self, module: nn.Dropout, bk=None) -> None:
        self.module = module
        self.active = module.training and module.p > 0

    def forward(self, a: Tensor) -> Tensor:
        if not self.active:
            return a
        with torch.no_grad():
            self.mask = F.dropout(torch.ones_like(a), self.module.p, True)
        return a * self.mask

    def _apply(self, t: Tensor) -> Tensor:
        return t * self.mask if self.active else t

    def chain(self, d: Tensor) -> Tensor:
        return self._apply(d)

    def tangent(self, r: Tensor) -> Tensor:
        return self._apply(r)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        return self._apply(abar) if need_input_grad else None
