"""The four passes over a list of layer rules (docs/math.md); knows no layer's details.

Pass 1 (forward) and pass 2 (input-gradient chain) give the loss and g = ∇_X Σ_n ℓ_n.
Pass 3 pushes r = ∂(penalty)/∂g forward through the layers (the adjoint of pass 2) and
pass 4 runs an ordinary backward from z̄ = w ∇(data)/B + H r, filling every rule's
parameter gradients and, when asked, the gradient at the input.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .rules.base import Rule, backward_releasing


class Schedule:
    """Runs the passes; the rules keep what each pass saves for the next.

    Unless ``keep_saved``, what a rule saved is released as soon as the passes are done with
    it (tangent-only state in pass 3, the whole rule after its pass-4 step), so passes 3-4
    can run once; with ``keep_saved`` they can run again (retain_graph, gradcheck).
    """

    def __init__(self, rules: Sequence[Rule], head, keep_saved: bool = False) -> None:
        self.rules: list[Rule | None] = list(rules)
        self.head = head
        self.keep_saved = keep_saved
        for rule in self.rules:
            rule.set_keep_saved(keep_saved)

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
    ) -> tuple[Tensor | None, list]:
        """Passes 3 and 4 from r (None: no penalty term) and the data term's seed at z.

        Returns the gradient at the input (None unless ``need_input_grad``) and the list of
        (parameter, gradient) pairs.
        """
        zbar = zbar_data
        if r is not None:
            t, r = r, None  # the rules hold the tangent only as long as they need it
            for i in range(len(self.rules)):  # no loop variable outlives the pass
                t = self.rules[i].tangent(t)
            hr = self.head.hvp(t)
            if hr is not None:
                zbar = zbar + hr
        # Below the first rule with trainable parameters nothing needs ā unless the input
        # does: a leading Flatten or Dropout must not cost an extra product at the layer above.
        first = next((i for i, rule in enumerate(self.rules) if rule.has_trainable_params()),
                     len(self.rules))
        stop = 0 if need_input_grad else first
        zbar, grads = backward_releasing(self.rules, zbar, need_input_grad, first, stop,
                                         self.keep_saved)
        if not self.keep_saved:
            self.rules = [None] * len(self.rules)
        return (zbar if need_input_grad else None), grads
