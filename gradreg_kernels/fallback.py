"""Plain autograd double backpropagation, for models the fused schedule cannot run.

Computes the same loss as the fused path (loss.py) with create_graph=True, so
``loss.backward()`` differentiates through the input gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_label_range


def autograd_terms(
    model: nn.Module, x: Tensor, y: Tensor | None, head: str, mask: Tensor | None,
    check_labels: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(data term per example (B,), penalty per example (B,), logits), differentiable."""
    xg = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(xg)
        if head == "output":
            data = z.reshape(z.shape[0], -1).sum(1)
            pen_obj = data
        else:
            if check_labels:
                check_label_range(y, z)
            logp = F.log_softmax(z, dim=1)
            data = -logp.gather(1, y.long()[:, None]).squeeze(1)
            pen_obj = data if head == "ce" else -logp.mean(1)
        (g,) = torch.autograd.grad(pen_obj.sum(), xg, create_graph=True)
        if mask is not None:
            g = g * mask
        pen = g.reshape(g.shape[0], -1).pow(2).sum(1)
    return data, pen, z
