"""The interface every layer rule implements: one layer's part in each of the four passes.

For a layer y = F(a; θ) with Jacobian J = ∂y/∂a (notation of docs/math.md):

- ``forward(a)``        pass 1: y = F(a; θ), saving what later passes need.
- ``chain(d)``          pass 2: Jᵀ d (the input-gradient chain), saving d if needed.
- ``tangent(r)``        pass 3: J r (the adjoint of the chain, run forward); accumulates the
                        θ-gradient of ⟨d, J r⟩ and keeps the second-order term at a.
- ``backward(abar)``    pass 4: Jᵀ ā + (second-order term); accumulates (∂F/∂θ)ᵀ ā.
- ``commit()``          after passes 1-2, once the loss passed the finite checks: the
                        step's effect on module state (BatchNorm's running statistics).

After pass 4, ``param_grads()`` lists (parameter, gradient) for every parameter that
requires a gradient. A rule object serves one call of the schedule.
"""

from __future__ import annotations

from torch import Tensor, nn


class Rule:
    """Base class: a parameter-free, identity layer. Subclasses override what they change."""

    #: whether the rule reads several tensors (MultiInputRule)
    multi: bool = False

    #: the module this rule stands for (for messages and parameter bookkeeping)
    module: nn.Module | None = None
    #: keep tangent-only state after pass 3 (so passes 3-4 can run again)
    keep_saved: bool = False

    def set_keep_saved(self, keep: bool) -> None:
        self.keep_saved = keep

    def commit(self) -> None:
        """Apply what pass 1 computed for the module's state (nothing here); runs once the
        loss is known finite, so a step that raises leaves the module as it was."""

    def has_trainable_params(self) -> bool:
        """Whether pass 4 must fill a gradient here (so the rules before need theirs)."""
        m = self.module
        if m is None:
            return False
        if not m._modules:  # a leaf module (most layers): its own parameters, no walk
            return any(p is not None and p.requires_grad for p in m._parameters.values())
        return any(p.requires_grad for p in m.parameters())

    def forward(self, a: Tensor) -> Tensor:
        return a

    def chain(self, d: Tensor) -> Tensor:
        return d

    def tangent(self, r: Tensor) -> Tensor:
        return r

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        return abar if need_input_grad else None

    def param_grads(self) -> list[tuple[nn.Parameter, Tensor]]:
        return []

    def take_tangent_term(self) -> Tensor | None:
        """The weight-gradient term of the tangent pass (``gw_tangent``) for pass 4 to add
        to in place: the term itself (released here), or a copy of it under keep_saved."""
        term = getattr(self, "gw_tangent", None)
        if term is None or not self.keep_saved:
            self.gw_tangent = None
            return term
        return term.clone()

    def add_tangent_term(self, gw: Tensor) -> Tensor:
        """gw plus the weight-gradient term the tangent pass computed (``gw_tangent``), if
        any; the term is released unless ``keep_saved``."""
        term = self.take_tangent_term()
        if term is None:
            return gw
        return gw.add_(term) if gw.dtype == term.dtype else gw + term


class MultiInputRule(Rule):
    """A rule of k tensor inputs a_1..a_k and one output y = F(a_1, ..., a_k; θ):

    - ``forward(*a)``            y, saving what later passes need;
    - ``chain(d)``               (J_1ᵀ d, ..., J_kᵀ d);
    - ``tangent(*r)``            Σ_i J_i r_i;
    - ``backward(abar, need)``   (J_1ᵀ ā, ..., J_kᵀ ā) (None unless ``need``).
    """

    multi = True


class FixedLinearRule(Rule):
    """y = A a for a fixed, parameter-free linear map A (pooling with fixed windows, reshapes,
    padding): ``_apply`` is A, ``_transpose`` Aᵀ (given the input's shape, which the forward
    keeps). The tangent applies A, chain and backward Aᵀ; no second-order term."""

    in_shape: tuple[int, ...] = ()

    def _apply(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def _transpose(self, d: Tensor) -> Tensor:
        raise NotImplementedError

    def _shape_only_input(self, d: Tensor) -> Tensor:
        """A tensor with the input's shape and no storage of its own (for ATen backward ops
        that read only the input's sizes)."""
        return d.new_empty((1,) * len(self.in_shape)).expand(self.in_shape)

    def forward(self, a: Tensor) -> Tensor:
        self.in_shape = a.shape
        return self._apply(a)

    def chain(self, d: Tensor) -> Tensor:
        return self._transpose(d)

    def tangent(self, r: Tensor) -> Tensor:
        return self._apply(r)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        return self._transpose(abar) if need_input_grad else None


def backward_releasing(rules: list, abar: Tensor, need_input_grad: bool, first: int,
                       stop: int, keep_saved: bool) -> tuple[Tensor | None, list]:
    """Pass 4 over ``rules[stop:]`` in reverse, rule i asked for its input gradient when
    ``need_input_grad or i > first``. Each rule's gradients are collected and, unless
    keep_saved, its slot in ``rules`` is set to None as soon as its step is done, so what
    it saved goes then (the peak is lower). Returns the last ā and the (param, grad) list."""
    grads = []
    for i in range(len(rules) - 1, stop - 1, -1):
        abar = rules[i].backward(abar, need_input_grad or i > first)
        grads.extend(rules[i].param_grads())
        if not keep_saved:
            rules[i] = None
    return abar, grads


def wants_grad(p: Tensor | None) -> bool:
    """Whether a parameter exists and asks for a gradient."""
    return p is not None and p.requires_grad

