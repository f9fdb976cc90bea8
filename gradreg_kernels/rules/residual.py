"""Rules made of rules: a chain of sub-rules run as one, and a residual sum y = f(x) + s(x).

SequenceRule runs its sub-rules in order in passes 1 and 3 and in reverse in passes 2 and 4
(a sub-schedule). ResidualRule holds two such chains, f and the shortcut s (an empty chain
is the identity); every pass is linear in the sum, so each pass runs both branches on the
same input and adds the results:
    forward:  y = f(x) + s(x)              chain:    Jᵀd = J_fᵀ d + J_sᵀ d
    tangent:  J r = J_f r + J_s r          backward: ā = (J_f + J_s)ᵀ z̄ + (second-order terms)
Each branch keeps its own saved state and second-order terms; parameter gradients are the
branches' lists, concatenated.
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


class ResidualRule(Rule):
    """y = f(x) + s(x) for two chains of rules f and s."""

    def __init__(self, f: Sequence[Rule], shortcut: Sequence[Rule], module=None) -> None:
        self.f, self.s = SequenceRule(f), SequenceRule(shortcut)
        self.module = module

    def set_keep_saved(self, keep: bool) -> None:
        self.f.set_keep_saved(keep)
        self.s.set_keep_saved(keep)

    def has_trainable_params(self) -> bool:
        return self.f.has_trainable_params() or self.s.has_trainable_params()

    def forward(self, a: Tensor) -> Tensor:
        return self.f.forward(a) + self.s.forward(a)

    def chain(self, d: Tensor) -> Tensor:
        return self.f.chain(d) + self.s.chain(d)

    def tangent(self, r: Tensor) -> Tensor:
        return self.f.tangent(r) + self.s.tangent(r)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        bf = self.f.backward(abar, need_input_grad)
        bs = self.s.backward(abar, need_input_grad)
        return bf + bs if need_input_grad else None

    def param_grads(self):
        return self.f.param_grads() + self.s.param_grads()
