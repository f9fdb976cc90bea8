"""A score-based black-box L∞ attack: random search over square patches, after the Square
Attack of Andriushchenko et al. (ECCV 2020), reduced to its core.

It only queries the model's logits (no gradients), so gradient masking cannot stop it:
a model that resists white-box gradient attacks but falls to this one is masking its
gradients rather than being robust. For each example, untargeted:

    x_0 = clip(x + ε·v, 0, 1),  v: random ±1 vertical stripes (one sign per column, channel)
    repeat `queries` times: pick a random h×h square (h shrinks with the schedule of the
    paper, h ≈ √(p_i·H·W), p_0 = p_init), a random sign s per channel, propose x' equal to
    x_i except x'_square = clip(x_square + s·ε, 0, 1); keep x' if it raises the margin
    m = max_{k≠y} Z_k − Z_y; stop for an example once m > 0 (misclassified).

x: (B, C, H, W) in [0, 1]. Every returned point lies in the ε-ball around x and in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import (
    check_eps,
    check_label_range,
    check_labels,
    check_model_input,
    eval_mode,
    logits_of,
    margin_loss,
)


def _square_fraction(p_init: float, i: int, n: int) -> float:
    """Piecewise-constant schedule of the Square Attack, rescaled to a budget of n queries."""
    t = int(i * 10000 / max(n, 1))
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                       (4000, 64), (6000, 128), (8000, 256)):
        if t <= bound:
            return p_init / div
    return p_init / 512


@torch.no_grad()
def random_search(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, queries: int = 200,
                  p_init: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """Untargeted score-based L∞ attack with `queries` model calls per batch; x (B, C, H, W)."""
    check_model_input(model, x)
    if x.dim() != 4:
        raise ValueError(f"random_search needs images (B, C, H, W), got shape {tuple(x.shape)}")
    eps = check_eps(eps)
    y = check_labels(y, x)
    if not isinstance(queries, int) or queries < 0:
        raise ValueError(f"queries must be a non-negative int, got {queries!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=gen, device=gen.device).to(x.device, x.dtype)

    b, c, h, w = x.shape
    x0 = x.detach()
    lo, hi = (x0 - eps).clamp(min=0.0), (x0 + eps).clamp(max=1.0)
    with eval_mode(model):
        stripes = torch.where(rand(b, c, 1, w) < 0.5, -1.0, 1.0)
        xa = torch.minimum(torch.maximum(x0 + eps * stripes, lo), hi)
        z = logits_of(model, xa)
        check_label_range(y, z.shape[1])
        margin = margin_loss(z, y)
        for i in range(queries):
            todo = (margin <= 0).nonzero()[:, 0]
            if todo.numel() == 0:
                break
            side = max(1, min(h, w, round(math.sqrt(_square_fraction(p_init, i, queries) * h * w))))
            n = todo.numel()
            top = (rand(n) * (h - side + 1)).long().clamp_(max=h - side)
            left = (rand(n) * (w - side + 1)).long().clamp_(max=w - side)
            sign = torch.where(rand(n, c) < 0.5, -1.0, 1.0)
            rows = torch.arange(h, device=x.device)
            cols = torch.arange(w, device=x.device)
            in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + side)[:, None])
            in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + side)[:, None])
            square = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (n, 1, H, W)
            proposal = x0[todo] + eps * sign[:, :, None, None]
            proposal = torch.minimum(torch.maximum(proposal, lo[todo]), hi[todo])
            cand = torch.where(square, proposal, xa[todo])
            new_margin = margin_loss(logits_of(model, cand), y[todo])
            better = new_margin > margin[todo]
            xa[todo[better]] = cand[better]
            margin[todo[better]] = new_margin[better]
    return xa
