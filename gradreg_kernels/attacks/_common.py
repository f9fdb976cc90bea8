"""Shared pieces of the attacks: argument checks, eval mode, loss gradients at the input.

Every attack works on a batch x of shape (B, ...) with values in [0, 1] and returns a new
tensor of the same shape, dtype and device, also in [0, 1]. The model is put in eval mode
for the attack and each submodule's own training flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import (  # noqa: F401  (check_labels is re-exported to the attacks)
    check_labels,
    check_labels_in_range,
    check_model_and_batch,
    check_nonnegative,
)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with `model.eval()`; restore every submodule's training flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def check_model_input(model: nn.Module, x: Tensor) -> None:
    """Raise a named error unless x is a non-empty float batch in [0, 1] on the model's device."""
    check_model_and_batch(model, x)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"x must lie in [0, 1] (pixel intensities); got values in [{lo}, {hi}]")
    for name, p in model.named_parameters():
        if p.device != x.device:
            raise ValueError(f"model parameter {name!r} is on {p.device} but x is on {x.device}")
        if p.is_floating_point() and p.dtype != x.dtype:
            raise TypeError(f"model parameter {name!r} is {p.dtype} but x is {x.dtype}; "
                            "cast one to the other")
        break


def check_label_range(y: Tensor, num_classes: int, name: str = "y") -> None:
    """Raise a ValueError naming the first label outside [0, num_classes)."""
    check_labels_in_range(y, num_classes, name)


def check_eps(eps: float, name: str = "eps") -> float:
    return check_nonnegative(eps, name)


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    z = model(x)
    if z.dim() != 2:
        raise ValueError(f"the model must return (B, K) logits, got shape {tuple(z.shape)}")
    return z


def margin_loss(z: Tensor, y: Tensor) -> Tensor:
    """Per-example logit margin max_{k≠y} z_k − z_y (positive iff misclassified), shape (B,).

    Unlike cross-entropy it does not saturate when softmax underflows, so its gradient
    survives the logit scaling that hides cross-entropy gradients (gradient masking).
    """
    z_y = z.gather(1, y[:, None])[:, 0]
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return other - z_y


def loss_grad(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce",
              name: str = "y") -> tuple[Tensor, Tensor]:
    """∇_x Σ_n L(f(x_n), y_n) and the logits (detached); L = cross-entropy or logit margin.

    The gradient of the sum is the per-example gradient row by row (eval mode, no batch
    coupling). Only x's gradient is computed: parameter .grad fields are left untouched.
    """
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = logits_of(model, xg)
        check_label_range(y, z.shape[1], name)
        if loss == "ce":
            value = F.cross_entropy(z, y, reduction="sum")
        elif loss == "margin":
            value = margin_loss(z, y).sum()
        else:
            raise ValueError(f"loss must be 'ce' or 'margin', got {loss!r}")
        (g,) = torch.autograd.grad(value, xg)
    return g, z.detach()
