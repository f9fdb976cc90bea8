"""Deliberately naive double backpropagation with torch.autograd (create_graph=True).

Shares no code with gradreg_kernels. Written straight from the definition:

    loss = w · (1/B) Σ_n data_n + λ · (1/B) Σ_n ‖M ⊙ g_n‖²,   g = ∇_X Σ_n ℓ_n
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def oracle_loss(model, x, y=None, lam=1.0, head="ce", mask=None, value_weight=1.0):
    """The loss as an autograd graph through the input gradient; returns (loss, ce, pen, z).

    An x that requires grad is used as it is, so the loss can be differentiated in x too."""
    if not x.requires_grad:
        x = x.detach().clone().requires_grad_(True)
    z = model(x)
    if head == "output":
        data = z.reshape(z.shape[0], -1).sum(dim=1)
        ell = data
    else:
        logp = F.log_softmax(z, dim=1)
        data = F.nll_loss(logp, y, reduction="none")
        if head == "ce":
            ell = data
        elif head == "logprob_sum":
            ell = -logp.mean(dim=1)
        else:
            raise ValueError(head)
    grad_x = torch.autograd.grad(ell.sum(), x, create_graph=True)[0]
    if mask is not None:
        grad_x = grad_x * mask
    pen = (grad_x ** 2).flatten(1).sum(dim=1).mean()
    ce = data.mean()
    return value_weight * ce + lam * pen, ce, pen, z


def oracle_grads(model, x, y=None, lam=1.0, head="ce", mask=None, value_weight=1.0):
    """{parameter name: gradient of oracle_loss}, plus the loss parts."""
    loss, ce, pen, z = oracle_loss(model, x, y, lam, head, mask, value_weight)
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
