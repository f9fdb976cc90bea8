"""Plain autograd double backpropagation, for models the fused schedule cannot run.

Computes the same loss as the fused path (loss.py) with create_graph=True, so
``loss.backward()`` differentiates through the input gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .checks import check_label_range


def autograd_terms(
    model: nn.Module, x: Tensor, y: Tensor | None, head, mask: Tensor | None,
    check_labels: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(data term per example (B,), penalty per example (B,), logits), differentiable;
    ``head`` a head object of rules/heads.py (its ``per_example`` torch expressions)."""
    xg = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(xg)
        if check_labels and head.uses_labels and not y.is_floating_point():
            check_label_range(y, z)
        data, pen_obj = head.per_example(z, y)
        (g,) = torch.autograd.grad(pen_obj.sum(), xg, create_graph=True)
        if mask is not None:
            g = g * mask
        pen = g.reshape(g.shape[0], -1).pow(2).sum(1)
    return data, pen, z
