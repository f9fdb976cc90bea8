"""Deliberately naive double backpropagation with torch.autograd (create_graph=True).

Shares no code with gradreg_kernels. Written straight from the definition:

    loss = w · (1/B) Σ_n data_n + λ · (1/B) Σ_n ‖M ⊙ g_n‖²,   g = ∇_X Σ_n ℓ_n
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _objective(z, y, head, label_smoothing, class_weight):
    """(data_n, ℓ_n) of a named head or a callable, straight from torch.nn.functional."""
    if callable(head):
        ell = head(z, y)
        return ell, ell
    if head == "output":
        data = z.reshape(z.shape[0], -1).sum(dim=1)
        return data, data
    if head == "mse":
        data = F.mse_loss(z, y, reduction="none").reshape(z.shape[0], -1).mean(dim=1)
        return data, data
    if head == "bce":
        data = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        data = data.reshape(z.shape[0], -1).mean(dim=1)
        return data, data
    data = F.cross_entropy(z, y, weight=class_weight, label_smoothing=label_smoothing,
                           reduction="none")
    if head == "ce":
        return data, data
    if head == "logprob_sum":
        return data, -F.log_softmax(z, dim=1).mean(dim=1)
    raise ValueError(head)


def oracle_loss(model, x, y=None, lam=1.0, head="ce", mask=None, value_weight=1.0, *,
                data=None, label_smoothing=0.0, class_weight=None):
    """The loss as an autograd graph through the input gradient; returns (loss, ce, pen, z).
    ``head`` names the penalised objective ℓ or is a callable ℓ(z, y) -> (B,); ``data``
    (a name or a callable) the data term, by default the head's own.

    An x that requires grad is used as it is, so the loss can be differentiated in x too."""
    if not x.requires_grad:
        x = x.detach().clone().requires_grad_(True)
    z = model(x)
    data_n, ell = _objective(z, y, head, label_smoothing, class_weight)
    if data is not None:
        data_n = _objective(z, y, data, label_smoothing, class_weight)[0]
    grad_x = torch.autograd.grad(ell.sum(), x, create_graph=True)[0]
    if mask is not None:
        grad_x = grad_x * mask
    pen = (grad_x ** 2).flatten(1).sum(dim=1).mean()
    ce = data_n.mean()
    return value_weight * ce + lam * pen, ce, pen, z


def oracle_grads(model, x, y=None, lam=1.0, head="ce", mask=None, value_weight=1.0,
                 **head_options):
    """{parameter name: gradient of oracle_loss}, plus the loss parts; ``head_options``:
    oracle_loss's data, label_smoothing, class_weight."""
    loss, ce, pen, z = oracle_loss(model, x, y, lam, head, mask, value_weight, **head_options)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return dict(zip(names, grads)), loss.detach(), ce.detach(), pen.detach()


def user_step(model, x, y=None, lam=1.0, head="ce", mask=None, value_weight=1.0):
    """One training step as a user writes it around the model's own forward: zero the
    gradients, the loss through ``oracle_loss``, backward into p.grad. Returns the loss,
    detached. A critic's R1 step is ``head="output", lam=γ/2, value_weight=-1``."""
    model.zero_grad(set_to_none=True)
    loss = oracle_loss(model, x, y, lam, head, mask, value_weight)[0]
    loss.backward()
    return loss.detach()
