"""Fast gradient sign attacks: FGSM (untargeted or targeted) and TGSM (one step or iterated).

    FGSM, untargeted:  x' = clip(x + ε·sign(∇_x CE(f(x), y)), 0, 1)
    FGSM, targeted:    x' = clip(x − ε·sign(∇_x CE(f(x), t)), 0, 1)
    TGSM:              the targeted step with t = (y + 1) mod K unless a target is given
    iterated TGSM:     x_{i+1} = clip(x_i − α·sign(∇_x CE(f(x_i), t)), 0, 1), optionally also
                       projected onto ‖x' − x‖_∞ ≤ ε, for up to `steps` steps; an example
                       stops moving once the model assigns it to t (if stop_at_target).

x: (B, ...) in [0, 1]; y, target: (B,) integer labels. Results have x's shape and dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import (
    check_eps,
    check_label_range,
    check_labels,
    check_model_input,
    eval_mode,
    loss_grad,
)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *,
         target: Tensor | None = None) -> Tensor:
    """One signed-gradient step of size eps; untargeted (raise CE(y)) or towards `target`."""
    check_model_input(model, x)
    eps = check_eps(eps)
    y = check_labels(y, x)
    if target is not None:
        target = check_labels(target, x, "target")
    with eval_mode(model):
        label = y if target is None else target
        g, _ = loss_grad(model, x, label, name="y" if target is None else "target")
        sign = 1.0 if target is None else -1.0
        return (x.detach() + sign * eps * g.sign()).clamp_(0.0, 1.0)


def next_class_target(y: Tensor, num_classes: int) -> Tensor:
    """The paper's TGSM target t = (y + 1) mod K."""
    return (y.long() + 1) % num_classes


def tgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *,
         target: Tensor | None = None, num_classes: int | None = None) -> Tensor:
    """Targeted gradient sign step; target defaults to (y + 1) mod K (K from the model)."""
    check_model_input(model, x)
    y = check_labels(y, x)
    if target is None:
        if num_classes is None:
            with eval_mode(model), torch.no_grad():
                num_classes = int(model(x[:1]).shape[1])
        check_label_range(y, num_classes)
        target = next_class_target(y, num_classes)
    return fgsm(model, x, y, eps, target=target)


def iterated_tgsm(model: nn.Module, x: Tensor, target: Tensor, *, step: float = 0.1,
                  steps: int = 26, eps: float | None = None,
                  stop_at_target: bool = True) -> Tensor:
    """Repeated targeted sign steps of size `step` (the paper: 0.1, up to 26 steps)."""
    check_model_input(model, x)
    step = check_eps(step, "step")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if eps is not None:
        eps = check_eps(eps)
    target = check_labels(target, x, "target")
    x0 = x.detach()
    xa = x0.clone()
    shape = (-1,) + (1,) * (x.dim() - 1)
    with eval_mode(model):
        for _ in range(steps):
            g, z = loss_grad(model, xa, target, name="target")
            moving = z.argmax(1) != target if stop_at_target else torch.ones_like(target).bool()
            if not bool(moving.any()):
                break
            new = xa - step * g.sign()
            if eps is not None:
                new = torch.minimum(torch.maximum(new, x0 - eps), x0 + eps)
            xa = torch.where(moving.view(shape), new.clamp_(0.0, 1.0), xa)
    return xa
