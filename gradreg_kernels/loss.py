"""gradreg_loss: batch-mean data term + λ · mean_n ‖M ⊙ ∇_{x_n} ℓ_n‖², fused when possible.

    loss = w · (1/B) Σ_n data_n  +  λ · (1/B) Σ_n ‖M ⊙ g_n‖²,   g = ∇_X Σ_n ℓ_n

(data = CE, or the critic's output for head="output"; w = value_weight, 1 by default).
The fused path wraps the four-pass schedule in one autograd.Function: its forward runs
passes 1-2, its backward passes 3-4, seeded with r = (2λ/B) M² ⊙ g and z̄ = w ∇data/B.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import backend_choice, checks
from .autocast import Function
from .backend_protocol import NativeScheduleDeclined
from .backends import get_backend, measurable_backends
from .fallback import autograd_terms
from .plan import Plan, Unsupported, UnsupportedModelError, plan_of
from .rules.heads import check_head_targets, make_head, validate_head
from .schedule import Schedule


class FallbackWarning(UserWarning):
    """The model runs through plain autograd double backprop, not the fused schedule."""


@dataclass
class GradRegOutput:
    """What gradreg_loss returns. Only ``loss`` carries gradients."""

    loss: Tensor      # 0-dim: w · mean data + λ · penalty
    ce: Tensor        # 0-dim, detached: the batch-mean data term (CE; mean output for "output")
    penalty: Tensor   # 0-dim, detached: mean_n ‖M ⊙ ∇_{x_n} ℓ_n‖² (before λ)
    logits: Tensor    # (B, K), detached model output
    backend: str      # which path ran: "torch", "cpu", "triton", "cuda" or "autograd"


def _weighted_sum(data: Tensor, penalty: Tensor, w: float, lam: float) -> Tensor:
    """w · data + λ · penalty as a fresh tensor (the fused step's and the fallback's loss),
    where a weight of exactly 0 removes its term (a non-finite term under a zero weight is
    absent, not 0 · inf = NaN)."""
    if w == 0.0:  # λ > 0 then (both 0 is refused)
        return penalty.mul(lam)
    scaled = data.clone() if w == 1.0 else data.mul(w)
    if lam == 0.0:
        return scaled
    if lam <= torch.finfo(penalty.dtype).max:
        return scaled.add_(penalty, alpha=lam)
    # alpha must fit the dtype; λ · penalty then overflows to inf, and is reported
    return scaled.add_(penalty.mul(lam))


class _FusedCall:
    """State of one fused call, shared by the Function's forward and backward."""

    def __init__(self, schedule: Schedule, x: Tensor, y: Tensor | None, mask: Tensor | None,
                 lam: float, value_weight: float, check_finite: bool, kernels,
                 plan: Plan, deferred: checks.DeferredChecks | None = None) -> None:
        self.schedule, self.x, self.y, self.mask = schedule, x, y, mask
        self.lam, self.w, self.check_finite = lam, value_weight, check_finite
        self.kernels, self.plan, self.deferred = kernels, plan, deferred

    def _pass_1(self, x: Tensor) -> Tensor:
        """The logits; a backend's native schedule that declines the call hands it to the
        Python schedule."""
        try:
            return self.schedule.forward(x)
        except NativeScheduleDeclined:
            s = self.schedule
            self.schedule = Schedule(self.plan, self.kernels, s.head, s.keep_saved)
            return self.schedule.forward(x)

    def forward(self) -> Tensor:
        x, mask = self.x, self.mask
        b = x.shape[0]
        z = self._pass_1(x)
        head, y = self.schedule.head, self.y
        labels = None  # (y, K) for the deferred check
        if (self.check_finite and head.uses_labels and y is not None
                and not y.is_floating_point() and not head.checks_own_labels(z)):
            if self.deferred is not None and getattr(head, "nan_on_bad_labels", False):
                checks.check_matrix_logits(z)
                labels = (y, z.shape[1])
            else:
                checks.check_label_range(y, z)
        ev = head.evaluate(z, y)
        g = self.schedule.chain(ev.pen_grad)
        pen_sum, seed = self.kernels.penalty_terms(g, mask)
        self.data = ev.data.mean()
        self.penalty = pen_sum.div_(b)  # a fresh 0-dim sum: divided in place
        loss = _weighted_sum(self.data, self.penalty, self.w, self.lam)
        if self.deferred is not None:
            self.deferred.settle(loss, self.data, self.penalty, labels)
        elif self.check_finite:
            checks.check_finite_loss(loss, self.data, self.penalty)
        self.schedule.commit()
        self.logits, self.data_grad = z, ev.data_grad
        self.g = None if self.lam == 0 else seed
        return loss

    @torch._disable_dynamo  # passes 3-4 run eagerly inside a compiled step's backward
    def backward(self, grad_out: Tensor, need_input_grad: bool) -> tuple[list, Tensor | None]:
        if self.data_grad is None:
            raise RuntimeError("gradreg_loss: trying to backward through the fused step a "
                               "second time, but its saved tensors were released; pass "
                               "keep_saved=True to gradreg_loss to backward more than once")
        b = self.x.shape[0]
        zbar = self.data_grad * (grad_out * (self.w / b))
        if not self.schedule.keep_saved:
            self.data_grad = None
        # r is passed straight on (no local keeps it), so pass 3 can release it
        xgrad, grads = self.schedule.adjoint_and_backward(self._tangent_seed(grad_out, b), zbar,
                                                          need_input_grad)
        return grads, xgrad

    def _tangent_seed(self, grad_out: Tensor, b: int) -> Tensor | None:
        """r = (2λ/B) g · grad_out, the seed of pass 3 (None without a penalty); g is scaled in
        place into r and released (no second g-sized buffer), unless keep_saved."""
        if self.g is None:
            return None
        g, scale = self.g, grad_out * (2.0 * self.lam / b)
        if self.schedule.keep_saved:
            return g * scale
        self.g = None
        # in place where the product keeps g's dtype (a float32 0-dim scale on a bf16 g
        # does: computed in float32, rounded once)
        return g.mul_(scale) if torch.result_type(g, scale) == g.dtype else g * scale


