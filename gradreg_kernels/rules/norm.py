"""BatchNorm1d / BatchNorm2d, eval mode (affine) and train mode (batch statistics).

Eval mode (running statistics): y = c ⊙ a + (β − c μ_run) with c = γ/√(v_run + ε) per
channel: an affine layer.  chain: c d;  tangent: c r, Δγ += Σ d r/√(v_run + ε);
backward: c ā, Δγ += Σ ā (a − μ_run)/√(v_run + ε), Δβ += Σ ā.

Train mode, per channel over its N = batch × spatial values: x̂ = (a − μ)/σ,
σ = √(var + ε), y = γ x̂ + β. With the projection P v = v − mean(v) − x̂ mean(x̂ v),
which is symmetric, the Jacobian is J = (γ/σ) P, so
  chain:    Jᵀ d = (γ/σ) P d
  tangent:  J r  = (γ/σ) P r,           Δγ += Σ d ⊙ P r / σ
  backward: ā_in = (γ/σ) P ā + s,       Δγ += Σ ā x̂,  Δβ += Σ ā
where s = ∂/∂a ⟨d, (γ/σ) P r⟩ (the dependence of σ and x̂ on a) is
  s = −(γ/(N σ²)) [ x̂ ⟨d, P r⟩ + S_r P d + S_d P r ],  S_v = Σ x̂ v.
Derivation: ∂σ/∂a_i = x̂_i/N and ∂x̂_j/∂a_i = (δ_ij − 1/N − x̂_i x̂_j/N)/σ, so
∂S_v/∂a = P v/σ and ∂(γ/σ)/∂a = −γ x̂/(N σ²); ⟨d, P r⟩ = Σ d r − Σd Σr/N − S_d S_r/N.

Running statistics are updated once per step, exactly as nn.BatchNorm's forward does
(unbiased variance, momentum or cumulative average, num_batches_tracked), from pass 1's
batch statistics at ``commit`` (after the finite checks: a step that raises leaves them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backend_protocol import Backend
from ..registry import register_module
from ..tensor_ops import channel_sum, channel_view
from .base import Rule, wants_grad


def uses_batch_stats(m: nn.modules.batchnorm._BatchNorm) -> bool:
    """nn.BatchNorm's own rule for when the batch statistics are used."""
    return m.training or (m.running_mean is None and m.running_var is None)


class BatchNormEvalRule(Rule):
    def __init__(self, module: nn.modules.batchnorm._BatchNorm) -> None:
        self.module = module
        m = module
        self.inv = torch.rsqrt(m.running_var + m.eps)
        self.gamma, self.beta = m.weight, m.bias
        self.scale = self.inv if self.gamma is None else self.inv * self.gamma.detach()
        self.a = self.d = self.tan_gamma = None

    def forward(self, a: Tensor) -> Tensor:
        m = self.module
        self._check(a)
        if wants_grad(self.gamma):
            self.a = a
        shift = -m.running_mean * self.scale
        if self.beta is not None:
            shift = shift + self.beta
        return a * channel_view(self.scale, a) + channel_view(shift, a)

    def _check(self, a: Tensor) -> None:
        if a.dim() < 2 or a.shape[1] != self.scale.numel():
            raise ValueError(f"{type(self.module).__name__} expects {self.scale.numel()} "
                             f"channels in dim 1, got input of shape {tuple(a.shape)}")

    def chain(self, d: Tensor) -> Tensor:
        if wants_grad(self.gamma):
            self.d = d
        return d * channel_view(self.scale, d)

    def tangent(self, r: Tensor) -> Tensor:
        if wants_grad(self.gamma):
            self.tan_gamma = channel_sum(self.d * r) * self.inv
            if not self.keep_saved:
                self.d = None
        return r * channel_view(self.scale, r)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        m = self.module
        if wants_grad(self.gamma):
            g = channel_sum(abar * (self.a - channel_view(m.running_mean, abar))) * self.inv
            self.g_gamma = g if self.tan_gamma is None else g + self.tan_gamma
        if wants_grad(self.beta):
            self.g_beta = channel_sum(abar)
        return abar * channel_view(self.scale, abar) if need_input_grad else None

    def param_grads(self):
        out = [(self.gamma, self.g_gamma)] if wants_grad(self.gamma) else []
        return out + ([(self.beta, self.g_beta)] if wants_grad(self.beta) else [])


