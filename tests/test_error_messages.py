"""The public API with wrong types, shapes and values: each error is the type PyTorch would
raise and its message names the argument, what was expected and what was given (and, where
there is one, what to do)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradreg_kernels import (
    GradRegLoss,
    UnsupportedModelError,
    build_plan,
    get_backend,
    gradreg_loss,
)

M = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
X = torch.randn(5, 4)
Y = torch.tensor([0, 1, 2, 1, 0])
HEADS = r"\('ce', 'logprob_sum', 'output', 'mse', 'bce'\) or a callable head\(z, y\)"

CASES = [
    ("model", lambda: gradreg_loss("m", X, Y), TypeError,
     r"model must be a torch.nn.Module, got str"),
    ("x type", lambda: gradreg_loss(M, [[1.0]], Y), TypeError,
     r"x must be a torch.Tensor, got list"),
    ("x dtype", lambda: gradreg_loss(M, X.long(), Y), TypeError,
     r"x must be a floating-point tensor, got dtype torch.int64"),
    ("x batch", lambda: gradreg_loss(M, X[0], Y), ValueError,
     r"x must be a batch of shape \(B, ...\) with B >= 1, got \(4,\)"),
    ("x empty", lambda: gradreg_loss(M, X[:0], Y[:0]), ValueError,
     r"x must be a batch .* got \(0, 4\)"),
    ("x vs model dtype", lambda: gradreg_loss(M, X.double(), Y), TypeError,
     r"model parameter '0.weight' is torch.float32 but x is torch.float64; cast one"),
    ("x width", lambda: gradreg_loss(M, torch.randn(5, 7), Y), ValueError,
     r"Linear expects inputs of width 4 .* got shape \(5, 7\)"),
    ("x non-finite", lambda: gradreg_loss(M, X * math.nan, Y), ValueError,
     r"x holds 20 non-finite values .*check_finite=False"),
    ("y batch", lambda: gradreg_loss(M, X, Y[:3]), ValueError,
     r"y must have shape \(B,\) = \(5,\) to match x's batch, got \(3,\)"),
    ("y type", lambda: gradreg_loss(M, X, [0, 1, 2, 1, 0]), TypeError,
     r"y must be an integer tensor of class labels, got list"),
    ("y float labels", lambda: gradreg_loss(M, X, Y.float()), TypeError,
     r"head='ce' needs y as an integer tensor of class labels \(B,\) or floating-point "
     r"probability targets \(B, K\), got torch.float32 of shape \(5,\)"),
    ("y missing", lambda: gradreg_loss(M, X, None), ValueError, r"head='ce' needs labels y"),
    ("y range", lambda: gradreg_loss(M, X, Y + 5), ValueError,
     r"y must lie in \[0, 3\) for the model's 3 outputs; y\[0\] = 5"),
    ("lam value", lambda: gradreg_loss(M, X, Y, -1.0), ValueError,
     r"lam must be finite and >= 0, got -1.0"),
    ("lam type", lambda: gradreg_loss(M, X, Y, "1"), TypeError,
     r"lam must be a real number, got '1'"),
    ("both weights 0", lambda: gradreg_loss(M, X, Y, 0.0, value_weight=0.0), ValueError,
     r"lam and value_weight are both 0"),
    ("value_weight", lambda: gradreg_loss(M, X, Y, value_weight=math.nan), ValueError,
     r"value_weight must be finite, got nan"),
    ("head name", lambda: gradreg_loss(M, X, Y, head="huber"), ValueError,
     rf"head must be one of {HEADS} -> \(B,\), got 'huber'"),
    ("head type", lambda: gradreg_loss(M, X, Y, head=3), TypeError,
     rf"head must be one of {HEADS} -> \(B,\), got int"),
    ("data name", lambda: gradreg_loss(M, X, Y, data="nope"), ValueError,
     rf"data must be one of {HEADS} -> \(B,\), got 'nope'"),
    ("label_smoothing", lambda: gradreg_loss(M, X, Y, label_smoothing=2.0), ValueError,
     r"label_smoothing must lie in \[0, 1\], got 2.0"),
    ("class_weight", lambda: gradreg_loss(M, X, Y, class_weight=torch.ones(2)), ValueError,
     r"class_weight has 2 weights but the model has 3 outputs"),
    ("mask shape", lambda: gradreg_loss(M, X, Y, mask=torch.ones(5, 3)), ValueError,
     r"mask of shape \(5, 3\) does not broadcast to x's shape \(5, 4\)"),
    ("mask type", lambda: gradreg_loss(M, X, Y, mask=[1.0]), TypeError,
     r"mask must be a torch.Tensor or None, got list"),
    ("backend name", lambda: gradreg_loss(M, X, Y, backend="nope"), ValueError,
     r"unknown backend 'nope'; known: \[.*\] or 'auto'"),
    ("backend device", lambda: gradreg_loss(M, X, Y, backend="triton"), ValueError,
     r"backend 'triton' runs on \('cuda',\), not on cpu: move .* or use backend='auto'"),
    ("strict", lambda: gradreg_loss(nn.Sequential(nn.Linear(4, 3), nn.Hardshrink()), X, Y,
                                    strict=True), UnsupportedModelError,
     r"strict=True\) cannot run fused: module '1' \(Hardshrink\): no fused rule"),
    ("GradRegLoss model", lambda: GradRegLoss(3), TypeError,
     r"model must be a torch.nn.Module, got int"),
    ("get_backend", lambda: get_backend("nope", torch.device("cpu")), ValueError,
     r"unknown backend 'nope'"),
    ("build_plan", lambda: build_plan("m"), TypeError,
     r"build_plan needs a torch.nn.Module, got str"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_wrong_argument_gets_a_message_naming_it(call, error, match):
    with pytest.raises(error, match=match):
        call()
