"""The portable backend: every primitive kernel of the four passes in plain torch ops.

Faster backends subclass ``TorchBackend`` and replace kernels one by one; rules call only
these methods, so a backend never changes the math, only how a step is computed.

Shapes: Linear operands are 2-D, ``a``: (N, in), ``d``: (N, out), ``w``: (out, in).
Convolution operands are NCHW; ``geom`` is (stride, padding, dilation, groups).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks
from ..activation_math import ActivationSpec, autograd_derivatives
from ..backend_protocol import BackendState, KeptDelta, Saved
from ..tensor_ops import (
    ConvGeom,
    batchnorm_second_order,
    channel_sum,
    channel_view,
    scale_fresh,
    update_running_stats,
)


class TorchBackend:
    """Reference implementation of the primitive kernels (any device, any float dtype)."""

    name = "torch"

    # ---- precision ------------------------------------------------------------------
    def precision_scope(self) -> contextlib.AbstractContextManager:
        """The context a fused step runs in: here none (autocast as the caller set it)."""
        return contextlib.nullcontext()

    def native_schedule(self, plan, x: Tensor, head, keep_saved: bool):
        """None: every plan runs on the Python schedule."""
        return None

    # ---- products -------------------------------------------------------------------
    def product_weight(self, w: Tensor) -> Tensor:
        """w itself: torch's ops cast it where autocast asks them to."""
        return w

    def product_input(self, a: Tensor) -> Tensor:
        """a itself."""
        return a

    def linear(self, a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """a wᵀ + b: (N, in) → (N, out)."""
        return F.linear(a, w, b)

    def linear_input_grad(self, d: Tensor, w: Tensor) -> Tensor:
        """d w: (N, out) → (N, in); the transpose of ``linear`` without bias."""
        return d.mm(w)

    def linear_weight_grad(self, pairs: Sequence[tuple[Tensor, Tensor]],
                           acc: Tensor | None = None) -> Tensor:
        """Σ_k d_kᵀ a_k over the pairs: (out, in). Two pairs are one doubled-batch product.

        acc: an (out, in) tensor the sum is added to in place and returned (no second
        weight-sized buffer); None: a new tensor.
        """
        if acc is not None:
            return self._accumulate(acc, pairs)
        d0, a0 = pairs[0]
        out = d0.t().mm(a0)
        return self._accumulate(out, pairs[1:])

    def weight_term_in_tangent_pass(self, n: int, out_f: int, in_f: int) -> bool:
        """From 2 n (in + out) ≥ in · out on: holding d and r to pass 4 would cost more than
        the term itself."""
        return 2 * n * (out_f + in_f) >= out_f * in_f

    def linear_weight_term(self, d: Tensor, a: Tensor) -> Tensor:
        """dᵀ a (a term pass 4 adds to in place)."""
        return self.linear_weight_grad([(d, a)])

    def linear_param_grads(self, pairs: Sequence[tuple[Tensor, Tensor | None]],
                           acc: Tensor | None, need_w: bool, need_b: bool
                           ) -> tuple[Tensor | None, Tensor | None]:
        """A Linear's pass-4 gradients: (Σ_k d_kᵀ a_k (+ acc), Σ_n d_1[n]), each None
        unless asked for (pairs[0] is (z̄, a); a may be None when need_w is False)."""
        gw = self.linear_weight_grad(pairs, acc) if need_w else None
        return gw, (pairs[0][0].sum(0) if need_b else None)

    @staticmethod
    def _accumulate(out: Tensor, pairs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        for d, a in pairs:
            if d.dtype == a.dtype == out.dtype:
                out.addmm_(d.t(), a)
            else:  # mixed dtypes under autocast: the out-of-place product is autocast
                out = torch.addmm(out, d.t(), a)
        return out

    def keep_delta(self, d: Tensor, in_features: int) -> KeptDelta:
        """How a Linear keeps its pass-2 δ (N, out) for a weight product ``[(δ, r)]`` of pass 3
        (an input of ``in_features``); here as it is."""
        return d

    def weight_grad_operands(self, a: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """How a Linear keeps its input a and tangent r (N, in) for the weight product of pass 4;
        here as they are (MKL reads both through strides)."""
        return a, r

    def conv2d(self, a: Tensor, w: Tensor, b: Tensor | None, geom: ConvGeom) -> Tensor:
        """2-D cross-correlation (N, C, H, W) → (N, O, H', W')."""
        stride, padding, dilation, groups = geom
        return F.conv2d(a, w, b, stride, padding, dilation, groups)

    def conv2d_input_grad(
        self, d: Tensor, w: Tensor, input_shape: Sequence[int], geom: ConvGeom
    ) -> Tensor:
        """The transposed convolution: (N, O, H', W') → (N, C, H, W).

        output_padding restores the rows/columns a strided forward dropped.
        """
        stride, padding, dilation, groups = geom
        out_pad = tuple(
            input_shape[2 + i]
            - ((d.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
               + dilation[i] * (w.shape[2 + i] - 1) + 1)
            for i in range(2)
        )
        return F.conv_transpose2d(d, w, None, stride, padding, out_pad, groups, dilation)

    def conv2d_bias_grad(self, d: Tensor) -> Tensor:
        """Σ_{n,h,w} d: (N, O, H', W') → (O,); a 16-bit d (autocast) sums into float32."""
        return d.sum((0, 2, 3), dtype=torch.promote_types(d.dtype, torch.float32))

    def conv2d_weight_grad(
        self, pairs: Sequence[tuple[Tensor, Tensor]], w: Tensor, geom: ConvGeom
    ) -> Tensor:
        """Σ_k of the weight gradient of ⟨d_k, conv(a_k, W)⟩: the shape of ``w``."""
        stride, padding, dilation, groups = geom
        out = None
        for d, a in pairs:
            d, a = _common_dtype(d, a)  # they differ under autocast
            gw = torch.ops.aten.convolution_backward(
                d, a, w.to(a.dtype), None, stride, padding, dilation, False, (0, 0), groups,
                (False, True, False),
            )[1]
            out = gw if out is None else out.add_(gw.to(out.dtype))
        return out

    # ---- elementwise activation steps -------------------------------------------------
    def act_forward(self, spec: ActivationSpec, z: Tensor) -> tuple[Tensor, Saved]:
        """y = σ(z) and what later passes need (here z itself, or y for ReLU: σ'(z) = [y > 0]).

        On the CPU, a z with NaN / ±inf (rare; one read finds it) keeps torch autograd's σ'
        and σ'' there too (``NonFinite``): the formulas of activation_math are exact for
        finite z, and at ±inf give 0 where torch's backward gives NaN (Softsign)."""
        if spec.name == "relu":
            y = torch.relu(z)
            return y, y
        if (spec.name != "leaky_relu" and z.device.type == "cpu"
                and not bool(torch.isfinite(z).all())):
            return spec.value(z), NonFinite.of(spec, z)
        return spec.value(z), z

    def act_chain(self, spec: ActivationSpec, saved: Saved, d: Tensor) -> Tensor:
        """σ'(z) ⊙ d."""
        return _d1_times(spec, saved, d)

    def act_tangent(
        self, spec: ActivationSpec, saved: Saved, r: Tensor, u: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """(σ'(z) ⊙ r, σ''(z) ⊙ u ⊙ r); the second is None for piecewise-linear σ."""
        if spec.name == "relu":
            return _d1_times(spec, saved, r), None
        if isinstance(saved, NonFinite):
            out = _d1_times(spec, saved, r)
            if not spec.smooth:
                return out, None
            s = spec.d2(saved.z) * u * r
            return out, saved.fix(s, saved.d2 * saved.at(u) * saved.at(r))
        z = saved
        s = spec.d2(z) * u * r if spec.smooth else None
        return _d1_times(spec, z, r), s

    def act_backward(
        self, spec: ActivationSpec, saved: Saved, abar: Tensor, s: Tensor | None
    ) -> Tensor:
        """σ'(z) ⊙ ā + s."""
        out = _d1_times(spec, saved, abar)
        return out if s is None else out.add_(s)

    # ---- heads ------------------------------------------------------------------------
    def softmax_ce(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example CE_n = logsumexp(z_n) − z_{n,y_n} (N,) and p = softmax(z) (N, K)."""
        logp = torch.log_softmax(z, dim=1)
        return -logp.gather(1, y[:, None]).squeeze(1), logp.exp()

    def head_checks_labels(self, z: Tensor) -> bool:
        """Whether ``softmax_head`` on these logits raises gradreg_loss's ValueError for a
        label outside [0, K) by itself (so the separate check, a read-back, is skipped)."""
        return False

    def softmax_head(
        self, z: Tensor, y: Tensor, uniform: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """CE_n (N,), p = softmax(z), ∇CE = p − e_y and ∇ℓ (p − 1/K if uniform, else ∇CE).

        A label outside [0, K) (only with check_finite=False: gradreg_loss checks them
        otherwise) makes its row's CE and ∇CE NaN: it never indexes another class (a negative
        label would wrap) and never trips a device-side assert, and the loss is NaN."""
        yc = y.clamp(0, z.shape[1] - 1)
        ce, p = self.softmax_ce(z, yc)
        data_grad = p.clone()
        data_grad[torch.arange(z.shape[0], device=z.device), yc] -= 1
        bad = yc != y
        ce = ce.masked_fill(bad, math.nan)
        data_grad = data_grad.masked_fill(bad[:, None], math.nan)
        pen_grad = p - 1.0 / z.shape[1] if uniform else data_grad
        return ce, p, data_grad, pen_grad

    def target_head(self, kind: str, z: Tensor, y: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A target head on (N, K) logits, y of z's shape: (ℓ_n = (1/K) Σ_k e (N,),
        ∇ℓ = e′/K, the Hessian's diagonal e″/K or None where it is the constant 2/K (mse)).
        mse: e = (z − y)²; bce: e = BCE with logits, e′ = σ(z) − y, e″ = σ(1 − σ)."""
        k = z.shape[1]
        if kind == "mse":
            diff = z - y
            return (diff * diff).sum(1) / k, diff * (2.0 / k), None
        sig = torch.sigmoid(z)
        e = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        return e.sum(1) / k, (sig - y) / k, sig * (1.0 - sig) / k

    def softmax_hvp(self, p: Tensor, t: Tensor) -> Tensor:
        """Hessian of −log softmax times t: p ⊙ t − p (pᵀt), row by row (N, K)."""
        return p * (t - (p * t).sum(1, keepdim=True))

    # ---- the penalty ------------------------------------------------------------------
    #: gradreg_loss's finite checks as device sums read back once after pass 2
    #: (checks.DeferredChecks: one host synchronization per step on a GPU)
    defers_finite_checks = True

    def all_finite(self, t: Tensor) -> bool:
        """Whether every value of t is finite (gradreg_loss's input check)."""
        return checks.all_finite(t)

    def all_finite_many(self, ts: Sequence[Tensor]) -> bool:
        """Whether every value of every tensor is finite (the parameter check)."""
        return checks.all_finite_many(ts)

    def penalty_terms(self, g: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(Σ (M ⊙ g)², M² ⊙ g): the penalty's sum over the batch and, up to the factor
        2λ/B, the seed r of pass 3; M = 1 when mask is None. g: (B, ...) = ∇_X Σ ℓ."""
        gm = g if mask is None else g * mask
        # ‖gm‖² as a reduction: no g-sized temporary at the end of pass 2, where the step's
        # memory peaks (every d and activation is alive)
        acc_dtype = torch.float32 if gm.dtype in (torch.float16, torch.bfloat16) else None
        total = torch.linalg.vector_norm(gm, dtype=acc_dtype).square_()
        if total.dtype != gm.dtype:
            total = total.to(gm.dtype)
        return total, (gm if mask is None else gm * mask)

    # ---- dropout ----------------------------------------------------------------------
    def dropout_forward(self, a: Tensor, p: float) -> tuple[Tensor, Saved]:
        """y = a ⊙ m, m ∈ {0, 1/(1−p)} drawn exactly as torch's dropout draws it; saves m."""
        with torch.no_grad():
            mask = F.dropout(torch.ones_like(a), p, True)
        return a * mask, mask

    def dropout_apply(self, saved: Saved, t: Tensor) -> Tensor:
        """t ⊙ m with the mask saved by ``dropout_forward``."""
        return t * saved

    # ---- pooling ----------------------------------------------------------------------
    def max_pool2d(
        self, a: Tensor, kernel, stride, padding, dilation, ceil_mode: bool
    ) -> tuple[Tensor, Tensor]:
        """Max pooling and the flat (per plane) index of each maximum."""
        return F.max_pool2d(a, kernel, stride, padding, dilation, ceil_mode, return_indices=True)

    def pool_gather(self, r: Tensor, idx: Tensor) -> Tensor:
        """out[n, c, i] = r[n, c, idx[n, c, i]]: (N, C, H, W) → idx's shape."""
        return r.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    def pool_scatter(self, d: Tensor, idx: Tensor, input_shape: Sequence[int],
                     disjoint: tuple[int, int, int, int] | None = None) -> Tensor:
        """The transpose of ``pool_gather``: sums d into the input positions idx points to.
        ``disjoint`` (stride_h, stride_w, pad_h, pad_w) says that no two windows share an
        input position (the scatter-add here does not need it)."""
        n, c = input_shape[0], input_shape[1]
        out = d.new_zeros(n, c, input_shape[2] * input_shape[3])
        out.scatter_add_(2, idx.flatten(2), d.flatten(2))
        return out.view(input_shape)

    # ---- train-mode batch norm (per channel; reduced over every dim but 1) ----------------
    @staticmethod
    def _cmean(t: Tensor) -> Tensor:
        dims = [0] + list(range(2, t.dim()))
        return t.mean(dim=dims, keepdim=True)

    def bn_train_forward(
        self, a: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """y = γ x̂ + β with x̂ = (a − μ)/σ, σ = √(var + eps) over the batch.

        Returns y, x̂, 1/σ (broadcastable), μ and the biased variance (both (C,)). A bf16 or
        float16 ``a`` (autocast) has its statistics, x̂ and y computed in float32, as torch's
        own batch norm does, and y and x̂ stored in a's dtype; 1/σ, μ and var stay float32.
        """
        low = a.dtype in (torch.bfloat16, torch.float16)
        a_s = a.float() if low else a
        mean = self._cmean(a_s)
        xc = a_s - mean
        var = self._cmean(xc * xc)
        inv_std = torch.rsqrt(var + eps)
        if (a.device.type == "cpu" and a.dtype != torch.float64
                and not bool(torch.isfinite(var).all()) and bool(torch.isfinite(a).all())):
            # finite values whose squares overflow (|a| near √max): 1/σ is representable,
            # var is not; the statistics in double, as torch's own norms accumulate
            a64 = a.double()
            xc64 = a64 - self._cmean(a64)
            var64 = self._cmean(xc64 * xc64)
            inv_std, var = torch.rsqrt(var64 + eps).to(a_s.dtype), var64.to(a_s.dtype)
            xc = xc64.to(a_s.dtype)
        xhat = xc * inv_std
        y = xhat if gamma is None else xhat * channel_view(gamma, a) + channel_view(beta, a)
        if low:
            xhat = xhat.to(a.dtype)
            y = xhat if gamma is None else y.to(a.dtype)
        return y, xhat, inv_std, mean.flatten(), var.flatten()

    def bn_project(self, v: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
        """P v = v − mean(v) − x̂ mean(x̂ v) per channel, and mean(x̂ v) (broadcastable).

        One call of ATen's batch-norm backward with x̂ as the input (mean 0, inverse
        standard deviation 1, unit weight) computes both in a single sweep.
        """
        v, xhat = _common_dtype(v, xhat, at_least=torch.float32)
        c = xhat.shape[1]
        ones, zeros = xhat.new_ones(c), xhat.new_zeros(c)
        pv, sxv, _ = torch.ops.aten.native_batch_norm_backward(
            v, xhat, ones, None, None, zeros, ones, True, 0.0, (True, True, False))
        n = xhat.numel() // c
        return pv, channel_view(sxv / n, xhat)

    def bn_backward(self, abar: Tensor, xhat: Tensor, k: Tensor, s: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """k ⊙ P ā (+ s), Σ ā ⊙ x̂ and Σ ā per channel (k = γ/σ per channel, (C,))."""
        abar, xhat = _common_dtype(abar, xhat, at_least=torch.float32)
        c = xhat.shape[1]
        ones, zeros = xhat.new_ones(c), xhat.new_zeros(c)
        out, g_xhat, g_sum = torch.ops.aten.native_batch_norm_backward(
            abar, xhat, k.to(xhat.dtype), None, None, zeros, ones, True, 0.0, (True, True, True))
        return (out if s is None else out.add_(s)), g_xhat, g_sum

    def bn_chain(self, d: Tensor, xhat: Tensor, k: Tensor
                 ) -> tuple[Tensor, Saved, tuple[Tensor, Tensor]]:
        """Pass 2 of train-mode batch norm: k ⊙ P δ (k = γ/σ, (C,)), what ``bn_tangent``
        needs of δ (private to the backend) and the channel means (mean(δ), mean(x̂ δ)),
        each (C,)."""
        pd, mxd = self.bn_project(d, xhat)
        md = self._cmean(d)
        # P δ itself is not kept: the tangent rebuilds what it needs of it from δ and the means
        return (scale_fresh(pd, channel_view(k, d)), BnChainState(d, md, mxd),
                (md.flatten(), mxd.flatten()))

    def bn_tangent(
        self, saved: Saved, r: Tensor, xhat: Tensor, k: Tensor, inv_std: Tensor,
        gamma_c: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pass 3: k ⊙ P ṙ, the second-order term s (``bn_second_order``) and the γ-gradient
        term Σ δ ⊙ P ṙ / σ per channel, from what ``bn_chain`` saved."""
        if not isinstance(saved, BnChainState):
            raise TypeError(f"bn_tangent: not this backend's batch-norm state: {type(saved)}")
        d, md, mxd = saved.d, saved.md, saved.mxd
        pr, mxr = self.bn_project(r, xhat)
        d_pr = self.channel_dot(d, pr)  # Σ δ P ṙ per channel
        tan_gamma = d_pr * inv_std.flatten()
        dots = channel_view(d_pr, xhat) / (xhat.numel() // xhat.shape[1])
        s = batchnorm_second_order(xhat, inv_std, gamma_c, d, md, mxd, pr, mxr, dots)
        return scale_fresh(pr, channel_view(k, r)), s, tan_gamma

    def channel_dot(self, a: Tensor, b: Tensor) -> Tensor:
        """Σ a ⊙ b over every dimension but the channel dimension 1: (C,) for (N, C, ...)
        operands of one shape (a per-channel affine's γ-gradient terms)."""
        return channel_sum(a * b)

    def bn_second_order(
        self, xhat: Tensor, inv_std: Tensor, gamma_c: Tensor, delta: Tensor, r: Tensor,
        p_delta: Tensor, p_r: Tensor, mx_delta: Tensor, mx_r: Tensor,
    ) -> Tensor:
        """∂/∂a ⟨δ, (γ/σ) P ṙ⟩ = −(γ/(Nσ²)) [x̂ ⟨δ, Pṙ⟩ + S_r Pδ + S_δ Pṙ] (see rules/norm.py),
        from the projections of both (the form the GPU kernels take; ``bn_tangent`` needs
        no P δ, see ``tensor_ops.batchnorm_second_order``)."""
        return batchnorm_second_order(xhat, inv_std, gamma_c, delta, self._cmean(delta),
                                      mx_delta, p_r, mx_r, self._cmean(delta * p_r))

    def bn_update_running_stats(self, module: torch.nn.modules.batchnorm._BatchNorm,
                                mean: Tensor, var: Tensor, n: int) -> None:
        """module's running statistics after a batch of n values per channel with mean μ
        and biased variance var (C,), as nn.BatchNorm's forward updates them
        (tensor_ops.update_running_stats)."""
        update_running_stats(module, mean, var, n)


@dataclass
class BnChainState(BackendState):
    """What ``bn_chain`` keeps for ``bn_tangent``: δ and its channel means mean(δ),
    mean(x̂ δ) (shaped to broadcast over δ)."""

    d: Tensor
    md: Tensor
    mxd: Tensor


@dataclass
class NonFinite(BackendState):
    """An activation's z that holds NaN / ±inf, with torch autograd's σ', σ'' at those
    elements (flat indices ``idx``), set over the formulas' values after each step (the
    portable and the C++ backends' state for such a z)."""

    z: Tensor
    idx: Tensor
    d1: Tensor
    d2: Tensor

    @classmethod
    def of(cls, spec: ActivationSpec, z: Tensor) -> NonFinite:
        """The state of a z known to hold non-finite values."""
        idx = torch.nonzero(~torch.isfinite(z.reshape(-1))).squeeze(1)
        return cls(z, idx, *autograd_derivatives(spec, z.reshape(-1)[idx]))

    def at(self, t: Tensor) -> Tensor:
        """t's values at the non-finite elements of z (t has z's shape)."""
        return t.reshape(-1)[self.idx]

    def fix(self, out: Tensor, values: Tensor) -> Tensor:
        out.view(-1)[self.idx] = values.to(out.dtype)
        return out


def _d1_times(spec: ActivationSpec, saved: Saved, t: Tensor) -> Tensor:
    """σ'(z) ⊙ t from what act_forward saved (y for ReLU, z otherwise), in one pass; torch
    autograd's σ' at the non-finite elements of a ``NonFinite`` z."""
    if isinstance(saved, NonFinite):
        return saved.fix(_d1_times(spec, saved.z, t), saved.d1 * saved.at(t))
    if spec.name == "relu":
        return torch.ops.aten.threshold_backward(t, saved, 0)
    if spec.name == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(t, saved, spec.params[0], False)
    return spec.d1(saved) * t


def _common_dtype(a: Tensor, b: Tensor, at_least: torch.dtype | None = None
                  ) -> tuple[Tensor, Tensor]:
    """a and b in their promoted dtype (they differ under autocast), and at least
    ``at_least`` (batch-norm kernels keep their statistics in float32)."""
    dt = torch.promote_types(a.dtype, b.dtype)
    if at_least is not None:
        dt = torch.promote_types(dt, at_least)
    return a.to(dt), b.to(dt)
