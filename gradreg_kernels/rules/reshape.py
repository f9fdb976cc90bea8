"""Flatten, Unflatten, Identity and constant padding: fixed linear maps without parameters."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Rule


class _ReshapeRule(Rule):
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


class FlattenRule(_ReshapeRule):
    def __init__(self, module: nn.Flatten, bk=None) -> None:
        self.module = module

    def _out(self, t: Tensor) -> Tensor:
        return t.flatten(self.module.start_dim, self.module.end_dim)


class UnflattenRule(_ReshapeRule):
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


class IdentityRule(Rule):
    def __init__(self, module: nn.Module, bk=None) -> None:
        self.module = module