class _FusedGradReg(Function):
    """loss(θ, x): forward = passes 1-2, backward = passes 3-4 (once differentiable)."""

    @staticmethod
    def forward(ctx, runner: _FusedCall, params: list[nn.Parameter], x: Tensor, *flat: Tensor):
        ctx.runner, ctx.params = runner, params
        return runner.forward()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        grads, xgrad = ctx.runner.backward(grad_out, ctx.needs_input_grad[2])
        by_param: dict[int, Tensor] = {}
        for p, g in grads:  # a module used at two places (shared weights) gives two terms
            if g is not None:
                prev = by_param.get(id(p))
                by_param[id(p)] = g if prev is None else prev + g
        return (None, None, xgrad, *[by_param.get(id(p)) for p in ctx.params])


_WARNED: set[tuple[type, str]] = set()


def _warn_fallback(model: nn.Module, why: Unsupported) -> None:
    key = (type(model), str(why))
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"gradreg_loss runs plain autograd double backprop: {why}",
                      FallbackWarning, stacklevel=3)


# excluded from dynamo: a torch.compile'd step runs the fused step as one opaque call
# (torch._disable_dynamo is torch.compiler.disable applied at the first call, so importing
# the package does not import dynamo)
@torch._disable_dynamo
def gradreg_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    lam: float = 1.0,
    *,
    head: str | Callable[[Tensor, Tensor | None], Tensor] = "ce",
    mask: Tensor | None = None,
    backend: str = "auto",
    strict: bool = False,
    value_weight: float = 1.0,
    check_finite: bool = True,
    keep_saved: bool = False,
    data: str | Callable[[Tensor, Tensor | None], Tensor] | None = None,
    label_smoothing: float = 0.0,
    class_weight: Tensor | None = None,
) -> GradRegOutput:
    """Input-gradient-regularized loss of ``model`` on the batch (x, y).

    loss = value_weight · mean_n data_n + lam · mean_n ‖mask ⊙ ∇_{x_n} ℓ_n‖²

    Args:
        model: the network; any forward that torch.fx can trace over supported layers and
            operations runs fused (README, "What runs fused"), anything else through plain
            autograd (one FallbackWarning naming the node and its line in the forward). A
            ``torch.compile``d model runs as the module it wraps.
        x: (B, ...) floating-point inputs, same device and dtype as the model.
        y: what the head reads: (B,) integer labels in [0, K) or (B, K) probability targets
            for "ce" / "logprob_sum", targets of the logits' shape for "mse" / "bce",
            anything (or None) for a callable; unused for "output".
        lam: penalty weight λ >= 0 (λ = λ_paper / (2B) in the paper code's convention).
        head: the penalised per-example objective ℓ_n at the logits z: "ce" (CE),
            "logprob_sum" (−mean_k log p_k, data term CE), "output" (Σ output), "mse"
            (mean_k (z − y)²), "bce" (mean_k of BCE with logits), or a callable
            ``head(z, y) -> (B,)``, any twice-differentiable per-example loss (its
            derivatives come from autograd on the logits alone; README, "Heads").
        data: the data term when it is not the head's own: a name or a callable as above.
        label_smoothing, class_weight: cross-entropy's options for "ce" / "logprob_sum" as
            in ``F.cross_entropy(..., reduction="none")`` (the batch mean divides by B, not
            by the summed weights).
        mask: annotation mask broadcastable to x; penalises ‖mask ⊙ ∇ℓ‖².
        backend: "auto", "torch" or a registered fast backend. On a GPU, "auto" times the
            whole step on each usable backend at the first call of a model and batch shape,
            and runs the fastest (one AutoBackendChoice warning says which; backend_choice).
        strict: raise UnsupportedModelError instead of falling back.
        value_weight: weight w of the data term (0 gives the penalty alone, e.g. for R1).
            A weight of exactly 0 (``lam`` or ``value_weight``) removes its term: a
            non-finite term under it is absent, not 0 · inf = NaN. Both 0 is an error.
        check_finite: check x, mask, labels and the trainable parameters (a ValueError
            naming the first non-finite one), and raise NonFiniteLossError on a NaN/inf
            loss before any gradient is produced and before BatchNorm's running statistics
            change. On a GPU the checks read back once per step (checks.DeferredChecks).
        keep_saved: keep every saved tensor until the graph is freed, so that backward can
            run more than once (retain_graph=True, gradcheck); by default what the passes
            saved is released as backward proceeds, which lowers peak memory.

    Returns:
        GradRegOutput; ``out.loss.backward()`` fills p.grad of every parameter that
        requires one (and x.grad when x requires grad).
    """
    lam = checks.check_lam(lam)
    model = _uncompiled(model)
    validate_head(head)
    if data is not None:
        validate_head(data, "data")
    params = checks.check_model_and_x(model, x)
    checks.check_not_sharded(model)
    y, soft = check_head_targets(head, data, y, x, label_smoothing, class_weight)
    mask = checks.check_mask(mask, x)
    value_weight = checks.check_value_weight(value_weight)
    if lam == 0.0 and value_weight == 0.0:
        raise ValueError("lam and value_weight are both 0: the loss would be identically 0 "
                         "(a zero weight removes its term); give at least one a weight")

    plan = plan_of(model)
    if backend == "auto" and not isinstance(plan, Unsupported) and backend_choice.measured(
            x.device):
        backend = _measured_backend(model, x, y, lam, head, mask, value_weight, data,
                                    label_smoothing, class_weight)
    # the backend only for a fused step: a model that falls back never builds an extension
    kernels = None if isinstance(plan, Unsupported) else get_backend(backend, x.device)
    deferred = None
    if check_finite and kernels is not None and kernels.defers_finite_checks:
        deferred = checks.DeferredChecks(model, x, mask, params)  # one read-back, at the end
    elif check_finite:
        checks.check_finite_input(
            x, mask, checks.all_finite if kernels is None else kernels.all_finite)
        checks.check_finite_params(model, params, checks.all_finite_many if kernels is None
                                   else kernels.all_finite_many)
    head_obj = make_head(head, kernels, data, label_smoothing, class_weight, soft)
    if isinstance(plan, Unsupported):
        if strict:
            raise UnsupportedModelError(f"gradreg_loss(strict=True) cannot run fused: {plan}")
        _warn_fallback(model, plan)
        return _autograd_loss(model, x, y, lam, head_obj, mask, value_weight, check_finite)
    assert kernels is not None
    return _fused_loss(plan, params, x, y, lam, head_obj, mask, kernels, value_weight, check_finite,
                       keep_saved, deferred)


