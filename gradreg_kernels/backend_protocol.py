"""The contract between the rules and a backend: the methods a rule calls, by family.

A backend is any object with these methods (TorchBackend implements all of them portably;
the cpu, cuda and triton backends subclass it and override what they run faster). Shapes
follow docs/math.md: a batch of N, features in/out, (N, C, H, W) images, K classes.

State a backend keeps between passes (``saved`` below: an activation's mask or z, a
dropout mask, batch norm's chain operands, a Linear's kept δ) is opaque to the rules: a rule
stores what a forward or chain step returned and hands it back, unchanged, to the later
steps of the same backend. Each backend types its own (a ``BackendState`` dataclass per
kind of state).

A leaf module: it imports torch and the activation spec alone, so that rules may name the
contract without importing a backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor
from torch.nn import Module

from .activation_math import ActivationSpec
from .tensor_ops import ConvGeom


class BackendState:
    """The base of every backend's between-pass state class (one dataclass per kind: an
    activation's bit mask or kept z, batch norm's chain operands, a z with non-finite
    values). Only the backend that made one reads it; a rule stores it and hands it back."""


#: what a forward or chain step keeps for the later passes: a tensor (the portable backend's
#: z, y or dropout mask) or one of a backend's own state objects
Saved = Tensor | BackendState


@dataclass(frozen=True)
class TransposedDelta:
    """A Linear's pass-2 δ (N, out) kept as δᵀ (out, N), contiguous: what ``keep_delta``
    returns where a backend's weight product would copy δ transposed anyway (so δ itself
    can be released when pass 2 moves on)."""

    t: Tensor

    def delta(self) -> Tensor:
        """δ (N, out), as a view of δᵀ."""
        return self.t.t()


#: a Linear's δ as ``keep_delta`` keeps it and ``linear_weight_grad`` reads it
KeptDelta = Tensor | TransposedDelta


class Precision(Protocol):
    """The precision a fused step runs in."""

    def precision_scope(self) -> AbstractContextManager:
        """A context around the whole step (the cpu backend turns autocast off where its
        dtype would be emulated; others change nothing)."""
        ...


class Products(Protocol):
    """Linear and convolution products and their transposes."""

    def product_weight(self, w: Tensor) -> Tensor:
        """A layer's weight as this backend's products read it, made once per step (under
        CPU autocast the cpu backend's bf16 copy; else w itself)."""
        ...

    def product_input(self, a: Tensor) -> Tensor:
        """A Linear's input as this backend's products read it (under CPU autocast the cpu
        backend's bf16 copy, made once and kept for the weight product; else a itself)."""
        ...

    def linear(self, a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """a wᵀ + b: (N, in) → (N, out)."""
        ...

    def linear_input_grad(self, d: Tensor, w: Tensor) -> Tensor:
        """d w: (N, out) → (N, in)."""
        ...

    def linear_weight_grad(self, pairs: Sequence[tuple[KeptDelta, Tensor]],
                           acc: Tensor | None = None) -> Tensor:
        """Σ_k d_kᵀ a_k (+ acc): (out, in); d_k a tensor or a ``keep_delta`` result."""
        ...

    def weight_term_in_tangent_pass(self, n: int, out_f: int, in_f: int) -> bool:
        """Whether a Linear (in_f → out_f) on n rows computes its dᵀ r weight term in the
        tangent pass (releasing d and r there) rather than as half of pass 4's
        doubled-batch product (rules/linear.py)."""
        ...

    def linear_weight_term(self, d: KeptDelta, a: Tensor) -> Tensor:
        """dᵀ a as a term that ``linear_param_grads`` later adds to (its ``acc``), in the
        dtype the backend keeps such a term in (the parameter's, or the products' dtype
        under autocast)."""
        ...

    def linear_param_grads(self, pairs: Sequence[tuple[Tensor, Tensor | None]],
                           acc: Tensor | None, need_w: bool, need_b: bool
                           ) -> tuple[Tensor | None, Tensor | None]:
        """(Σ_k d_kᵀ a_k (+ acc), Σ_n d_1[n]), each None where not needed; the weight
        gradient in the parameter's dtype."""
        ...

    def keep_delta(self, d: Tensor, in_features: int) -> KeptDelta:
        """A Linear's pass-2 δ (N, out) in the form this backend's weight product reads."""
        ...

    def weight_grad_operands(self, a: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """A Linear's input a and tangent r (N, in) as pass 4's weight product reads them."""
        ...

    def conv2d(self, a: Tensor, w: Tensor, b: Tensor | None, geom: ConvGeom) -> Tensor:
        """2-D cross-correlation (N, C, H, W) → (N, O, H', W')."""
        ...

    def conv2d_input_grad(self, d: Tensor, w: Tensor, input_shape: Sequence[int],
                          geom: ConvGeom) -> Tensor:
        """The transposed convolution (N, O, H', W') → (N, C, H, W)."""
        ...

    def conv2d_bias_grad(self, d: Tensor) -> Tensor:
        """Σ_{n,h,w} d: (N, O, H', W') → (O,), in float32 at least."""
        ...

    def conv2d_weight_grad(self, pairs: Sequence[tuple[Tensor, Tensor]], w: Tensor,
                           geom: ConvGeom) -> Tensor:
        """Σ_k of the weight gradient of ⟨d_k, conv(a_k, W)⟩: the shape of ``w``."""
        ...


class Elementwise(Protocol):
    """Activation steps, dropout and the penalty's elementwise terms."""

    def act_forward(self, spec: ActivationSpec, z: Tensor) -> tuple[Tensor, Saved]:
        """y = σ(z) and the state the later steps read."""
        ...

    def act_chain(self, spec: ActivationSpec, saved: Saved, d: Tensor) -> Tensor:
        """σ'(z) ⊙ d."""
        ...

    def act_tangent(self, spec: ActivationSpec, saved: Saved, r: Tensor, u: Tensor | None
                    ) -> tuple[Tensor, Tensor | None]:
        """(σ'(z) ⊙ r, σ''(z) ⊙ u ⊙ r); the second is None for piecewise-linear σ."""
        ...

    def act_backward(self, spec: ActivationSpec, saved: Saved, abar: Tensor,
                     s: Tensor | None) -> Tensor:
        """σ'(z) ⊙ ā + s."""
        ...

    def dropout_forward(self, a: Tensor, p: float) -> tuple[Tensor, Saved]:
        """y = a ⊙ m, m ∈ {0, 1/(1−p)} drawn as torch's dropout draws it, and m."""
        ...

    def dropout_apply(self, saved: Saved, t: Tensor) -> Tensor:
        """t ⊙ m with the mask of ``dropout_forward``."""
        ...

    def penalty_terms(self, g: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(Σ (M ⊙ g)², M² ⊙ g) of the input gradient g (N, ...)."""
        ...

    #: whether gradreg_loss reads its finite checks back once, after pass 2
    #: (checks.DeferredChecks), rather than one by one before pass 1
    defers_finite_checks: bool

    def all_finite(self, t: Tensor) -> bool:
        """Whether every value of t is finite."""
        ...

    def all_finite_many(self, ts: Sequence[Tensor]) -> bool:
        """Whether every value of every tensor is finite."""
        ...


class Norms(Protocol):
    """Train-mode batch norm's four passes and per-channel reductions."""

    def bn_train_forward(self, a: Tensor, gamma: Tensor | None, beta: Tensor | None,
                         eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(y, x̂, 1/σ broadcastable, batch mean (C,), batch variance (C,))."""
        ...

    def bn_project(self, v: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
        """P v = v − mean(v) − x̂ mean(x̂ v) per channel, and mean(x̂ v) (broadcastable)."""
        ...

    def bn_chain(self, d: Tensor, xhat: Tensor, k: Tensor
                 ) -> tuple[Tensor, Saved, tuple[Tensor, Tensor]]:
        """k ⊙ P δ (k = γ/σ), the state ``bn_tangent`` reads, and δ's channel means."""
        ...

    def bn_tangent(self, saved: Saved, r: Tensor, xhat: Tensor, k: Tensor,
                   inv_std: Tensor, gamma_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(k ⊙ P ṙ, the second-order term s, the γ-gradient's tangent term)."""
        ...

    def bn_backward(self, abar: Tensor, xhat: Tensor, k: Tensor, s: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """(k ⊙ P ā (+ s), Σ ā ⊙ x̂ per channel, Σ ā per channel)."""
        ...

    def bn_update_running_stats(self, module: Module, mean: Tensor, var: Tensor, n: int
                                ) -> None:
        """A BatchNorm module's running statistics (and num_batches_tracked) after a batch
        of n values per channel with mean μ and biased variance var (C,), as its forward
        updates them."""
        ...

    def channel_dot(self, a: Tensor, b: Tensor) -> Tensor:
        """Σ a ⊙ b over every dimension but channel dimension 1: (C,)."""
        ...


class Pools(Protocol):
    """Max pooling by the flat index of each maximum."""

    def max_pool2d(self, a: Tensor, kernel, stride, padding, dilation, ceil_mode: bool
                   ) -> tuple[Tensor, Tensor]:
        """(max pooling of a, the flat per-plane index of each maximum)."""
        ...

    def pool_gather(self, r: Tensor, idx: Tensor) -> Tensor:
        """out[n, c, i] = r[n, c, idx[n, c, i]]."""
        ...

    def pool_scatter(self, d: Tensor, idx: Tensor, input_shape: Sequence[int],
                     disjoint: tuple[int, int, int, int] | None = None) -> Tensor:
        """The transpose of ``pool_gather``: d summed into the positions idx points to.

        ``disjoint`` = (stride_h, stride_w, pad_h, pad_w) where no two pooling windows share
        an input position (stride ≥ dilation·(kernel − 1) + 1 along both dims), so input
        (h, w) lies in window ((h + pad_h) // stride_h, (w + pad_w) // stride_w) or in none;
        None where windows may overlap."""
        ...


class Heads(Protocol):
    """The loss heads on (N, K) logits."""

    def softmax_ce(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(CE_n (N,), p = softmax(z) (N, K))."""
        ...

    def head_checks_labels(self, z: Tensor) -> bool:
        """Whether ``softmax_head`` on these logits checks the label range itself."""
        ...

    def softmax_head(self, z: Tensor, y: Tensor, uniform: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(CE_n, p, ∇CE = p − e_y, ∇ℓ)."""
        ...

    def target_head(self, kind: str, z: Tensor, y: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """("mse" or "bce") (ℓ_n (N,), ∇ℓ, the Hessian diagonal or None where constant)."""
        ...

    def softmax_hvp(self, p: Tensor, t: Tensor) -> Tensor:
        """p ⊙ t − p (pᵀt), row by row: the Hessian of −log softmax times t."""
        ...


class NativeScheduleDeclined(Exception):
    """A backend's native schedule found in pass 1 what it does not run (the cpu Linear
    chain: a smooth activation's non-finite pre-activation): the Python schedule runs the
    call from the start instead."""


class Schedules(Protocol):
    """A backend's own runner of a whole plan, for the plans it runs natively."""

    def native_schedule(self, plan, x: Tensor, head, keep_saved: bool):
        """A runner with ``Schedule``'s interface (forward, chain, adjoint_and_backward,
        head, keep_saved) for this call, or None: the Python schedule runs the plan."""
        ...


class Backend(Precision, Products, Elementwise, Norms, Pools, Heads, Schedules, Protocol):
    """Every method a rule, the schedule or the functional API calls on a backend."""

    name: str
