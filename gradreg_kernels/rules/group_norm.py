"""GroupNorm, InstanceNorm and LayerNorm: each sample's values normalized per group, then an
affine.

GroupNorm(G) normalizes, per sample, each group of C/G channels over those channels and
every spatial position (InstanceNorm: G = C); LayerNorm over the trailing
``normalized_shape``. Viewed as (1, M, D), M groups of D values, that normalization is
train-mode batch norm's x̂ with M channels and no affine (rules/norm.py: the same four
passes on the same backend kernels), and it keeps no running statistics. The affine
y = γ ⊙ u + β that follows (γ, β per channel for GroupNorm and InstanceNorm, per element of
normalized_shape for LayerNorm) is a diagonal linear layer:
  chain:    γ d               tangent:  γ r,  Δγ += R(d ⊙ r)
  backward: γ ā,  Δγ += R(ā ⊙ u),  Δβ += R(ā)
with R the sum over every dimension γ is broadcast along; it has no second-order term.
The R(· ⊙ ·) terms run as the backend's ``channel_dot`` (no product-sized temporary), and
the tangent γ r is written over r, the normalization's fresh output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..backend_protocol import Backend
from ..registry import register_module
from ..tensor_ops import channel_sum, channel_view, scale_fresh
from .base import Rule, wants_grad
from .norm import BatchNormTrainRule
from .reshape import ReshapeRule
from .residual import SequenceRule


class _GroupView(ReshapeRule):
    """(N, ...) → (1, M, D): the groups of a sample as the channels of batch norm's layout.
    ``groups_of(shape)`` gives M; the inverse view reads the shape this forward kept."""

    def __init__(self, groups_of: Callable[[tuple[int, ...]], int]) -> None:
        self.groups_of = groups_of
        self.in_shape: tuple[int, ...] = ()

    def _apply(self, t: Tensor) -> Tensor:
        return t.reshape(1, self.groups_of(tuple(self.in_shape)), -1)


class _Ungroup(Rule):
    """The inverse of a ``_GroupView``: (1, M, D) back to the shape it was given."""

    def __init__(self, view: _GroupView) -> None:
        self.view = view

    def forward(self, a: Tensor) -> Tensor:
        return a.reshape(self.view.in_shape)

    def chain(self, d: Tensor) -> Tensor:
        return self.view._apply(d)

    def tangent(self, r: Tensor) -> Tensor:
        return r.reshape(self.view.in_shape)

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        return self.view._apply(abar) if need_input_grad else None


class _GroupStats(BatchNormTrainRule):
    """x̂ per channel of a (1, M, D) view: batch norm in train mode without affine or
    running statistics (a group of one value gives x̂ = 0, as torch's own norms do)."""

    def __init__(self, eps: float, kernels: Backend) -> None:
        self.module, self.kernels, self.eps = None, kernels, eps
        self.gamma = self.beta = self.tan_gamma = self.s = None
        #: set by the affine after this rule: keep the chain's δ for its γ term (``delta``)
        self.shares_delta = False
        self.delta: Tensor | None = None

    def forward(self, a: Tensor) -> Tensor:
        return self._normalize(a, self.eps)[0]

    def chain(self, d: Tensor) -> Tensor:
        # the batch-norm chain keeps this same tensor for the tangent: sharing it costs nothing
        self.delta = d if self.shares_delta else None
        return super().chain(d)


class _Affine(Rule):
    """y = γ ⊙ u + β, γ and β broadcast and reduced back ``along`` their dimensions.

    Its γ term in the tangent pass needs the chain's d. The normalization before it keeps
    δ' = γ ⊙ d for its own tangent anyway, so where γ lives on the CPU and has no zero (or
    subnormal) entry, the term is R(δ' ⊙ r)/γ from that δ' and d is not kept: one
    activation-sized tensor less at pass 3's peak. Elsewhere (a zero-initialized γ, or a
    GPU, where checking γ would synchronize) d is kept.
    """

    #: |γ| below this keeps d (δ' = γ d would lose d's precision, or all of it at 0)
    MIN_DIVISOR = 1e-12

    def __init__(self, module: nn.Module, along: _Along, stats: _GroupStats, view: _GroupView,
                 kernels: Backend) -> None:
        self.module, self.along, self.kernels = module, along, kernels
        self.gamma, self.beta = module.weight, module.bias
        self.stats, self.view = stats, view
        self.u = self.d = self.tan_gamma = None

    def _dot(self, a: Tensor, b: Tensor) -> Tensor:
        """R(a ⊙ b), shaped like γ."""
        return self.along.dot(self.kernels, a, b, self.gamma)

    def _divide_by_gamma(self) -> bool:
        g = self.gamma.detach()
        return g.device.type == "cpu" and bool((g.abs() >= self.MIN_DIVISOR).all())

    def _scale(self, t: Tensor) -> Tensor:
        return t if self.gamma is None else t * self.along.shaped(self.gamma.detach(), t)

    def forward(self, u: Tensor) -> Tensor:
        if wants_grad(self.gamma):
            self.u = u
        if self.gamma is not None and self.beta is not None:  # one output, no γ u temporary
            return torch.addcmul(self.along.shaped(self.beta.detach(), u), u,
                                 self.along.shaped(self.gamma.detach(), u))
        y = self._scale(u)
        return y if self.beta is None else y + self.along.shaped(self.beta.detach(), y)

    def chain(self, d: Tensor) -> Tensor:
        if wants_grad(self.gamma):
            self.stats.shares_delta = self._divide_by_gamma()
            self.d = None if self.stats.shares_delta else d
        return self._scale(d)

    def tangent(self, r: Tensor) -> Tensor:
        if wants_grad(self.gamma):
            if self.d is not None:
                self.tan_gamma = self._dot(self.d, r)
            else:  # δ' = γ d, kept by the normalization
                dprime = self.stats.delta.reshape(self.view.in_shape)
                self.tan_gamma = self._dot(dprime, r) / self.gamma.detach()
            if not self.keep_saved:
                self.d = self.stats.delta = None
        if self.gamma is None:
            return r
        # r is the normalization's fresh output, held by nothing else: scaled in place
        # unless γ's dtype would promote it (an autocast step's bf16 r)
        return scale_fresh(r, self.along.shaped(self.gamma.detach(), r))

    def backward(self, abar: Tensor, need_input_grad: bool = True) -> Tensor | None:
        if wants_grad(self.gamma):
            g = self._dot(abar, self.u)
            self.g_gamma = g if self.tan_gamma is None else g + self.tan_gamma
        if wants_grad(self.beta):
            self.g_beta = self.along.reduced(abar, self.beta)
        return self._scale(abar) if need_input_grad else None

    def param_grads(self):
        out = [(self.gamma, self.g_gamma)] if wants_grad(self.gamma) else []
        return out + ([(self.beta, self.g_beta)] if wants_grad(self.beta) else [])


def _channel_sum(t: Tensor, p: Tensor) -> Tensor:
    return channel_sum(t)


def _channel_dot(kernels, a: Tensor, b: Tensor, p: Tensor) -> Tensor:
    return kernels.channel_dot(a, b)


def _trailing(p: Tensor, like: Tensor) -> Tensor:
    return p  # normalized_shape is the trailing shape: broadcasting lines it up


def _leading_sum(t: Tensor, p: Tensor) -> Tensor:
    return t.sum(dim=list(range(t.dim() - p.dim()))) if t.dim() > p.dim() else t


def _trailing_dot(kernels, a: Tensor, b: Tensor, p: Tensor) -> Tensor:
    """R(a ⊙ b) over the leading dimensions: the (rows, features) view's column dots."""
    width = p.numel()
    return kernels.channel_dot(a.reshape(-1, width), b.reshape(-1, width)).view(p.shape)


@dataclass(frozen=True)
class _Along:
    """How an affine's γ, β (shape P) line up with its (N, ...) operands: ``shaped(p, t)``
    broadcasts p against t, ``reduced(t, p)`` sums t back to P, ``dot(kernels, a, b, p)`` is
    reduced(a ⊙ b, p) without the a ⊙ b temporary."""

    shaped: Callable[[Tensor, Tensor], Tensor]
    reduced: Callable[[Tensor, Tensor], Tensor]
    dot: Callable[..., Tensor]


PER_CHANNEL = _Along(channel_view, _channel_sum, _channel_dot)  # GroupNorm, InstanceNorm
TRAILING = _Along(_trailing, _leading_sum, _trailing_dot)  # LayerNorm


def _normalized(module: nn.Module, view: _GroupView, along: _Along, eps: float, kernels
                ) -> SequenceRule:
    stats = _GroupStats(eps, kernels)
    rules: list[Rule] = [view, stats, _Ungroup(view)]
    if module.weight is not None or module.bias is not None:
        rules.append(_Affine(module, along, stats, view, kernels))
    return SequenceRule(rules, module)


def group_norm_rule(module: nn.GroupNorm, kernels) -> SequenceRule:
    """The rule of nn.GroupNorm on (N, C, ...) inputs."""
    g, c = module.num_groups, module.num_channels

    def groups_of(shape: tuple[int, ...]) -> int:
        if len(shape) < 2 or shape[1] != c:
            raise ValueError(f"GroupNorm expects {c} channels in dim 1, got input of shape "
                             f"{shape}")
        if shape[0] * c // g * math.prod(shape[2:]) == 1:  # as torch's F.group_norm refuses
            raise ValueError("GroupNorm: expected more than 1 value per channel when "
                             f"training, got input size {list(shape)}")
        return shape[0] * g

    return _normalized(module, _GroupView(groups_of), PER_CHANNEL, module.eps, kernels)


def instance_norm_rule(module: nn.modules.instancenorm._InstanceNorm, kernels) -> SequenceRule:
    """The rule of nn.InstanceNorm1d/2d with instance statistics only (track_running_stats
    False): GroupNorm with one group per channel, on batched (N, C, ...) inputs."""
    c = module.num_features

    def groups_of(shape: tuple[int, ...]) -> int:
        if len(shape) != module._get_no_batch_dim() + 1 or shape[1] != c:
            raise ValueError(f"{type(module).__name__} expects a batch (N, {c}, ...) of "
                             f"{module._get_no_batch_dim() + 1} dimensions, got input of "
                             f"shape {shape}")
        if math.prod(shape[2:]) == 1:  # as torch's F.instance_norm refuses
            raise ValueError(f"{type(module).__name__}: expected more than 1 spatial element "
                             f"when training, got input size {list(shape)}")
        return shape[0] * c

    return _normalized(module, _GroupView(groups_of), PER_CHANNEL, module.eps, kernels)


def layer_norm_rule(module: nn.LayerNorm, kernels) -> SequenceRule:
    """The rule of nn.LayerNorm: each sample normalized over its trailing normalized_shape."""
    shape = tuple(module.normalized_shape)
    size = math.prod(shape)

    def groups_of(in_shape: tuple[int, ...]) -> int:
        if tuple(in_shape[len(in_shape) - len(shape):]) != shape or len(in_shape) <= len(shape):
            raise ValueError(f"LayerNorm over {list(shape)} expects inputs (B, ..., "
                             f"{', '.join(map(str, shape))}), got shape {in_shape}")
        return math.prod(in_shape) // size

    return _normalized(module, _GroupView(groups_of), TRAILING, module.eps, kernels)


def _instance_norm(m: nn.modules.instancenorm._InstanceNorm):
    if m.track_running_stats:
        return "track_running_stats=True (only instance statistics run fused)"
    return lambda kernels: instance_norm_rule(m, kernels)


register_module(nn.GroupNorm)(lambda m: lambda kernels: group_norm_rule(m, kernels))
register_module(nn.LayerNorm)(lambda m: lambda kernels: layer_norm_rule(m, kernels))
register_module(nn.InstanceNorm1d, nn.InstanceNorm2d,
                options=lambda m: m.track_running_stats)(_instance_norm)