def _measured_backend(model, x, y, lam, head, mask, value_weight, data, label_smoothing,
                      class_weight) -> str:
    """The fastest backend for this model and batch (backend_choice), one of several:
    "auto" (the priority order) where fewer than two can be measured."""

    def candidates() -> list[str]:
        names = measurable_backends(x.device)
        return names if len(names) >= 2 else []

    def run(name: str) -> None:
        model.zero_grad(set_to_none=True)
        gradreg_loss(model, x.detach(), y, lam, head=head, mask=mask, backend=name,
                     value_weight=value_weight, check_finite=False, data=data,
                     label_smoothing=label_smoothing,
                     class_weight=class_weight).loss.backward()

    extra = (y is None, mask is None, head if isinstance(head, str) else id(head))
    return backend_choice.choose(model, x, candidates, run, extra)


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile(model)`` wraps: the fused step never calls forward,
    and a compiled forward cannot be differentiated twice (the fallback's double backprop
    runs the original module)."""
    orig = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(orig, nn.Module):
        return orig
    return model


def _fused_loss(plan: Plan, params: list[nn.Parameter], x: Tensor, y: Tensor | None, lam: float,
                head, mask: Tensor | None, kernels, value_weight: float,
                check_finite: bool, keep_saved: bool,
                deferred: checks.DeferredChecks | None = None) -> GradRegOutput:
    with kernels.precision_scope():  # autocast off where the backend runs it in float32
        schedule = (kernels.native_schedule(plan, x, head, keep_saved)
                    or Schedule(plan, kernels, head, keep_saved))
        runner = _FusedCall(schedule, x, y, mask, lam, value_weight, check_finite, kernels,
                            plan, deferred)
        loss = _FusedGradReg.apply(runner, params, x, *params)
    return GradRegOutput(loss, runner.data.detach(), runner.penalty.detach(),
                         runner.logits.detach(), kernels.name)


def _autograd_loss(model: nn.Module, x: Tensor, y: Tensor | None, lam: float, head,
                   mask: Tensor | None, value_weight: float, check_finite: bool
                   ) -> GradRegOutput:
    data, pen, z = autograd_terms(model, x, y, head, mask, check_finite)
    data_mean, pen_mean = data.mean(), pen.mean()
    loss = _weighted_sum(data_mean, pen_mean, value_weight, lam)
    if check_finite:
        checks.check_finite_loss(loss.detach(), data_mean.detach(), pen_mean.detach())
    return GradRegOutput(loss, data_mean.detach(), pen_mean.detach(), z.detach(), "autograd")
