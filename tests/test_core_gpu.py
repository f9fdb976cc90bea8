"""The portable fused path on a CUDA device against the float64 oracle (tf32 off)."""

from __future__ import annotations

import pytest
import torch
from oracle_check import check_against_oracle, randomize_bn
from test_models_vs_oracle import paper_cnn
from torch import nn

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32(no_tf32):
    yield


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", [True, False])
def test_paper_cnn_on_cuda(dtype, train):
    model = paper_cnn(c1=8, c2=16, fc=33).cuda()
    randomize_bn(model)
    model.train(train)
    x = torch.rand(17, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (17,), device="cuda")
    mask = (torch.rand(1, 1, 28, 28, device="cuda") > 0.3).double()
    check_against_oracle(model, x, y, mask=mask, dtype=dtype, lam=5.0, seed=4)


@pytest.mark.parametrize("head", ["ce", "logprob_sum", "output"])
def test_smooth_mlp_heads_on_cuda(head):
    k = 1 if head == "output" else 7
    model = nn.Sequential(nn.Flatten(), nn.Linear(30, 21), nn.GELU(), nn.Linear(21, 13),
                          nn.Softplus(), nn.Linear(13, k)).cuda()
    x = torch.randn(9, 3, 10, device="cuda")
    y = None if head == "output" else torch.randint(0, k, (9,), device="cuda")
    check_against_oracle(model, x, y, head=head, dtype=torch.float32)
