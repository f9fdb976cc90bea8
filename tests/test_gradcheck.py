"""gradcheck of the fused Function (float64): its backward against finite differences.

The Function's backward (passes 3-4) is the end of the chain and is marked once
differentiable, so gradgradcheck does not apply; a second differentiation raises.
"""

from __future__ import annotations

import pytest
import torch
from oracle_check import randomize_bn
from torch import nn

from gradreg_kernels import gradreg_loss

MODELS = {
    "mlp-smooth": lambda: nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)),
    "mlp-relu": lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
    "mlp-silu": lambda: nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)),
    "conv-groupnorm": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2)),
    "mlp-layernorm": lambda: nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.GELU(),
                                           nn.Linear(5, 2)),
    "conv-prelu-dropout2d": lambda: nn.Sequential(
        nn.Conv2d(1, 3, 2), nn.PReLU(3), nn.Dropout2d(0.3), nn.Flatten(), nn.Linear(12, 2)),
    "conv1d": lambda: nn.Sequential(nn.Conv1d(2, 3, 2, padding=1), nn.Softplus(), nn.Flatten(),
                                    nn.Linear(15, 2)),
    "conv-bn-train": lambda: nn.Sequential(
        nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.Sigmoid(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(8, 2)),
    "conv-pool-bn1d": lambda: nn.Sequential(
        nn.Conv2d(1, 2, 2, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
        nn.BatchNorm1d(8), nn.ELU(), nn.Dropout(0.3), nn.Linear(8, 2)),
}
INPUT = {"mlp-smooth": (3, 3), "mlp-relu": (3, 3), "mlp-silu": (3, 3),
         "conv-groupnorm": (3, 1, 3, 3), "mlp-layernorm": (3, 3),
         "conv-prelu-dropout2d": (3, 1, 3, 3), "conv1d": (3, 2, 4),
         "conv-bn-train": (3, 1, 5, 5),
         "conv-pool-bn1d": (3, 1, 4, 4)}


@pytest.mark.parametrize("head", ["ce", "logprob_sum", "output"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradcheck_params_and_input(name, head):
    model = MODELS[name]().double()
    randomize_bn(model)
    x = torch.randn(*INPUT[name], dtype=torch.float64, requires_grad=True)
    y = None if head == "output" else torch.randint(0, 2, (x.shape[0],))
    mask = torch.rand(x.shape[1:], dtype=torch.float64)
    params = [p for p in model.parameters()]

    def loss(x_, *ps):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return gradreg_loss(model, x_, y, 0.8, head=head, mask=mask, keep_saved=True).loss

    assert torch.autograd.gradcheck(loss, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_second_differentiation_is_refused():
    model = MODELS["mlp-smooth"]().double()
    params = list(model.parameters())
    out = gradreg_loss(model, torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]), 1.0)
    grads = torch.autograd.grad(out.loss, params, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(grads[0].sum(), params)


def test_second_backward_needs_keep_saved():
    model = MODELS["conv-bn-train"]().double()
    x, y = torch.randn(3, 1, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 1])
    loss = gradreg_loss(model, x, y, 1.0).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="keep_saved=True"):
        loss.backward()
    model.zero_grad()
    kept = gradreg_loss(model, x, y, 1.0, keep_saved=True).loss
    kept.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    kept.backward()
    for g, p in zip(first, model.parameters()):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-12, atol=1e-15)
