"""The four passes over a plan's graph of rules (docs/math.md); knows no layer's details.

Pass 1 (forward, in topological order) and pass 2 (input-gradient chain, in reverse) give
the loss and g = ∇_X Σ_n ℓ_n. Pass 3 pushes r = ∂(penalty)/∂g forward through the graph
(the adjoint of pass 2) and pass 4 runs an ordinary backward from z̄ = w ∇(data)/B + H r,
filling every rule's parameter gradients and, when asked, the gradient at the input.

Values live in numbered slots (slot 0 the input). A value read by several nodes hands the
same tensor to each in passes 1 and 3, and sums their adjoints in passes 2 and 4; a value
(or its tangent) is released after its last reader, an adjoint as soon as its producer has
consumed it, so a chain holds what the list of rules it replaces held.
"""

from __future__ import annotations

from torch import Tensor

from .plan import Plan
from .rules.base import Rule


def _accumulate(slots: list, s: int, g: Tensor) -> None:
    """slots[s] += g, out of place (g may be a tensor a rule keeps, or the same tensor that
    another input received)."""
    prev = slots[s]
    slots[s] = g if prev is None else prev + g


class Schedule:
    """Runs the passes of one call; the rules keep what each pass saves for the next.

    Unless ``keep_saved``, what a rule saved is released as soon as the passes are done with
    it (tangent-only state in pass 3, the whole rule after its pass-4 step), so passes 3-4
    can run once; with ``keep_saved`` they can run again (retain_graph, gradcheck).
    """

    def __init__(self, plan: Plan, kernels, head, keep_saved: bool = False) -> None:
        self.plan, self.kernels, self.head, self.keep_saved = plan, kernels, head, keep_saved
        self.rules: list[Rule | None] = [None] * len(plan.steps)

    def forward(self, x: Tensor) -> Tensor:
        """Pass 1: the logits z. Each rule is made here (sizes the forward reads off tensors
        are known now) and keeps what later passes need."""
        env: list = [None] * self.plan.n_slots
        env[0] = x
        rules, kernels, keep = self.rules, self.kernels, self.keep_saved
        for i, st in enumerate(self.plan.steps):
            if st.host is not None:
                env[st.out] = st.host(env)
            else:
                rule = st.make(kernels, env)
                rule.set_keep_saved(keep)
                rules[i] = rule
                if st.multi:
                    env[st.out] = rule.forward(*[env[s] for s in st.ins[:st.n_tensor_ins]])
                else:
                    env[st.out] = rule.forward(env[st.ins[0]])
            for s in st.free_fwd:
                env[s] = None
        return env[self.plan.out]

    def commit(self) -> None:
        """Every rule's effect on its module's state (BatchNorm's running statistics), once
        the loss of passes 1-2 passed the finite checks."""
        for rule in self.rules:
            if rule is not None:
                rule.commit()

    def chain(self, pen_grad: Tensor) -> Tensor:
        """Pass 2: g = ∇_X Σ_n ℓ_n from the head's gradient at the logits."""
        adj: list = [None] * self.plan.n_slots
        adj[self.plan.out] = pen_grad
        steps = self.plan.steps
        for i in range(len(steps) - 1, -1, -1):
            rule = self.rules[i]
            if rule is None:  # a host step
                continue
            st = steps[i]
            d, adj[st.out] = adj[st.out], None
            if d is None:
                continue
            g = rule.chain(d)
            if st.multi:
                for s, gi in zip(st.ins, g):
                    _accumulate(adj, s, gi)
            else:
                _accumulate(adj, st.ins[0], g)
        return adj[0]

    def _tangent(self, tan: list) -> Tensor:
        """Pass 3 from tan[0] = r: each node's J applied to its inputs' tangents."""
        for i, st in enumerate(self.plan.steps):
            rule = self.rules[i]
            if rule is None:
                continue
            if st.multi:
                t = rule.tangent(*[tan[s] for s in st.ins[:st.n_tensor_ins]])
            else:
                t = rule.tangent(tan[st.ins[0]])
            for s in st.free_tan:
                tan[s] = None
            tan[st.out] = t
        return tan[self.plan.out]

    def adjoint_and_backward(
        self, r: Tensor | None, zbar_data: Tensor, need_input_grad: bool
    ) -> tuple[Tensor | None, list]:
        """Passes 3 and 4 from r (None: no penalty term) and the data term's seed at z.

        Returns the gradient at the input (None unless ``need_input_grad``) and the list of
        (parameter, gradient) pairs.
        """
        zbar = zbar_data
        plan = self.plan
        if r is not None:
            tan: list = [None] * plan.n_slots
            tan[0], r = r, None  # the rules hold the tangent only as long as they need it
            hr = self.head.hvp(self._tangent(tan))
            del tan
            if hr is not None:
                zbar = zbar + hr
        # a node runs its pass-4 step when it has trainable parameters or an input whose ā
        # is needed: below the first parameters nothing needs ā unless the input does, so a
        # leading Flatten or Dropout costs no extra product at the layer above
        steps, rules = plan.steps, self.rules
        need = [False] * plan.n_slots
        need[0] = need_input_grad
        runs = [False] * len(steps)
        for i, st in enumerate(steps):
            rule = rules[i]
            if rule is not None and (rule.has_trainable_params()
                                     or any(need[s] for s in st.ins[:st.n_tensor_ins])):
                runs[i] = need[st.out] = True
        abar: list = [None] * plan.n_slots
        abar[plan.out] = zbar
        del zbar
        grads: list = []
        for i in range(len(steps) - 1, -1, -1):
            rule = rules[i]
            if rule is None:
                continue
            st = steps[i]
            ab, abar[st.out] = abar[st.out], None
            if runs[i] and ab is not None:
                ins = st.ins[:st.n_tensor_ins]
                want = any(need[s] for s in ins)
                res = rule.backward(ab, want)
                del ab
                grads.extend(rule.param_grads())
                if want:
                    for s, g in (zip(ins, res) if st.multi else ((ins[0], res),)):
                        if need[s]:
                            _accumulate(abar, s, g)
                    del res
            if not self.keep_saved:
                rules[i] = None  # with what it saved
        return (abar[0] if need_input_grad else None), grads
