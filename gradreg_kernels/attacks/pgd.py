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
        target: Tensor | None = None, loss: str = "ce",
        generator: torch.Generator | None = None) -> Tensor:
    """L∞ PGD; step_size defaults to 2.5·ε/steps. Returns adversarial x of x's shape."""
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
    alpha = 2.5 * eps / steps if step_size is None else check_eps(step_size, "step_size")
    x0 = x.detach()
    lo, hi = (x0 - eps).clamp(min=0.0), (x0 + eps).clamp(max=1.0)
    label = y if target is None else target
    sign = 1.0 if target is None else -1.0
    shape = (-1,) + (1,) * (x.dim() - 1)

    def reached(z: Tensor) -> Tensor:
        pred = z.argmax(1)
        return pred != y if target is None else pred == target

    best = x0.clone()
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with eval_mode(model):
        for _ in range(restarts):
            xa = x0.clone()
            if random_start and eps > 0:
                noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype,
                                   device="cpu" if generator is None else generator.device)
                xa = torch.minimum(torch.maximum(x0 + (2 * noise.to(x0.device) - 1) * eps, lo),
                                   hi)
            for i in range(steps + 1):
                name = "y" if target is None else "target"
                if loss == "margin":
                    g, z = loss_grad(model, xa, label, "margin", name)
                    g = g if target is None else -g  # margin w.r.t. target: descend = raise t
                    s = 1.0
                else:
                    g, z = loss_grad(model, xa, label, "ce", name)
                    s = sign
                hit = reached(z) & ~done
                best = torch.where(hit.view(shape), xa, best)
                done |= hit
                if bool(done.all()) or i == steps:
                    if i == steps:
                        best = torch.where(done.view(shape), best, xa)
                    break
                xa = torch.minimum(torch.maximum(xa + s * alpha * g.sign(), lo), hi)
            if bool(done.all()):
                break
    return best
