"""Projected gradient descent in the L∞ ball (Madry et al. 2018), with random start.

    x_0 = clip(x + U(−ε, ε), 0, 1)                  (or x_0 = x without random start)
    x_{i+1} = Π(x_i + s·α·sign(∇_x L(f(x_i), c)))   Π: projection onto the box
                                                    [max(x − ε, 0), min(x + ε, 1)]
untargeted: c = y, s = +1; targeted: c = target, s = −1. L is cross-entropy, or the logit
margin (`loss="margin"`, which keeps its gradient where softmax saturates). The result for
each example is the first iterate that reaches the goal (misclassified, or classified as
the target); examples that never reach it return the last iterate. With `restarts` > 1
the search is repeated from fresh random starts for the examples not yet successful.
Every returned point lies in the ε-ball around x and in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import (
    check_eps,
    check_labels,
    check_model_input,
    eval_mode,
    loss_grad,
)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 40,
        step_size: float | None = None, random_start: bool = True, restarts: int = 1,
        target: Tensor | None = None, loss: str = "ce", schedule: str = "constant",
        generator: torch.Generator | None = None) -> Tensor:
    """L∞ PGD. Returns adversarial x of x's shape.

    schedule "constant": α_i = step_size, default 2.5·ε/steps; "cosine": α_i = α_0 · ½(1 +
    cos(π i / steps)) for i = 0 … steps − 1, α_0 = step_size, default ε/4 (large steps
    first to move far, small ones last to settle on the ball's boundary). Restarts after
    the first search only the examples that have not reached the goal.
    """
    check_model_input(model, x)
    eps = check_eps(eps)
    y = check_labels(y, x)
    if target is not None:
        target = check_labels(target, x, "target")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive int, got {restarts!r}")
    if loss not in ("ce", "margin"):
        raise ValueError(f"loss must be 'ce' or 'margin', got {loss!r}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if step_size is None:
        alpha0 = 2.5 * eps / steps if schedule == "constant" else eps / 4
    else:
        alpha0 = check_eps(step_size, "step_size")
    alphas = [alpha0 if schedule == "constant" else
              alpha0 * 0.5 * (1 + math.cos(math.pi * i / steps)) for i in range(steps)]
    x0 = x.detach()
    best = x0.clone()
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with eval_mode(model):
        for r in range(restarts):
            todo = (~done).nonzero()[:, 0]
            if todo.numel() == 0:
                break
            reached, found = _search(model, x0[todo], y[todo],
                                     None if target is None else target[todo], eps, alphas,
                                     random_start, loss, generator)
            # examples that never reach the goal keep the first search's last iterate
            keep = torch.ones_like(reached) if r == 0 else reached
            best[todo[keep]] = found[keep]
            done[todo[reached]] = True
    return best


def _search(model: nn.Module, x0: Tensor, y: Tensor, target: Tensor | None, eps: float,
            alphas: list[float], random_start: bool, loss: str,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One PGD run from one start: (reached (B,) bool, for each example the first iterate
    reaching the goal, or the last iterate where none does)."""
    lo, hi = (x0 - eps).clamp(min=0.0), (x0 + eps).clamp(max=1.0)
    label = y if target is None else target
    name = "y" if target is None else "target"
    shape = (-1,) + (1,) * (x0.dim() - 1)
    xa = x0.clone()
    if random_start and eps > 0:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype,
                           device="cpu" if generator is None else generator.device)
        xa = torch.minimum(torch.maximum(x0 + (2 * noise.to(x0.device) - 1) * eps, lo), hi)
    best = xa.clone()
    done = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    for i in range(len(alphas) + 1):
        g, z = loss_grad(model, xa, label, loss, name)
        # untargeted: ascend L(y); targeted: descend CE(target), or ascend the margin's
        # negative (the margin w.r.t. the target is lowered by raising the target's logit)
        s = 1.0 if target is None or loss == "margin" else -1.0
        if loss == "margin" and target is not None:
            g = -g
        pred = z.argmax(1)
        hit = (pred != y if target is None else pred == target) & ~done
        best = torch.where(hit.view(shape), xa, best)
        done |= hit
        if bool(done.all()) or i == len(alphas):
            best = torch.where(done.view(shape), best, xa)
            break
        xa = torch.minimum(torch.maximum(xa + s * alphas[i] * g.sign(), lo), hi)
    return done, best
