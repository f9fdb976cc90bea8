"""batch_norm (train mode with batch statistics, eval mode with running ones), twice
differentiable. Per channel c over its N = batch × spatial values (docs: rules/norm.py):

Train:  x̂ = (x − μ)/σ,  σ = √(var + ε),  y = γ x̂ + β,  P v = v − mean(v) − x̂ mean(x̂ v)
    backward:          dx = (γ/σ) P dy,   dγ = Σ dy x̂,   dβ = Σ dy
    backward of that:  for gradients (r, g_γ, g_β) at (dx, dγ, dβ):
        d(dy) = (γ/σ) P r + x̂ g_γ + g_β
        d(x)  = ∂/∂x ⟨dy, (γ/σ) P r⟩ + (1/σ) P (dy g_γ)      (backend ``bn_tangent``)
        d(γ)  = Σ dy P r / σ
Eval:   y = c (x − μ_run) + β,  c = γ/√(v_run + ε)   (affine in x)
    backward:          dx = c dy,   dγ = Σ dy (x − μ_run)/√(v_run + ε),   dβ = Σ dy
    backward of that:  d(dy) = c r + (x − μ_run) g_γ/√(v_run + ε) + g_β,
                       d(x) = dy g_γ/√(v_run + ε),   d(γ) = Σ r dy/√(v_run + ε)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autocast import Function
from ..tensor_ops import channel_sum, channel_view
from ._common import (
    apply,
    input_needed,
    last_differentiable,
    record_inputs,
    resolve_backend,
)


class BatchNormTrainGrad(Function):
    """(dy, x, γ) ↦ (dx, dγ, dβ) of train-mode batch norm; each output only when asked."""

    @staticmethod
    def forward(ctx, dy: Tensor, x: Tensor, gamma: Tensor | None, xhat: Tensor,
                inv_std: Tensor, want: tuple[bool, bool, bool], kernels):
        record_inputs(ctx, dy, x, gamma, xhat, inv_std, want, kernels)
        ctx.kernels = kernels
        gamma_c = channel_view(gamma, dy) if gamma is not None else dy.new_ones(())
        k = (gamma_c * inv_std).reshape(-1).expand(dy.shape[1]).contiguous()
        # k P dy and the channel means of dy and x̂ dy, in one fused sweep
        dx, ctx.chain_saved, (mean_dy, mean_xdy) = kernels.bn_chain(dy, xhat, k)
        n = dy.numel() // dy.shape[1]
        dgamma = mean_xdy * n if want[1] else None  # Σ dy x̂
        dbeta = mean_dy * n if want[2] else None  # Σ dy
        ctx.save_for_backward(dy, gamma, xhat, inv_std, k)
        ctx.set_materialize_grads(False)
        return (dx if want[0] else None), dgamma, dbeta

    @staticmethod
    @last_differentiable
    def backward(ctx, r: Tensor | None, g_gamma: Tensor | None, g_beta: Tensor | None):
        dy, gamma, xhat, inv_std, k = ctx.saved_tensors
        kernels = ctx.kernels
        gamma_c = channel_view(gamma, dy) if gamma is not None else dy.new_ones(())
        need_dy, need_x, need_g = (input_needed(ctx, i) for i in range(3))
        d_dy = d_x = d_gamma = None
        if r is not None:
            # k P r, ∂/∂x ⟨dy, (γ/σ) P r⟩ and Σ dy P r / σ, fused (backend bn_tangent)
            kpr, s, tan_gamma = kernels.bn_tangent(ctx.chain_saved, r, xhat, k, inv_std, gamma_c)
            d_dy = kpr if need_dy else None
            d_x = s if need_x else None
            d_gamma = tan_gamma if need_g else None
        if g_gamma is not None:
            gc = channel_view(g_gamma, dy)
            if need_dy:
                d_dy = xhat * gc if d_dy is None else d_dy.add_(xhat * gc)
            if need_x:
                p, _ = kernels.bn_project(dy * gc, xhat)
                d_x = inv_std * p if d_x is None else d_x.add_(inv_std * p)
        if g_beta is not None and need_dy:
            gb = channel_view(g_beta, dy).expand_as(dy)
            d_dy = gb.clone() if d_dy is None else d_dy.add_(gb)
        return d_dy, d_x, d_gamma, None, None, None, None


class BatchNormTrain(Function):
    """y = γ x̂ + β with batch statistics; returns y, μ and the biased variance (constants)."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, kernels):
        record_inputs(ctx, x, gamma, beta, eps, kernels)
        ctx.kernels = kernels
        y, xhat, inv_std, mean, var = kernels.bn_train_forward(x, gamma, beta, eps)
        ctx.save_for_backward(x, gamma)
        ctx.xhat, ctx.inv_std = xhat, inv_std
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor | None, _gm, _gv):
        if dy is None:
            return None, None, None, None, None
        x, gamma = ctx.saved_tensors
        want = (input_needed(ctx, 0), input_needed(ctx, 1), input_needed(ctx, 2))
        dx, dgamma, dbeta = apply(BatchNormTrainGrad, dy, x, gamma, ctx.xhat, ctx.inv_std,
                                                     want, ctx.kernels)
        return dx, dgamma, dbeta, None, None


