"""Jacobian-based saliency map attack (Papernot et al., "The Limitations of Deep Learning in
Adversarial Settings", EuroS&P 2016), targeted, batched, with a bounded-memory pair search.

For an example x with D features (D = numel of one example), logits Z and target t:

    α_p = ∂Z_t/∂x_p,   β_p = Σ_{k≠t} ∂Z_k/∂x_p = ∂(Σ_k Z_k)/∂x_p − α_p

(two backward passes, not the full K × D Jacobian). Each iteration picks the pair p ≠ q of
the search domain Γ maximising

    S(p, q) = −(α_p + α_q)·(β_p + β_q)   subject to  s·(α_p + α_q) > 0,  s·(β_p + β_q) < 0,

s = sign(θ), and sets x_{p,q} ← clip(x_{p,q} + θ, 0, 1); p and q then leave Γ, so each
feature changes at most once. Γ starts as the features that can move in θ's direction
(x < 1 for θ > 0, x > 0 for θ < 0). The attack stops for an example when the model predicts
t (success), when no admissible pair is left (failure; Papernot et al.'s Algorithm 3 has
nothing to pick there), or after ⌊γ·D/2⌋ iterations, so at most γ·D features change.
The saliency is taken on the logits, as in the common implementations (on softmax
probabilities Σ_k ∂F_k/∂x = 0 makes β = −α and the map degenerate).

Memory bound. The pair search never forms the B × D × D score tensor. It walks over blocks
of b examples and C rows p (columns q ≥ first row of the block, so about half the pairs),
with b·C·D ≤ pair_budget (b = C = 1 if D alone exceeds it). A block holds at most two
floating tensors (α_p + α_q, and β_p + β_q, whose product is formed in place) and two
boolean ones, so the search has at most (2·e + 2)·max(pair_budget, D) bytes live, e the
bytes of x's dtype: with the default pair_budget = 2^22 and float32, 40 MiB, whatever B is.
The rest is O(B·D): x, α, β, Γ. (Measured: B = 256 MNIST images, peak resident memory grew
by about 70 MiB with the default budget, allocator and library overhead included, against
about 1 GiB with the search unchunked.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._common import check_label_range, check_labels, check_model_input, eval_mode, logits_of


@dataclass
class JSMAResult:
    """x_adv: (B, ...) in [0, 1]; success: (B,) bool (model predicts the target on x_adv);
    l0: (B,) int64 number of features changed; iterations: (B,) int64 pairs modified."""

    x_adv: Tensor
    success: Tensor
    l0: Tensor
    iterations: Tensor


def saliency_terms(model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """α = ∇_x Z_t and β = ∇_x Σ_{k≠t} Z_k, flattened to (B, D), and the logits (B, K)."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = logits_of(model, xg)
        check_label_range(target, z.shape[1], "target")
        z_t = z.gather(1, target[:, None]).sum()
        (alpha,) = torch.autograd.grad(z_t, xg, retain_graph=True)
        (total,) = torch.autograd.grad(z.sum(), xg)
    alpha = alpha.flatten(1)
    return alpha, total.flatten(1) - alpha, z.detach()


def best_pairs(alpha: Tensor, beta: Tensor, domain: Tensor, increase: bool,
               pair_budget: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row n of (n, D) α, β and the boolean domain Γ: the admissible pair (p, q), p ≠ q,
    maximising −(α_p+α_q)(β_p+β_q). Returns p, q (int64) and found (bool), each (n,)."""
    n, d = alpha.shape
    inf = torch.tensor(float("inf"), dtype=alpha.dtype, device=alpha.device)
    # A feature outside Γ gets α = ∓∞: every pair holding it fails the sign test on α.
    a = torch.where(domain, alpha, -inf if increase else inf)
    best_val = torch.full((n,), -math.inf, dtype=alpha.dtype, device=alpha.device)
    best_p = torch.zeros(n, dtype=torch.long, device=alpha.device)
    best_q = torch.zeros(n, dtype=torch.long, device=alpha.device)
    rows_b = max(1, min(n, pair_budget // d))
    for b0 in range(0, n, rows_b):
        b1 = min(n, b0 + rows_b)
        chunk = max(1, pair_budget // ((b1 - b0) * d))
        for p0 in range(0, d, chunk):
            p1 = min(d, p0 + chunk)
            width = d - p0
            s_a = a[b0:b1, p0:p1, None] + a[b0:b1, None, p0:]
            s_b = beta[b0:b1, p0:p1, None] + beta[b0:b1, None, p0:]
            ok = s_a > 0 if increase else s_a < 0
            ok &= s_b < 0 if increase else s_b > 0
            score = s_a.mul_(s_b).neg_()  # in s_a's memory
            del s_a, s_b
            score.masked_fill_(ok.logical_not_(), -math.inf)
            del ok
            diag = torch.arange(p1 - p0, device=alpha.device)
            score[:, diag, diag] = -math.inf  # p = q is not a pair
            val, idx = score.view(b1 - b0, -1).max(dim=1)
            better = val > best_val[b0:b1]
            best_val[b0:b1] = torch.where(better, val, best_val[b0:b1])
            best_p[b0:b1] = torch.where(better, p0 + idx // width, best_p[b0:b1])
            best_q[b0:b1] = torch.where(better, p0 + idx % width, best_q[b0:b1])
    return best_p, best_q, best_val > -math.inf


def jsma(model: nn.Module, x: Tensor, target: Tensor, *, theta: float = 1.0,
         gamma: float = 0.25, pair_budget: int = 1 << 22) -> JSMAResult:
    """Targeted JSMA on a batch x (B, ...) in [0, 1] towards target (B,); see the module doc."""
    check_model_input(model, x)
    target = check_labels(target, x, "target")
    theta = float(theta)
    if not math.isfinite(theta) or theta == 0 or abs(theta) > 1:
        raise ValueError(f"theta must be a non-zero change in [-1, 1], got {theta}")
    gamma = float(gamma)
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma (the largest fraction of features changed) must lie in [0, 1], "
                         f"got {gamma}")
    if not isinstance(pair_budget, int) or pair_budget < 1:
        raise ValueError(f"pair_budget must be a positive int, got {pair_budget!r}")
    increase = theta > 0
    batch = x.shape[0]
    xa = x.detach().clone().flatten(1)
    d = xa.shape[1]
    domain = xa < 1 if increase else xa > 0
    max_iters = int(math.floor(gamma * d / 2))
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    success = torch.zeros(batch, dtype=torch.bool, device=x.device)
    iters = torch.zeros(batch, dtype=torch.long, device=x.device)
    with eval_mode(model):
        for it in range(max_iters + 1):
            idx = active.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            alpha, beta, z = saliency_terms(model, xa[idx].view((-1,) + x.shape[1:]),
                                            target[idx])
            hit = z.argmax(1) == target[idx]
            success[idx[hit]] = True
            active[idx[hit]] = False
            if it == max_iters:
                break
            keep = ~hit
            idx, alpha, beta = idx[keep], alpha[keep], beta[keep]
            if idx.numel() == 0:
                break
            p, q, found = best_pairs(alpha, beta, domain[idx], increase, pair_budget)
            active[idx[~found]] = False  # no admissible pair: the attack gives up
            idx, p, q = idx[found], p[found], q[found]
            for f in (p, q):
                xa[idx, f] = (xa[idx, f] + theta).clamp_(0.0, 1.0)
                domain[idx, f] = False
            iters[idx] += 1
    x_adv = xa.view(x.shape)
    l0 = (x_adv != x.detach()).flatten(1).sum(1)
    return JSMAResult(x_adv=x_adv, success=success, l0=l0, iterations=iters)
