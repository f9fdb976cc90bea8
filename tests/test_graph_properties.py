"""Property test of the graph plan: random forwards built from residual sums, gates,
concatenations, chunk pieces, scalings, reshapes and functional activations, at random
widths and batch sizes, against the float64 oracle on both CPU backends, the penalty's own
gradient included (value_weight drawn from {0, 1}). Seeded and bounded;
``HYPOTHESIS_PROFILE=long`` runs 400 random examples."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle_check import check_against_oracle
from torch import nn

ACTS = [torch.tanh, F.softplus, F.gelu, F.silu, torch.sigmoid, F.relu]
EXAMPLES = 400 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 25
OPS = ["residual", "gate", "cat", "chunk", "scale", "view", "act"]


class RandomGraph(nn.Module):
    """h ← op(h) for a drawn list of ops over a width-w state, each op with its own Linear
    layers; the head maps to K classes."""

    def __init__(self, d_in: int, width: int, k: int, ops: list[tuple[str, int]]) -> None:
        super().__init__()
        self.ops = ops
        self.inp = nn.Linear(d_in, width)
        self.layers = nn.ModuleList()
        for op, _ in ops:
            if op == "cat":
                self.layers.append(nn.Linear(2 * width, width))
            elif op == "chunk":
                self.layers.append(nn.Linear(width - width // 2, width))
            else:
                self.layers.append(nn.Linear(width, width))
        self.head = nn.Linear(width, k)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        for (op, a), lin in zip(self.ops, self.layers):
            act = ACTS[a % len(ACTS)]
            if op == "residual":
                h = h + act(lin(h))
            elif op == "gate":
                h = lin(h) * torch.sigmoid(h)
            elif op == "cat":
                h = lin(torch.cat([h, act(h)], dim=1))
            elif op == "chunk":
                first, second = torch.split(h, [h.shape[1] // 2, h.shape[1] - h.shape[1] // 2],
                                            dim=1)
                h = act(lin(second)) + first.mean(1, keepdim=True)
            elif op == "scale":
                h = 0.5 * lin(h) - h / 3
            elif op == "view":
                h = lin(h).view(h.size(0), 2, -1).reshape(h.shape[0], -1)
            else:
                h = act(lin(h))
        return self.head(h)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 5)), min_size=1,
                    max_size=5),
       width=st.sampled_from([2, 4, 6, 10]), batch=st.integers(1, 5),
       k=st.integers(2, 4), value_weight=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 2**16))
def test_random_graphs_match_the_oracle(ops, width, batch, k, value_weight, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = RandomGraph(5, width, k, ops)
    x = torch.randn(batch, 5, generator=g)
    y = torch.randint(0, k, (batch,), generator=g)
    for backend, dtype in [("cpu", torch.float32), ("torch", torch.float64)]:
        out = check_against_oracle(model, x, y, lam=0.8, dtype=dtype, backend=backend,
                                   value_weight=value_weight)
        assert out.backend == backend
