"""The fused step captured in a CUDA graph gives the uncaptured step's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from kernel_check import DEVICE, rel_err
from torch import nn

from gradreg_kernels import gradreg_loss

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graph_replay_matches_fused_step(backend, device):
    from gradreg_kernels.graphs import GraphedStep

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 7 * 7, 13),
                          nn.Tanh(), nn.Linear(13, 10)).to(device)
    plain = copy.deepcopy(model)
    x0 = torch.rand(37, 1, 14, 14, device=device)
    y0 = torch.randint(0, 10, (37,), device=device)
    step = GraphedStep(model, x0, y0, 0.9, backend=backend)
    for seed in (1, 2):
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.rand(x0.shape, device=device, generator=g)
        y = torch.randint(0, 10, (37,), device=device, generator=g)
        loss = step(x, y).clone()
        plain.zero_grad(set_to_none=True)
        out = gradreg_loss(plain, x, y, 0.9, backend=backend)
        out.loss.backward()
        assert rel_err(loss, out.loss) < 1e-5
        for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            assert rel_err(p.grad, q.grad) < 1e-5, n
    with pytest.raises(ValueError, match="captured for x of shape"):
        step(torch.rand(3, 1, 14, 14, device=device), y0[:3])
