"""Property test of non-finite values through whole models: random layer stacks with one
poison (a NaN or ±inf in the input or in one weight, or one weight tensor scaled by 1e25 so
that the products overflow), on the C++ ``cpu`` backend and the portable one in float32.

With NaN / ±inf the fused loss is non-finite exactly when the plain-autograd loss is: with
the finite check a non-finite input is refused by name and ``NonFiniteLossError`` is raised
before any gradient is written, without it the loss comes back non-finite as torch's does;
where the loss is finite, each parameter's gradient is finite exactly when autograd's is.
With finite values near and past float32's range, where a sum overflows depends on its
order and float32 autograd can itself be finite and wrong: the fused step is finite
wherever float32 autograd is, and matches the float64 oracle wherever float32 autograd
does. Never a crash, a hang or a silent
NaN. A zero weight (``lam=0`` or ``value_weight=0``) removes its term."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from oracle_check import rel_err
from random_stacks import build, degenerate_norm_input, layer
from torch import nn

from gradreg_kernels import NonFiniteLossError, gradreg_loss
from reference import oracle_loss

EXAMPLES = 400 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 40

poison = st.one_of(
    st.tuples(st.just("x"), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just("weight"), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just("scale"), st.just(1e25)))


def _poisoned(model: nn.Module, x: torch.Tensor, kind: str, value: float,
              g: torch.Generator) -> torch.Tensor:
    """Put the poison in place (in the model's weights or a copy of x); returns x."""
    params = [p for p in model.parameters() if p.numel() > 0]
    if kind == "x":
        x = x.clone()
        x.view(-1)[torch.randint(0, x.numel(), (1,), generator=g)] = value
        return x
    p = params[int(torch.randint(0, len(params), (1,), generator=g))]
    with torch.no_grad():
        if kind == "weight":
            p.view(-1)[torch.randint(0, p.numel(), (1,), generator=g)] = value
        else:
            p.mul_(value)
    return x


def _nan_choice_depends_on_length(model: nn.Module) -> bool:
    """Whether an activation of the model has a derivative at NaN that torch's CPU kernels
    choose differently in their vectorized loop and their scalar tail (ELU, SELU,
    Hardswish): autograd's answer then depends on where in a tensor the NaN falls."""
    def d1(m: nn.Module, n: int) -> float:
        z = torch.full((n,), math.nan, requires_grad=True)
        return float(torch.autograd.grad(m(z).sum(), z)[0][0])

    leaves = [m for m in model.modules() if not list(m.children())
              and not any(True for _ in m.parameters())]
    return any(math.isnan(d1(m, 1)) != math.isnan(d1(m, 64)) for m in leaves
               if not isinstance(m, (nn.Flatten, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                                     nn.AdaptiveAvgPool2d)))


def _autograd(model: nn.Module, x, y, lam, head, value_weight):
    """Plain autograd in float32: the loss and each parameter's gradient (None where the
    loss is non-finite). A term whose weight is 0 is absent (the package's meaning of
    ``lam=0`` and ``value_weight=0``), not multiplied by 0."""
    _, data, pen, _ = oracle_loss(model, x, y, lam, head, None, value_weight)
    terms = ([value_weight * data] if value_weight else []) + ([lam * pen] if lam else [])
    loss = sum(terms)
    if not torch.isfinite(loss):
        return loss, None
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return loss, grads


@settings(max_examples=EXAMPLES)
@given(layers=st.lists(layer, min_size=1, max_size=3), c_in=st.integers(1, 3),
       hw=st.integers(3, 7), batch=st.integers(2, 4), k=st.integers(2, 4),
       head=st.sampled_from(["ce", "logprob_sum", "output"]), poison=poison,
       lam=st.sampled_from([0.0, 0.5, 2.0]), value_weight=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_the_fused_loss_is_nonfinite_exactly_when_autograd_is(
        backend, layers, c_in, hw, batch, k, head, poison, lam, value_weight, seed):
    k = 1 if head == "output" else k
    assume(lam or value_weight)  # both 0 is refused (test_nonfinite.py)
    torch.manual_seed(seed)
    model = build(layers, c_in, hw, k).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, hw, hw, generator=g)
    y = None if head == "output" else torch.randint(0, k, (batch,), generator=g)
    x = _poisoned(model, x, *poison, g)
    want, want_grads = _autograd(copy.deepcopy(model), x, y, lam, head, value_weight)

    if poison[0] == "scale":
        _check_overflow(model, x, y, lam, head, value_weight, backend, want, want_grads)
        return
    if poison[0] in ("x", "weight") and math.isnan(poison[1]) \
            and _nan_choice_depends_on_length(model):
        # autograd's own answer depends on the NaN's position: only "never hides a NaN"
        if not torch.isfinite(want):
            out = gradreg_loss(copy.deepcopy(model), x, y, lam, head=head, backend=backend,
                               value_weight=value_weight, check_finite=False)
            assert not torch.isfinite(out.loss)
        return
    checked = copy.deepcopy(model)
    if poison[0] == "x":  # the finite check refuses a non-finite input by name
        with pytest.raises(ValueError, match="x holds 1 non-finite"):
            gradreg_loss(checked, x, y, lam, head=head, backend=backend)
    elif poison[0] == "weight":  # ... and a non-finite parameter by its name
        with pytest.raises(ValueError, match=r"parameter '.*' holds 1 non-finite"):
            gradreg_loss(checked, x, y, lam, head=head, backend=backend)
        # unchecked, a NaN or ±inf weight meets formulas whose answer there is each
        # kernel's choice (torch's GroupNorm gives NaN for γ = −inf where γ x̂ is ±inf,
        # its fused y = x (γ/σ) + (β − γ μ/σ) giving inf − inf): it runs, no more is promised
        gradreg_loss(copy.deepcopy(model), x, y, lam, head=head, backend=backend,
                     value_weight=value_weight, check_finite=False)
        return
    elif want_grads is None:
        with pytest.raises(NonFiniteLossError):
            gradreg_loss(checked, x, y, lam, head=head, backend=backend,
                         value_weight=value_weight)
        assert all(p.grad is None for p in checked.parameters())
    else:
        out = gradreg_loss(checked, x, y, lam, head=head, backend=backend,
                           value_weight=value_weight)
        assert out.backend == backend
        out.loss.backward()
        for (name, p), w in zip(checked.named_parameters(), want_grads):
            w = torch.zeros_like(p) if w is None else w
            assert torch.equal(torch.isfinite(p.grad), torch.isfinite(w)), name

    unchecked = gradreg_loss(copy.deepcopy(model), x, y, lam, head=head, backend=backend,
                             value_weight=value_weight, check_finite=False)
    assert bool(torch.isfinite(unchecked.loss)) == bool(torch.isfinite(want)), \
        (float(unchecked.loss), float(want))


def _check_overflow(model, x, y, lam, head, value_weight, backend, want, want_grads):
    """Finite values near and past float32's range (overflow, and the cancellation of
    1e25 + O(1)): where a float32 sum overflows depends on its order, and float32 autograd
    itself can be finite and wrong there. So: the fused step is finite (loss and each
    gradient) wherever float32 autograd is, and where float32 autograd agrees with the
    float64 oracle (logits and loss: the float32 problem is well-conditioned) the fused step
    does too."""
    fused = copy.deepcopy(model)
    try:
        out = gradreg_loss(fused, x, y, lam, head=head, backend=backend,
                           value_weight=value_weight)
    except NonFiniteLossError:
        assert want_grads is None, f"refused a loss autograd finds finite: {float(want)}"
        return
    out.loss.backward()
    if want_grads is None:
        return
    ref, ref_grads = _autograd(copy.deepcopy(model).double(), x.double(), y, lam, head,
                               value_weight)
    if ref_grads is None:
        return

    def close(a, b, floor=0.0):
        return rel_err(a.reshape(-1), b.reshape(-1), floor) < 1e-3

    with torch.no_grad():
        z32, z64 = copy.deepcopy(model)(x), copy.deepcopy(model).double()(x.double())
    loss_ok = (close(want.detach(), ref.detach(), 1e-6) and close(z32, z64, 1e-6)
               and not degenerate_norm_input(model, x))
    floor = 1e-6 * max(float(w.abs().max()) for w in ref_grads if w is not None)
    if loss_ok:
        assert close(out.loss.detach(), ref.detach(), 1e-6)
    for (name, p), w32, w64 in zip(fused.named_parameters(), want_grads, ref_grads):
        if w32 is None:
            continue
        assert torch.isfinite(p.grad).all() or not torch.isfinite(w32).all(), name
        if loss_ok and close(w32, w64, floor):
            assert rel_err(p.grad, w64, floor) < 1e-2, name
