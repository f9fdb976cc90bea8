"""nn.Dropout: y = a ⊙ m with m ∈ {0, 1/(1−p)} drawn once in pass 1 and reused in every pass.
nn.Dropout1d/2d/3d (feature dropout): the same with one m per sample and channel, (N, C, 1, ...).

The mask is drawn exactly as torch's own dropout draws it (same RNG stream, shape and
device: the backend for elementwise dropout, ATen's feature noise for the others), so a
fused step consumes the generator as a plain forward would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend_protocol import Backend
from ..registry import register_function, register_module
from .base import FixedLinearRule

#: feature-dropout module → the input rank it takes (batched)
FEATURE_DROPOUT_RANK = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}


class DropoutRule(FixedLinearRule):
    """y = m ⊙ a: a fixed linear map once m is drawn, and its own transpose."""

    def __init__(self, module: nn.Dropout, kernels: Backend) -> None:
        self.module, self.kernels = module, kernels
        self.active = module.training and module.p > 0

    def forward(self, a: Tensor) -> Tensor:
        if not self.active:
            return a
        y, self.mask = self.kernels.dropout_forward(a, float(self.module.p))
        return y

    def _apply(self, t: Tensor) -> Tensor:
        return self.kernels.dropout_apply(self.mask, t) if self.active else t

    def _transpose(self, d: Tensor) -> Tensor:
        return self._apply(d)  # diag(m) is symmetric


class FeatureDropoutRule(DropoutRule):
    """nn.Dropout1d/2d/3d: whole channels zeroed, y = a ⊙ m with m of shape (N, C, 1, ...)."""

    def __init__(self, module: nn.Module, kernels: Backend) -> None:
        self.module, self.kernels = module, kernels
        self.rank = FEATURE_DROPOUT_RANK[type(module)]
        self.active = module.training and module.p > 0

    def forward(self, a: Tensor) -> Tensor:
        if a.dim() != self.rank:
            raise ValueError(f"{type(self.module).__name__} runs fused on batched inputs of "
                             f"{self.rank} dimensions (N, C, ...), got shape {tuple(a.shape)}")
        if not self.active:
            return a
        p = float(self.module.p)
        with torch.no_grad():  # ATen's feature noise: (N, C, 1, ...), Bernoulli(1 − p) / (1 − p)
            noise = a.new_empty(a.shape[:2] + (1,) * (a.dim() - 2))
            self.mask = noise.zero_() if p == 1 else noise.bernoulli_(1 - p).div_(1 - p)
        return a * self.mask

    def _apply(self, t: Tensor) -> Tensor:
        return t * self.mask if self.active else t


register_module(nn.Dropout, aliases=True)(lambda m: lambda kernels: DropoutRule(m, kernels))
register_module(*FEATURE_DROPOUT_RANK, aliases=True)(
    lambda m: lambda kernels: FeatureDropoutRule(m, kernels))


def _functional(cls: type[nn.Module]):
    """``F.dropout(x, p, training)`` as the module ``cls(p)`` in that mode."""

    def made(p: float = 0.5, training: bool = True, inplace: bool = False) -> nn.Module:
        return cls(p).train(bool(training))

    return made


register_function(F.dropout, torch.dropout, module=_functional(nn.Dropout))
register_function(F.dropout1d, module=_functional(nn.Dropout1d))
register_function(F.dropout2d, module=_functional(nn.Dropout2d))
register_function(F.dropout3d, module=_functional(nn.Dropout3d))
