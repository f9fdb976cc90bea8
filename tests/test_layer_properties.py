"""Property test of the fused step on random layer stacks: random depth, channels, kernel
sizes, strides, padding, groups, activations, norms, pools and dropout (eval), random batch
sizes and input sizes, heads, masks, λ and value_weight, against the float64 oracle on the
portable backend in float64 and the C++ ``cpu`` backend in float32. An invalid combination
(a norm over single values in training, which torch refuses) must be a clear ValueError,
never a crash, a silent NaN or a result where torch has none. Seeded and bounded
(``max_examples``); ``HYPOTHESIS_PROFILE=long`` runs more."""

from __future__ import annotations

import copy
import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from oracle_check import check_against_oracle, rel_err
from random_stacks import build, degenerate_norm_input, layer
from torch import nn

from gradreg_kernels import gradreg_loss
from reference import oracle_grads

EXAMPLES = 400 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 30


def _torch_refuses(model: nn.Module, x: torch.Tensor) -> str | None:
    """torch's own error for this input (a norm over single values in training), if any."""
    try:
        with torch.no_grad():
            copy.deepcopy(model)(x)
    except ValueError as e:
        return str(e)
    return None


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(layer, min_size=1, max_size=3), c_in=st.integers(1, 3),
       hw=st.integers(3, 9), batch=st.integers(1, 4), k=st.integers(1, 4),
       head=st.sampled_from(["ce", "logprob_sum", "output"]), use_mask=st.booleans(),
       lam=st.floats(0.0, 5.0), value_weight=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 2**16))
def test_random_layer_stacks_match_the_oracle(layers, c_in, hw, batch, k, head, use_mask, lam,
                                              value_weight, seed):
    k = 1 if head == "output" else max(k, 2)
    assume(lam or value_weight)  # both 0 is refused (test_nonfinite.py)
    torch.manual_seed(seed)
    model = build(layers, c_in, hw, k).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, hw, hw, generator=g)
    y = None if head == "output" else torch.randint(0, k, (batch,), generator=g)
    mask = (torch.rand(x.shape, generator=g) > 0.3).double() if use_mask else None
    assume(not degenerate_norm_input(model, x))
    refused = _torch_refuses(model, x)
    if refused is not None:  # the fused step refuses too, with a named error
        assert "more than 1" in refused
        for backend in ("torch", "cpu"):
            try:
                gradreg_loss(copy.deepcopy(model), x, y, lam, head=head, mask=mask,
                             backend=backend)
            except ValueError as e:
                assert "more than 1" in str(e), str(e)
            else:
                raise AssertionError(f"ran where torch refuses: {refused}")
        return
    # tolerances for tiny random stacks (norms over a handful of values amplify rounding);
    # a wrong term is off by far more
    check_against_oracle(copy.deepcopy(model), x, y, lam=lam, head=head, mask=mask,
                         dtype=torch.float64, backend="torch", value_weight=value_weight,
                         tol=1e-8)
    # the C++ kernels in float32: the whole gradient within 1e-2 of the oracle's
    fused = copy.deepcopy(model)
    out = gradreg_loss(fused, x, y, lam, head=head, mask=None if mask is None else mask.float(),
                       backend="cpu", value_weight=value_weight)
    out.loss.backward()
    assert out.backend == "cpu"
    ref, *_ = oracle_grads(copy.deepcopy(model).double(), x.double(), y, lam, head, mask,
                           value_weight)
    got = torch.cat([p.grad.double().flatten() for _, p in fused.named_parameters()])
    want = torch.cat([ref[n].flatten() for n, _ in fused.named_parameters()])
    assert rel_err(got, want, 1e-6) < 1e-2
