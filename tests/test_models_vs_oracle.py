"""Mixed models against the oracle: MLP, CNN with pooling, the paper's MNIST CNN, on the
portable backend (float64 and float32) and the C++ ``cpu`` backend (float32, what users
get), the total and the penalty's own gradient (value_weight = 0)."""

from __future__ import annotations

import pytest
import torch
from oracle_check import check_against_oracle, randomize_bn
from torch import nn


def paper_cnn(c1: int = 32, c2: int = 64, fc: int = 1024, side: int = 28) -> nn.Sequential:
    """The paper's MNIST CNN (widths adjustable to keep float64 tests quick)."""
    flat = c2 * (side // 4) ** 2
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, c1, 5, padding="same"), nn.BatchNorm2d(c1), nn.ReLU(),
                      nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(c1, c2, 5, padding="same"), nn.BatchNorm2d(c2), nn.ReLU(),
                      nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Sequential(nn.Linear(flat, fc), nn.BatchNorm1d(fc), nn.ReLU(), nn.Dropout(0.5)),
        nn.Linear(fc, 10),
    )


#: (backend, dtype): the portable backend in float64 and float32, the C++ one in float32
BACKENDS = [("torch", torch.float64), ("torch", torch.float32), ("cpu", torch.float32)]


@pytest.mark.parametrize("value_weight", [1.0, 0.0])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_relu_mlp(batch, backend, dtype, value_weight):
    model = nn.Sequential(nn.Flatten(), nn.Linear(49, 33), nn.ReLU(), nn.Linear(33, 17),
                          nn.ReLU(), nn.Linear(17, 10))
    x = torch.rand(batch, 1, 7, 7)
    check_against_oracle(model, x, torch.randint(0, 10, (batch,)), lam=3.0, dtype=dtype,
                         backend=backend, value_weight=value_weight)


@pytest.mark.parametrize("value_weight", [1.0, 0.0])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_cnn_with_pooling(batch, backend, dtype, value_weight):
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                          nn.Conv2d(5, 7, 3), nn.ELU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(7 * 2 * 2, 6))
    x = torch.randn(batch, 3, 13, 13)
    check_against_oracle(model, x, torch.randint(0, 6, (batch,)), dtype=dtype,
                         backend=backend, value_weight=value_weight)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("cpu", torch.float32)])
@pytest.mark.parametrize("head", ["ce", "logprob_sum"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch", [3, 64])
def test_paper_cnn_small_widths(batch, train, head, backend, dtype):
    model = paper_cnn(c1=4, c2=6, fc=19, side=12)
    randomize_bn(model)
    model.train(train)
    mask = (torch.rand(batch, 1, 12, 12) > 0.5).double()
    check_against_oracle(model, torch.rand(batch, 1, 12, 12), torch.randint(0, 10, (batch,)),
                         head=head, mask=mask, seed=3, backend=backend, dtype=dtype)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_paper_cnn_full_size(backend, dtype):
    model = paper_cnn()
    randomize_bn(model)
    model.train()
    lam = 10 ** 4.75 / (2 * 4)
    check_against_oracle(model, torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)),
                         lam=lam, dtype=dtype, seed=11, backend=backend)
