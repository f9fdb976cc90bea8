"""Flatten, Unflatten, Identity and padding (constant, reflection, replication): fixed linear
maps without parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FixedLinearRule, Rule


class ReshapeRule(FixedLinearRule):
    """A fixed reshape y = R a: its transpose is the inverse reshape."""

    def _transpose(self, d: Tensor) -> Tensor:
        return d.reshape(self.in_shape)


class FlattenRule(ReshapeRule):
    def __init__(self, module: nn.Flatten, bk=None) -> None:
        self.module = module

    def _apply(self, t: Tensor) -> Tensor:
        return t.flatten(self.module.start_dim, self.module.end_dim)


class UnflattenRule(ReshapeRule):
    def __init__(self, module: nn.Unflatten, bk=None) -> None:
        self.module = module

    def _apply(self, t: Tensor) -> Tensor:
        return t.unflatten(self.module.dim, self.module.unflattened_size)


class ConstantPadRule(FixedLinearRule):
    """nn.ZeroPad1d/2d/3d, nn.ConstantPad1d/2d/3d: y = P a + c (padding c around a; negative
    amounts crop). The tangent pads r with zeros (P r), chain and backward apply Pᵀ: the
    padding taken off again, a crop being undone with zeros."""

    def __init__(self, module: nn.Module, bk=None) -> None:
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
    def __init__(self, module: nn.Module, bk=None) -> None:
        self.module = module
