"""Tiny models shared by the attack tests (not collected as tests)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn(side: int = 6, classes: int = 5, seed: int = 0,
             dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Conv → BatchNorm → ReLU → Flatten → Dropout → Linear, random weights and BN stats."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(3 * side * side, classes),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        bn = model[1]
        bn.running_mean.copy_(torch.randn(3, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
    return model.to(dtype)


def images(n: int, side: int = 6, seed: int = 1, dtype: torch.dtype = torch.float64,
           lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(n, 1, side, side, generator=g)).to(dtype)
