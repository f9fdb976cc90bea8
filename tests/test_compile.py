"""gradreg_loss inside a torch.compile'd training step: the fused step is excluded from
dynamo (it runs eagerly, as one opaque call, in the forward and in the backward), the rest
of the user's step compiles, no warning comes from the package, and a few optimizer steps
give the uncompiled step's parameters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from gradreg_kernels import GradRegLoss, gradreg_loss


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(),
                          nn.Linear(16, 5))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 12, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 5, (8,), generator=g) for _ in range(4)]
    return model, xs, ys


def _train(model, xs, ys, compiled: bool, module_form: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = GradRegLoss(model, 0.5)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        x = x * 1.0 + 0.0  # user code around the loss that dynamo compiles
        out = loss_fn(x, y) if module_form else gradreg_loss(model, x, y, 0.5)
        out.loss.backward()
        opt.step()
        return out.loss.detach()

    run = torch.compile(step) if compiled else step
    return [float(run(x, y)) for x, y in zip(xs, ys)]


@pytest.mark.parametrize("module_form", [False, True])
def test_a_compiled_step_matches_the_uncompiled_one_quietly(module_form):
    torch._dynamo.reset()
    model, xs, ys = _setup()
    eager_model = copy.deepcopy(model)
    want = _train(eager_model, xs, ys, compiled=False, module_form=module_form)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _train(model, xs, ys, compiled=True, module_form=module_form)
    ours = [w for w in caught if "gradreg" in str(w.message) or "gradreg_kernels" in w.filename
            or "gradreg_cpu" in str(w.message)]
    assert not ours, [str(w.message)[:200] for w in ours]
    assert got == pytest.approx(want, rel=1e-6)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
