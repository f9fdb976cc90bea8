"""The schedule does 6L − 1 product-units for an L-layer MLP and recomputes nothing.

A product-unit of layer i is one (B × w_{i−1} × w_i) matrix product; the counting backend
records the FLOPs of every product and how often each primitive runs.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.backends import (
    _INSTANCES,
    BackendEntry,
    register_backend,
    unregister_backend,
)
from gradreg_kernels.backends.torch_ops import TorchBackend


class CountingBackend(TorchBackend):
    """The portable backend, counting calls of every primitive and FLOPs of every product."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.flops = 0

    def __getattribute__(self, attr):
        value = object.__getattribute__(self, attr)
        if callable(value) and not attr.startswith("_") and attr in dir(TorchBackend):
            object.__getattribute__(self, "calls")[attr] += 1
        return value

    def linear(self, a, w, b):
        self.flops += 2 * a.shape[0] * w.shape[0] * w.shape[1]
        return super().linear(a, w, b)

    def linear_input_grad(self, d, w):
        self.flops += 2 * d.shape[0] * w.shape[0] * w.shape[1]
        return super().linear_input_grad(d, w)

    def linear_weight_grad(self, pairs, acc=None):
        for d, a in pairs:
            self.flops += 2 * d.shape[0] * d.shape[1] * a.shape[1]
        return super().linear_weight_grad(pairs, acc)


@pytest.fixture
def counting():
    register_backend(BackendEntry("counting", CountingBackend, ("cpu",), lambda: None, -1))
    yield
    unregister_backend("counting")


@pytest.mark.parametrize("widths", [(13, 7), (20, 17, 9), (31, 23, 19, 11, 5)])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Softplus])
def test_six_l_minus_one_products(counting, widths, act):
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), act()]
    model = nn.Sequential(*layers[:-1])
    n_layers, batch = len(widths) - 1, 17
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    out = gradreg_loss(model, x, y, 1.0, backend="counting")
    out.loss.backward()
    kernels = _INSTANCES["counting"]
    units = [2 * batch * widths[i] * widths[i + 1] for i in range(n_layers)]
    assert kernels.flops == 6 * sum(units) - units[0]  # 6 units per layer, 5 for the first
    assert kernels.flops / (sum(units) / n_layers) == pytest.approx(6 * n_layers - 1, rel=0.5)
    c = kernels.calls
    assert c["linear"] == 2 * n_layers  # pass 1 and pass 3
    assert c["linear_input_grad"] == 2 * n_layers - 1  # pass 2, and pass 4 minus the input
    assert c["linear_weight_grad"] == 2 * n_layers  # dᵀr in pass 3, z̄ᵀa in pass 4
    n_act = n_layers - 1
    for step in ("act_forward", "act_chain", "act_tangent", "act_backward"):
        assert c[step] == n_act, step
    assert c["softmax_ce"] == 1 and c["softmax_hvp"] == 1


def test_uniform_width_mlp_is_exactly_6l_minus_1_units(counting):
    n_layers, width, batch = 4, 16, 8
    layers: list[nn.Module] = []
    for _ in range(n_layers):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    gradreg_loss(model, torch.randn(batch, width), torch.randint(0, width, (batch,)), 1.0,
                 backend="counting").loss.backward()
    unit = 2 * batch * width * width
    assert _INSTANCES["counting"].flops == (6 * n_layers - 1) * unit


@pytest.mark.parametrize("lead", [nn.Flatten, nn.Identity, lambda: nn.Dropout(0.2)])
def test_leading_parameter_free_layers_cost_no_product(counting, lead):
    """A Flatten / Dropout before the first Linear adds no input-gradient product in pass 4."""
    width, batch = 12, 9
    model = nn.Sequential(lead(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5))
    gradreg_loss(model, torch.randn(batch, width), torch.randint(0, 5, (batch,)), 1.0,
                 backend="counting").loss.backward()
    units = [2 * batch * width * width, 2 * batch * width * 5]
    assert _INSTANCES["counting"].flops == 6 * sum(units) - units[0]


@pytest.mark.parametrize("batch, folded", [(3, 1), (40, 2)])
def test_weight_gradient_terms_run_where_memory_is_lower(counting, batch, folded):
    """dᵀr runs in pass 3 where 2 N (in + out) ≥ in · out (d and r released early), else in
    pass 4 with z̄ᵀa as one doubled-batch product; the products' cost is the same."""
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))  # 6144 / 3072 / 240
    x, y = torch.randn(batch, 64), torch.randint(0, 5, (batch,))
    gradreg_loss(model, x, y, 1.0, backend="counting").loss.backward()
    kernels = _INSTANCES["counting"]
    assert kernels.calls["linear_weight_grad"] == 2 + folded
    units = [2 * batch * 64 * 48, 2 * batch * 48 * 5]
    assert kernels.flops == 6 * sum(units) - units[0]
