"""The four passes over a list of layer rules (docs/math.md); knows no layer's details.

Pass 1 (forward) and pass 2 (input-gradient chain) give the loss and g = ∇_X Σ_n ℓ_n.
Pass 3 pushes r = ∂(penalty)/∂g forward through the layers (the adjoint of pass 2) and
pass 4 runs an ordinary backward from z̄ = w ∇(data)/B + H r, filling every rule's
parameter gradients and, when asked, the gradient at the input.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .rules.base import Rule


class Schedule:
    """Runs the passes; the rules keep what each pass saves for the next."""

    def __init__(self, rules: Sequence[Rule], head) -> None:
        self.rules = list(rules)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """Pass 1: the logits z."""
        a = x
        for rule in self.rules:
            a = rule.forward(a)
        return a

    def chain(self, pen_grad: Tensor) -> Tensor:
        """Pass 2: g = ∇_X Σ_n ℓ_n from the head's gradient at the logits."""
        d = pen_grad
        for rule in reversed(self.rules):
            d = rule.chain(d)
        return d

    def adjoint_and_backward(
        self, r: Tensor | None, zbar_data: Tensor, need_input_grad: bool
    ) -> Tensor | None:
        """Passes 3 and 4 from r (None: no penalty term) and the data term's seed at z.

        Returns the gradient at the input when ``need_input_grad``, else None.
        """
        zbar = zbar_data
        if r is not None:
            t = r
            for rule in self.rules:
                t = rule.tangent(t)
            hr = self.head.hvp(t)
            if hr is not None:
                zbar = zbar + hr
        last = len(self.rules) - 1
        for i in range(last, -1, -1):
            zbar = self.rules[i].backward(zbar, need_input_grad or i > 0)
        return zbar

    def param_grads(self):
        out = []
        for rule in self.rules:
            out.extend(rule.param_grads())
        return out
