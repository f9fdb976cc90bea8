"""Heads: the per-example objective ℓ_n whose input gradient is penalised, and the data term.

Each head supplies, at the logits z (B, K):
- the data term per example (what the loss averages) and its gradient at z;
- ∇_z ℓ_n, the seed of the input-gradient chain (pass 2);
- the Hessian-vector product H t of ℓ at z (pass 3 → 4), or None where H = 0.

ce:          data = ℓ = −log softmax(z)_y;   ∇ℓ = p − e_y;    H t = p ⊙ t − p (pᵀt)
logprob_sum: data = CE(y);  ℓ = −(1/K) Σ_k log softmax(z)_k;  ∇ℓ = p − 1/K;  same H
output:      data = ℓ = Σ_k z_k (a scalar critic score);  ∇ℓ = 1;  H = 0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

HEADS = ("ce", "logprob_sum", "output")


@dataclass
class HeadEval:
    data: Tensor       # (B,) per-example data term
    data_grad: Tensor  # (B, ...) gradient of data_n at z_n
    pen_grad: Tensor   # (B, ...) ∇_z ℓ_n, the seed of pass 2


class SoftmaxHead:
    """Shared part of the two softmax heads: CE data term and the softmax Hessian."""

    uniform = False

    def __init__(self, bk) -> None:
        self.bk = bk

    def evaluate(self, z: Tensor, y: Tensor) -> HeadEval:
        if z.dim() != 2:
            raise ValueError(f"head={self.name!r} needs (B, K) logits from the model, "
                             f"got shape {tuple(z.shape)}")
        ce, self.p, data_grad, pen_grad = self.bk.softmax_head(z, y, self.uniform)
        return HeadEval(ce, data_grad, pen_grad)

    def hvp(self, t: Tensor) -> Tensor | None:
        return self.bk.softmax_hvp(self.p, t)


class CEHead(SoftmaxHead):
    name = "ce"


class LogProbSumHead(SoftmaxHead):
    name = "logprob_sum"
    uniform = True


class OutputHead:
    name = "output"

    def __init__(self, bk=None) -> None:
        pass

    def evaluate(self, z: Tensor, y: Tensor | None) -> HeadEval:
        ones = torch.ones_like(z)
        return HeadEval(z.reshape(z.shape[0], -1).sum(1), ones, ones)

    def hvp(self, t: Tensor) -> Tensor | None:
        return None


def make_head(name: str, bk) -> CEHead | LogProbSumHead | OutputHead:
    heads = {"ce": CEHead, "logprob_sum": LogProbSumHead, "output": OutputHead}
    if name not in heads:
        raise ValueError(f"head must be one of {HEADS}, got {name!r}")
    return heads[name](bk)
