"""Flatten and Identity: reshapes, linear and parameter-free."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Rule


class FlattenRule(Rule):
    def __init__(self, module: nn.Flatten, bk=None) -> None:
        self.module = module

    def forward(self, a: Tensor) -> Tensor:
        self.in_shape = a.shape
        return a.flatten(self.module.start_dim, self.module.end_dim)

    def _out_shape(self, t: Tensor) -> Tensor:
        return t.flatten(self.module.start_dim, self.module.end_dim)

    def chain(self, d: Tensor) -> Tensor:
        return d.reshape(self.in_shape)

    def tangent(self, r: Tensor) -> Tensor:
        return self._out_shape(r)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        return abar.reshape(self.in_shape) if need_input_grad else None


class IdentityRule(Rule):
    def __init__(self, module: nn.Module, bk=None) -> None:
        self.module = module