class BatchNormTrainRule(Rule):
    def __init__(self, module: nn.modules.batchnorm._BatchNorm, kernels: Backend) -> None:
        self.module, self.kernels = module, kernels
        self.gamma, self.beta = module.weight, module.bias
        self.tan_gamma = self.s = None
        self.batch_stats: tuple[Tensor, Tensor, int] | None = None

    def forward(self, a: Tensor) -> Tensor:
        m = self.module
        n = a.numel() // a.shape[1] if a.dim() >= 2 else 0
        if a.dim() < 2 or a.shape[1] != m.num_features:
            raise ValueError(f"{type(m).__name__} expects {m.num_features} channels in dim 1, "
                             f"got input of shape {tuple(a.shape)}")
        if n <= 1:
            raise ValueError(f"{type(m).__name__} in train mode needs more than 1 value per "
                             f"channel, got input of shape {tuple(a.shape)}")
        y, mean, var = self._normalize(a, m.eps)
        if m.training and m.track_running_stats:
            self.batch_stats = (mean, var, n)
        return y

    def commit(self) -> None:
        """The running statistics from this batch's (μ, var), as nn.BatchNorm updates them."""
        if self.batch_stats is not None:
            self.kernels.bn_update_running_stats(self.module, *self.batch_stats)
            self.batch_stats = None

    def _normalize(self, a: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """y = γ x̂ + β over the batch statistics (saving x̂, 1/σ, k = γ/σ), μ and var."""
        gamma = None if self.gamma is None else self.gamma.detach()
        beta = None if self.beta is None else self.beta.detach()
        y, self.xhat, self.inv_std, mean, var = self.kernels.bn_train_forward(a, gamma, beta, eps)
        self.gamma_c = (channel_view(gamma, a) if gamma is not None else a.new_ones(()))
        self.k = self.gamma_c * self.inv_std
        return y, mean, var

    def chain(self, d: Tensor) -> Tensor:
        out, self.chain_saved, _ = self.kernels.bn_chain(d, self.xhat, self.k.flatten())
        return out

    def tangent(self, r: Tensor) -> Tensor:
        out, self.s, tan_gamma = self.kernels.bn_tangent(self.chain_saved, r, self.xhat,
                                                    self.k.flatten(), self.inv_std, self.gamma_c)
        if wants_grad(self.gamma):
            self.tan_gamma = tan_gamma
        if not self.keep_saved:
            self.chain_saved = None
        return out

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        s = self.s if need_input_grad else None
        out, g_xhat, g_sum = self.kernels.bn_backward(abar, self.xhat, self.k.flatten(), s)
        if wants_grad(self.gamma):
            self.g_gamma = g_xhat if self.tan_gamma is None else g_xhat + self.tan_gamma
        if wants_grad(self.beta):
            self.g_beta = g_sum
        return out if need_input_grad else None

    def param_grads(self):
        out = [(self.gamma, self.g_gamma)] if wants_grad(self.gamma) else []
        return out + ([(self.beta, self.g_beta)] if wants_grad(self.beta) else [])


def _batch_norm(m: nn.modules.batchnorm._BatchNorm):
    if uses_batch_stats(m):
        return lambda kernels: BatchNormTrainRule(m, kernels)
    return lambda kernels: BatchNormEvalRule(m)


register_module(nn.BatchNorm1d, nn.BatchNorm2d, options=lambda m: (
    m._buffers.get("running_mean") is None, m._buffers.get("running_var") is None))(_batch_norm)
