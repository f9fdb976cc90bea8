"""A rule made of rules: sub-rules run one after another as one layer (a layer with its
fused activation, a normalization and its affine).

SequenceRule runs its sub-rules in order in passes 1 and 3 and in reverse in passes 2 and 4
(a sub-schedule); its parameter gradients are the sub-rules' lists, concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import Rule, backward_releasing


class SequenceRule(Rule):
    """Sub-rules applied one after another (an empty list is the identity)."""

    def __init__(self, rules: Sequence[Rule], module=None) -> None:
        self.rules: list[Rule | None] = list(rules)
        self.module = module
        self.grads: list = []

    def set_keep_saved(self, keep: bool) -> None:
        self.keep_saved = keep
        for rule in self.rules:
            rule.set_keep_saved(keep)

    def has_trainable_params(self) -> bool:
        return any(rule.has_trainable_params() for rule in self.rules)

    def forward(self, a: Tensor) -> Tensor:
        for rule in self.rules:
            a = rule.forward(a)
        return a

    def chain(self, d: Tensor) -> Tensor:
        for rule in reversed(self.rules):
            d = rule.chain(d)
        return d

    def tangent(self, r: Tensor) -> Tensor:
        for rule in self.rules:
            r = rule.tangent(r)
        return r

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        """The sub-rules' pass-4 steps in reverse; unless keep_saved, each sub-rule (with what
        it saved) is released as soon as its step is done and its gradients are collected."""
        abar, self.grads = backward_releasing(self.rules, abar, need_input_grad, 0, 0,
                                              self.keep_saved)
        return abar

    def param_grads(self):
        return list(self.grads)
