"""The head's cost, side by side (pytest-benchmark): ``pytest bench/test_heads_bench.py``.

Group ``mlp_heads_b256``: the fused step with the named "mse", a callable MSE and the named
"ce", and eager double backprop with the same MSE (heads_bench.py; for interleaved medians
and the callable head's share of the step run ``python bench/heads_bench.py``). The first
test checks that the callable and the named head give the same gradients."""

from __future__ import annotations

import cpu_workloads as cw
import heads_bench as hb
import pytest
import torch

cw.set_threads()
METHODS = ("fused_named_mse", "fused_callable_mse", "fused_named_ce",
           "eager_double_backprop_mse")


def test_callable_and_named_mse_agree():
    model, x, labels, targets = hb.make()
    fns = hb.steps(model, x, labels, targets)
    grads = {}
    for name in ("fused_named_mse", "fused_callable_mse", "eager_double_backprop_mse"):
        fns[name]()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = grads["eager_double_backprop_mse"]
    for name in ("fused_named_mse", "fused_callable_mse"):
        assert (grads[name] - ref).norm() <= 1e-4 * ref.norm(), name


@pytest.mark.parametrize("method", METHODS)
def test_head_step(benchmark, method):
    step = hb.steps(*hb.make())[method]
    benchmark.group = "mlp_heads_b256"
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=3)