class BatchNormEvalGrad(Function):
    """(dy, x, γ) ↦ (dx, dγ, dβ) of eval-mode batch norm."""

    @staticmethod
    def forward(ctx, dy: Tensor, x: Tensor, gamma: Tensor | None, mean: Tensor, inv: Tensor,
                want: tuple[bool, bool, bool]):
        record_inputs(ctx, dy, x, gamma, mean, inv, want)
        scale = inv if gamma is None else inv * gamma
        ctx.save_for_backward(dy, x, gamma, mean, inv)
        ctx.set_materialize_grads(False)
        dx = dy * channel_view(scale, dy) if want[0] else None
        dgamma = channel_sum(dy * (x - channel_view(mean, x))) * inv if want[1] else None
        dbeta = channel_sum(dy) if want[2] else None
        return dx, dgamma, dbeta

    @staticmethod
    @last_differentiable
    def backward(ctx, r: Tensor | None, g_gamma: Tensor | None, g_beta: Tensor | None):
        dy, x, gamma, mean, inv = ctx.saved_tensors
        need_dy, need_x, need_g = (input_needed(ctx, i) for i in range(3))
        scale = inv if gamma is None else inv * gamma
        d_dy = d_x = d_gamma = None
        terms = []
        if r is not None:
            terms.append(r * channel_view(scale, r))
            if need_g:
                d_gamma = channel_sum(r * dy) * inv
        if g_gamma is not None:
            gi = channel_view(g_gamma * inv, dy)
            terms.append((x - channel_view(mean, x)) * gi)
            if need_x:
                d_x = dy * gi
        if g_beta is not None:
            terms.append(channel_view(g_beta, dy).expand_as(dy))
        if need_dy and terms:
            d_dy = terms[0].clone() if len(terms) == 1 else sum(terms[1:], terms[0])
        return d_dy, d_x, d_gamma, None, None, None


class BatchNormEval(Function):
    """y = c (x − μ_run) + β, c = γ/√(v_run + ε)."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor | None, beta: Tensor | None, mean: Tensor,
                var: Tensor, eps: float):
        record_inputs(ctx, x, gamma, beta, mean, var, eps)
        inv = torch.rsqrt(var + eps)
        scale = inv if gamma is None else inv * gamma
        shift = -mean * scale if beta is None else beta - mean * scale
        ctx.save_for_backward(x, gamma, mean, inv)
        ctx.set_materialize_grads(False)
        return x * channel_view(scale, x) + channel_view(shift, x)

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        if dy is None:
            return (None,) * 6
        x, gamma, mean, inv = ctx.saved_tensors
        want = (input_needed(ctx, 0), input_needed(ctx, 1), input_needed(ctx, 2))
        dx, dgamma, dbeta = apply(BatchNormEvalGrad, dy, x, gamma, mean, inv, want)
        return dx, dgamma, dbeta, None, None, None


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               backend: str = "auto") -> Tensor:
    """F.batch_norm's semantics, twice differentiable: x (N, C, ...) normalised per channel.

    training=True uses the batch statistics and, when running stats are given, updates them
    in place (running ← (1 − momentum)·running + momentum·batch, unbiased variance);
    training=False uses running_mean / running_var.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_norm needs x of shape (N, C, ...), got {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},) for {c} channels, got "
                             f"{tuple(t.shape)}")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm with training=False needs running_mean and running_var")
        return apply(BatchNormEval, x, weight, bias, running_mean.to(x.dtype),
                                   running_var.to(x.dtype), float(eps))
    n = x.numel() // c
    if n <= 1:
        raise ValueError(f"batch_norm in training mode needs more than 1 value per channel, "
                         f"got input of shape {tuple(x.shape)}")
    kernels = resolve_backend(backend, x.device)
    y, mean, var = apply(BatchNormTrain, x, weight, bias, float(eps), kernels)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * (n / (n - 1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return y
