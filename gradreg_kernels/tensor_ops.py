"""Shape helpers shared by the rules, the functional API and the backends (a leaf module:
it imports torch alone, so every layer above may use it).

Channel convention: dimension 1 of an (N, C, ...) tensor is the channel dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: a 2-D convolution's geometry: (stride, padding, dilation, groups), each pair (h, w)
ConvGeom = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]


def channel_shape(like: Tensor) -> list[int]:
    """[1, -1, 1, ...] of ``like``'s rank: the view that puts a (C,) vector on dimension 1."""
    return [1, -1] + [1] * (like.dim() - 2)


def channel_view(v: Tensor, like: Tensor) -> Tensor:
    """A (C,) vector viewed as (1, C, 1, ...) to broadcast over channel dimension 1 of
    ``like`` (N, C, ...)."""
    return v.view(channel_shape(like))


def channel_sum(t: Tensor) -> Tensor:
    """Σ of t over every dimension but the channel dimension 1: (N, C, ...) → (C,)."""
    return t.sum(dim=[0] + list(range(2, t.dim())))


def scale_fresh(t: Tensor, factor: Tensor) -> Tensor:
    """t ⊙ factor, written over t where that keeps t's dtype (else a new, promoted tensor),
    for a t its caller has just made and nothing else holds."""
    if torch.promote_types(t.dtype, factor.dtype) == t.dtype:
        return t.mul_(factor)
    return t * factor


def batchnorm_second_order(xhat: Tensor, inv_std: Tensor, gamma_c: Tensor, delta: Tensor,
                           m_delta: Tensor, mx_delta: Tensor, p_r: Tensor, mx_r: Tensor,
                           dots: Tensor) -> Tensor:
    """Batch norm's second-order term with per-channel means (S = N · mean(x̂ ·), ``dots`` =
    ⟨δ, Pṙ⟩/N, all broadcastable against (N, C, ...)), so N cancels once, and
    P δ = δ − mean(δ) − x̂ mean(x̂ δ) expanded:
        s = coef [mean(x̂ṙ) (δ − mean δ) + x̂ (dots − mean(x̂ṙ) mean(x̂δ)) + mean(x̂δ) Pṙ]
    with coef = −γ/σ², built in one new tensor (no P δ, no product-sized temporaries).
    """
    coef = -gamma_c * inv_std * inv_std
    s = delta.to(torch.promote_types(delta.dtype, p_r.dtype)) - m_delta
    s.mul_(mx_r).addcmul_(xhat, dots - mx_r * mx_delta).addcmul_(p_r, mx_delta)
    return s.mul_(coef)


@torch.no_grad()
def update_running_stats(m: torch.nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor,
                         n: int) -> None:
    """m's running statistics after a batch of n values per channel with mean μ and biased
    variance var (C,), as nn.BatchNorm's forward updates them: num_batches_tracked + 1,
    momentum (or the cumulative average when momentum is None), the unbiased variance."""
    m.num_batches_tracked.add_(1)
    f = (1.0 / float(m.num_batches_tracked)) if m.momentum is None else m.momentum
    m.running_mean.mul_(1 - f).add_(mean.detach().to(m.running_mean.dtype), alpha=f)
    m.running_var.mul_(1 - f).add_((var.detach() * (n / (n - 1))).to(m.running_var.dtype),
                                   alpha=f)
