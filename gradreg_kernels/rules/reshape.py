"""Flatten, Unflatten, Identity and padding (constant, reflection, replication): fixed linear
maps without parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Rule


class ReshapeRule(Rule):
    """A fixed reshape y = R a: tangent applies R, chain and backward its inverse (Rᵀ)."""

    def _out(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, a: Tensor) -> Tensor:
        self.in_shape = a.shape
        return self._out(a)

    def chain(self, d: Tensor) -> Tensor:
        return d.reshape(self.in_shape)

    def tangent(self, r: Tensor) -> Tensor:
        return self._out(r)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        return abar.reshape(self.in_shape) if need_input_grad else None


class FlattenRule(ReshapeRule):
    def __init__(self, module: nn.Flatten, bk=None) -> None:
        self.module = module

    def _out(self, t: Tensor) -> Tensor:
        return t.flatten(self.module.start_dim, self.module.end_dim)


class UnflattenRule(ReshapeRule):
    def __init__(self, module: nn.Unflatten, bk=None) -> None:
        self.module = module

    def _out(self, t: Tensor) -> Tensor:
        return t.unflatten(self.module.dim, self.module.unflattened_size)


class ConstantPadRule(Rule):
    """nn.ZeroPad1d/2d/3d, nn.ConstantPad1d/2d/3d: y = P a + c (padding c around a; negative
    amounts crop). The tangent pads r with zeros (P r), chain and backward apply Pᵀ: the
    padding taken off again, a crop being undone with zeros."""

    def __init__(self, module: nn.Module, bk=None) -> None:
        self.module = module
        self.pad = tuple(int(p) for p in module.padding)
        self.unpad = tuple(-p for p in self.pad)

    def forward(self, a: Tensor) -> Tensor:
        return F.pad(a, self.pad, value=float(self.module.value))

    def chain(self, d: Tensor) -> Tensor:
        return F.pad(d, self.unpad)

    def tangent(self, r: Tensor) -> Tensor:
        return F.pad(r, self.pad)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        return F.pad(abar, self.unpad) if need_input_grad else None


class IndexPadRule(Rule):
    """Reflection or replication padding: y = P a with P a fixed gather of input positions.
    The tangent applies P (the same padding of r), chain and backward Pᵀ (ATen's padding
    backward: the border values summed back onto the positions they were copied from)."""

    def __init__(self, mode: str, pad: tuple[int, ...], module: nn.Module | None = None) -> None:
        self.module, self.mode, self.pad = module, mode, tuple(int(p) for p in pad)
        kind = "reflection" if mode == "reflect" else "replication"
        self.transpose = getattr(torch.ops.aten, f"{kind}_pad{len(self.pad) // 2}d_backward")

    def forward(self, a: Tensor) -> Tensor:
        self.in_shape = a.shape
        return F.pad(a, self.pad, mode=self.mode)

    def _t(self, d: Tensor) -> Tensor:
        like = d.new_empty((1,) * len(self.in_shape)).expand(self.in_shape)
        return self.transpose(d, like, list(self.pad))

    def chain(self, d: Tensor) -> Tensor:
        return self._t(d)

    def tangent(self, r: Tensor) -> Tensor:
        return F.pad(r, self.pad, mode=self.mode)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        return self._t(abar) if need_input_grad else None


class IdentityRule(Rule):
    def __init__(self, module: nn.Module, bk=None) -> None:
        self.module = module
