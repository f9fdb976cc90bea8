"""softmax_cross_entropy, twice differentiable. Per row n of logits z (N, K), label y_n:

    ℓ_n = logsumexp(z_n) − z_{n, y_n},   p = softmax(z)
    backward:          dz_n = g_n (p_n − e_{y_n})                    for g (N,) at ℓ
    backward of that:  for r (N, K) at dz:
                       d(g)_n = ⟨r_n, p_n − e_{y_n}⟩
                       d(z)_n = g_n (p_n ⊙ r_n − p_n ⟨p_n, r_n⟩)      (backend ``softmax_hvp``)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autocast import Function
from ._common import apply, input_needed, last_differentiable, record_inputs, resolve_backend


def _grad_at_logits(p: Tensor, y: Tensor) -> Tensor:
    """p − e_y, row by row."""
    out = p.clone()
    out[torch.arange(p.shape[0], device=p.device), y] -= 1
    return out


class SoftmaxCEGrad(Function):
    """(g, z) ↦ g[:, None] ⊙ (p − e_y); z is passed for its graph only (p is saved)."""

    @staticmethod
    def forward(ctx, g: Tensor, z: Tensor, p: Tensor, y: Tensor, kernels) -> Tensor:
        record_inputs(ctx, g, z, p, y, kernels)
        ctx.kernels = kernels
        q = _grad_at_logits(p, y)
        ctx.save_for_backward(g, p, q)
        ctx.set_materialize_grads(False)
        return q * g[:, None]

    @staticmethod
    @last_differentiable
    def backward(ctx, r: Tensor | None):
        if r is None:
            return None, None, None, None, None
        g, p, q = ctx.saved_tensors
        d_g = (r * q).sum(1) if input_needed(ctx, 0) else None
        d_z = ctx.kernels.softmax_hvp(p, r) * g[:, None] if input_needed(ctx, 1) else None
        return d_g, d_z, None, None, None


class SoftmaxCE(Function):
    """Per-example cross-entropy (N,) of logits z (N, K) and labels y (N,)."""

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor, kernels) -> Tensor:
        record_inputs(ctx, z, y, kernels)
        ce, p = kernels.softmax_ce(z, y)
        ctx.p, ctx.y, ctx.kernels = p, y, kernels
        ctx.save_for_backward(z)
        ctx.set_materialize_grads(False)
        return ce

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is None or not input_needed(ctx, 0):
            return None, None, None
        (z,) = ctx.saved_tensors
        return apply(SoftmaxCEGrad, g, z, ctx.p, ctx.y, ctx.kernels), None, None


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def softmax_cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean",
                          backend: str = "auto") -> Tensor:
    """F.cross_entropy(logits, target) for (N, K) logits and (N,) class labels;
    reduction "mean" | "sum" | "none". Twice differentiable."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    if target.shape != (logits.shape[0],) or target.is_floating_point():
        raise ValueError(f"target must be (N,) = ({logits.shape[0]},) integer class labels, "
                         f"got {target.dtype} of shape {tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    k = logits.shape[1]
    # the range check reads the labels back, which a CUDA-graph capture forbids: a captured
    # step (graphs.CapturedStep) takes its labels unchecked, so check them before the loop
    if target.numel() and not _capturing(logits) and (int(target.min()) < 0
                                                      or int(target.max()) >= k):
        raise ValueError(f"target labels must lie in [0, {k})")
    ce = apply(SoftmaxCE, logits, target.long(), resolve_backend(backend, logits.device))
    if reduction == "mean":
        return ce.mean()
    return ce.sum() if reduction == "sum" else ce
