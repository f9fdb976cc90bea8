"""The cpu backend's native Linear chain under bf16 autocast (backends/cpu_chain.py).

A plain chain ([Flatten] Linear [σ] ... Linear with K ≤ 16 outputs, σ ReLU, LeakyReLU or a
smooth activation the extension implements) runs its four passes in the extension's
LinearChain. Its gradients must be as close to the float64
oracle as eager autocast double backprop's own (the penalty's own gradient too), its loss,
penalty and input gradient those of the Python schedule (the same kernels), and every other
plan must keep the Python schedule.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradreg_kernels import get_backend, gradreg_loss
from gradreg_kernels.backends import cpu_autocast, cpu_chain
from reference import oracle_grads

try:
    get_backend("cpu", torch.device("cpu"))
except (RuntimeError, ValueError) as e:  # no compiler / no oneDNN here
    pytest.skip(f"cpu backend unavailable: {e}", allow_module_level=True)

pytestmark = pytest.mark.skipif(not cpu_autocast.native(torch.bfloat16),
                                reason="no native bf16 products on this CPU")
LAM = 0.3


class _FunctionalMlp(nn.Module):
    """A user's own forward with functional activations (traced into the same chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(29, 41), nn.Linear(41, 33), nn.Linear(33, 5)

    def forward(self, x):
        return self.fc3(F.leaky_relu(self.fc2(F.relu(self.fc1(x))), 0.05))


def _shared_weights() -> nn.Sequential:
    """One Linear run twice (its two gradient terms are summed)."""
    shared = nn.Linear(40, 40)
    return nn.Sequential(nn.Linear(23, 40), nn.ReLU(), shared, nn.ReLU(), shared, nn.SiLU(),
                         nn.Linear(40, 5))


CHAINS = {
    "relu_flatten": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(75, 45), nn.ReLU(),
                                           nn.Linear(45, 37), nn.ReLU(), nn.Linear(37, 7)),
                     (13, 3, 5, 5), 7),
    "leaky_no_bias": (lambda: nn.Sequential(nn.Linear(29, 47, bias=False), nn.LeakyReLU(0.2),
                                            nn.Linear(47, 19), nn.LeakyReLU(0.1),
                                            nn.Linear(19, 3, bias=False)), (11, 29), 3),
    "linear_linear": (lambda: nn.Sequential(nn.Linear(29, 35), nn.Linear(35, 21), nn.ReLU(),
                                            nn.Linear(21, 9)), (17, 29), 9),
    "one_layer": (lambda: nn.Sequential(nn.Linear(29, 6)), (9, 29), 6),
    "silu_softplus": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(75, 45), nn.SiLU(),
                                            nn.Linear(45, 37), nn.Softplus(2.0, 5.0),
                                            nn.Linear(37, 7)), (13, 3, 5, 5), 7),
    "gelu_tanh_elu": (lambda: nn.Sequential(nn.Linear(29, 41), nn.GELU("tanh"),
                                            nn.Linear(41, 33), nn.Tanh(), nn.Linear(33, 35),
                                            nn.ELU(0.7), nn.Linear(35, 4)), (10, 29), 4),
    "mish_sigmoid_hardswish": (lambda: nn.Sequential(nn.Linear(29, 41), nn.Mish(),
                                                     nn.Linear(41, 33), nn.Sigmoid(),
                                                     nn.Linear(33, 19), nn.Hardswish(),
                                                     nn.Linear(19, 6)), (12, 29), 6),
    "functional": (_FunctionalMlp, (10, 29), 5),
    "shared_weights": (_shared_weights, (9, 23), 5),
}


class _Spy:
    """Counts the native chain's calls."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        orig = cpu_chain.LinearChainSchedule.forward

        def forward(s, x):
            self.calls += 1
            return orig(s, x)

        monkeypatch.setattr(cpu_chain.LinearChainSchedule, "forward", forward)


def _rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(((got[n].double() - r) ** 2).sum() for n, r in ref.items())
    return float(num.sqrt() / sum((r ** 2).sum() for r in ref.values()).sqrt())


def _inputs(shape, k: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, k, (shape[0],), generator=g)


def _fused(model, x, y, lam=LAM, value_weight=1.0, **kw):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gradreg_loss(model, x, y, lam, backend="cpu", value_weight=value_weight, **kw)
        out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _errors(model, x, y, lam=LAM, value_weight=1.0, mask=None):
    """(fused bf16 error, eager bf16 error) against the float64 oracle."""
    ref = oracle_grads(copy.deepcopy(model).double(), x.double(), y, lam, mask=mask,
                       value_weight=value_weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = oracle_grads(model, x, y, lam, mask=mask, value_weight=value_weight)[0]
    _, fused = _fused(model, x, y, lam, value_weight, mask=mask)
    return _rel(fused, ref), _rel(eager, ref)


@pytest.mark.parametrize("value_weight", [1.0, 0.0])
@pytest.mark.parametrize("name", list(CHAINS))
def test_native_chain_is_as_close_to_the_oracle_as_eager_autocast(name, value_weight,
                                                                   monkeypatch):
    make, shape, k = CHAINS[name]
    torch.manual_seed(0)
    model = make()
    x, y = _inputs(shape, k)
    spy = _Spy(monkeypatch)
    fused_err, eager_err = _errors(model, x, y, value_weight=value_weight)
    assert spy.calls == 1, f"{name}: the native chain did not run"
    assert fused_err > 1e-4, f"{name}: the step did not run in bf16 ({fused_err:.1e})"
    assert fused_err <= 1.25 * eager_err, (
        f"{name}: fused bf16 error {fused_err:.2e} > eager autocast's {eager_err:.2e}")


def test_native_chain_with_an_annotation_mask_and_without_a_penalty(monkeypatch):
    make, shape, k = CHAINS["relu_flatten"]
    torch.manual_seed(0)
    model = make()
    x, y = _inputs(shape, k)
    mask = (torch.rand(*shape, generator=torch.Generator().manual_seed(5)) > 0.4).float()
    spy = _Spy(monkeypatch)
    fused_err, eager_err = _errors(model, x, y, mask=mask)
    assert fused_err <= 1.25 * eager_err
    fused_err, eager_err = _errors(model, x, y, lam=0.0)
    assert fused_err <= 1.25 * eager_err
    assert spy.calls == 2


@pytest.mark.parametrize("name", ["relu_flatten", "leaky_no_bias", "linear_linear",
                                  "silu_softplus", "gelu_tanh_elu"])
def test_native_chain_matches_the_python_schedule(name, monkeypatch):
    """Passes 1-2 and the input gradient run the very kernels of the Python schedule: the
    loss, penalty, logits and x.grad are equal; the weight gradients (one doubled-batch
    product here, two bf16 terms there) agree to bf16 rounding."""
    make, shape, k = CHAINS[name]
    torch.manual_seed(0)
    model = make()
    x, y = _inputs(shape, k)
    runs = {}
    for native in ("1", "0"):
        monkeypatch.setenv("GRADREG_KERNELS_NATIVE_CHAIN", native)
        xg = x.clone().requires_grad_()
        out, grads = _fused(model, xg, y)
        runs[native] = (out, grads, xg.grad)
    (a, ga, xa), (b, gb, xb) = runs["1"], runs["0"]
    for t in ("loss", "penalty", "ce", "logits"):
        assert torch.equal(getattr(a, t), getattr(b, t)), t
    assert xa is not None and xa.dtype == x.dtype and torch.equal(xa, xb)
    assert _rel(ga, {n: g.double() for n, g in gb.items()}) < 2e-2


def test_keep_saved_backward_twice_gives_the_same_gradients(monkeypatch):
    make, shape, k = CHAINS["relu_flatten"]
    torch.manual_seed(0)
    model = make()
    x, y = _inputs(shape, k)
    spy = _Spy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gradreg_loss(model, x, y, LAM, backend="cpu", keep_saved=True)
        out.loss.backward(retain_graph=True)
        first = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        out.loss.backward()
    assert spy.calls == 1
    for g1, p in zip(first, model.parameters()):
        assert torch.equal(g1, p.grad)
    _, once = _fused(model, x, y)
    for g1, g in zip(first, once.values()):
        assert torch.equal(g1, g)


@pytest.mark.parametrize("act", [nn.SiLU, nn.Softplus])
def test_a_non_finite_smooth_pre_activation_runs_on_the_python_schedule(act, monkeypatch):
    """Where a smooth σ's z holds ±inf / NaN (x unchecked: check_finite=False), the native
    chain declines in pass 1 and the Python schedule, which sets torch's σ', σ'' there, runs
    the call: the same loss and gradients as with the native chain turned off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(29, 41), act(), nn.Linear(41, 33), act(), nn.Linear(33, 5))
    x, y = _inputs((7, 29), 5)
    x[2, 3] = float("inf")
    spy = _Spy(monkeypatch)
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("GRADREG_KERNELS_NATIVE_CHAIN", native)
        out, grads = _fused(model, x, y, check_finite=False)
        runs.append((out.loss, grads))
    assert spy.calls == 1  # tried, declined
    (la, ga), (lb, gb) = runs
    assert torch.equal(la, lb) or (la.isnan() and lb.isnan())
    for n in ga:
        assert torch.allclose(ga[n], gb[n], equal_nan=True), n


OTHER_PLANS = {
    "thin_hidden_layer": lambda: nn.Sequential(nn.Linear(29, 8), nn.ReLU(), nn.Linear(8, 5)),
    "wide_head": lambda: nn.Sequential(nn.Linear(29, 41), nn.ReLU(), nn.Linear(41, 23)),
    "activation_without_sweeps": lambda: nn.Sequential(nn.Linear(29, 41), nn.SELU(),
                                                       nn.Linear(41, 5)),
    "piecewise_activation": lambda: nn.Sequential(nn.Linear(29, 41), nn.ReLU6(),
                                                  nn.Linear(41, 5)),
    "two_activations": lambda: nn.Sequential(nn.Linear(29, 41), nn.ReLU(), nn.SiLU(),
                                             nn.Linear(41, 5)),
    "dropout": lambda: nn.Sequential(nn.Linear(29, 41), nn.ReLU(), nn.Dropout(0.2),
                                     nn.Linear(41, 5)),
    "activation_last": lambda: nn.Sequential(nn.Linear(29, 41), nn.ReLU(), nn.Linear(41, 5),
                                             nn.ReLU()),
    "frozen_layer": lambda: nn.Sequential(nn.Linear(29, 41).requires_grad_(False), nn.ReLU(),
                                          nn.Linear(41, 5)),
}


@pytest.mark.parametrize("name", list(OTHER_PLANS))
def test_other_plans_keep_the_python_schedule(name, monkeypatch):
    torch.manual_seed(0)
    model = OTHER_PLANS[name]()
    x, y = _inputs((7, 29), 5)
    spy = _Spy(monkeypatch)
    _fused(model, x, y)
    assert spy.calls == 0


def test_float32_steps_and_the_switch_keep_the_python_schedule(monkeypatch):
    make, shape, k = CHAINS["relu_flatten"]
    model = make()
    x, y = _inputs(shape, k)
    spy = _Spy(monkeypatch)
    gradreg_loss(model, x, y, LAM, backend="cpu").loss.backward()
    monkeypatch.setenv("GRADREG_KERNELS_NATIVE_CHAIN", "0")
    _fused(model, x, y)
    assert spy.calls == 0


@settings(max_examples=12, deadline=None, derandomize=True)
@given(widths=st.lists(st.integers(17, 70), min_size=0, max_size=3),
       n_in=st.integers(1, 60), k=st.integers(2, 16), batch=st.integers(1, 33),
       slopes=st.lists(st.sampled_from([None, 0.0, 0.01, 0.3, "silu", "softplus", "tanh"]),
                       min_size=3, max_size=3),
       bias=st.booleans(), value_weight=st.sampled_from([1.0, 0.0]))
def test_random_chains_against_the_oracle(widths, n_in, k, batch, slopes, bias, value_weight):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    dims = [n_in, *widths]
    for i in range(len(widths)):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        smooth = {"silu": nn.SiLU, "softplus": nn.Softplus, "tanh": nn.Tanh}
        if slopes[i] in smooth:
            layers.append(smooth[slopes[i]]())
        elif slopes[i] is not None:
            layers.append(nn.ReLU() if slopes[i] == 0.0 else nn.LeakyReLU(slopes[i]))
    layers.append(nn.Linear(dims[-1], k))
    model = nn.Sequential(*layers)
    x, y = _inputs((batch, n_in), k, seed=batch)
    seen = []
    orig = cpu_chain.LinearChainSchedule.forward
    cpu_chain.LinearChainSchedule.forward = lambda s, t: seen.append(1) or orig(s, t)
    try:
        fused_err, eager_err = _errors(model, x, y, value_weight=value_weight)
    finally:
        cpu_chain.LinearChainSchedule.forward = orig
    assert seen, "the native chain did not run"
    assert fused_err <= 1.25 * eager_err + 1e-6, (fused_err, eager_err)


# ---- the kernels that write into a row block of a larger buffer ---------------------------

@pytest.mark.parametrize("n,lo", [(5, 0.0), (37, 0.2), (300, 0.0)])
def test_mask_kernels_write_into_a_row_block(n, lo):
    ext = cpu_chain_ext()
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, 7, generator=g).bfloat16()
    t = torch.randn(n, 7, generator=g)
    buf = torch.full((2 * n, 7), 9.0, dtype=torch.bfloat16)
    bits, finite = ext.mask_forward_out(z, lo, buf[n:])
    y, ref_bits, _ = ext.mask_forward(z, lo, torch.bfloat16)
    assert finite and torch.equal(bits, ref_bits) and torch.equal(buf[n:], y)
    assert torch.all(buf[:n] == 9.0)
    ext.mask_apply_out(bits, t, 1.0, lo, buf[:n])
    assert torch.equal(buf[:n], ext.mask_apply(bits, t, 1.0, lo, torch.bfloat16))
    assert torch.equal(buf[n:], y)
    with pytest.raises(RuntimeError, match="holds"):
        ext.mask_apply_out(bits, t, 1.0, lo, buf[: n - 1])


def cpu_chain_ext():
    from gradreg_kernels.backends import cpu
    return cpu.extension()


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40_000])
def test_widened_and_narrow_into_are_torch_casts(n):
    ext = cpu_chain_ext()
    g = torch.Generator().manual_seed(n)
    low = torch.randn(n, generator=g).bfloat16()
    assert torch.equal(ext.widened(low), low.float())
    src = torch.randn(n, generator=g) * 1e3
    buf = torch.full((2 * n,), 7.0, dtype=torch.bfloat16)
    assert ext.narrow_into(src, buf[n:]) is True
    assert torch.equal(buf[n:], src.bfloat16()) and torch.all(buf[:n] == 7.0)
    src[n // 2] = float("inf")
    assert ext.narrow_into(src, buf[:n]) is False
    with pytest.raises(RuntimeError, match="bf16"):
        ext.widened(src)


@pytest.mark.parametrize("head,k,value_weight", [("mse", 3, 1.0), ("bce", 1, 1.0),
                                                 ("output", 1, -1.0), ("logprob_sum", 4, 1.0)])
def test_native_chain_under_the_other_heads(head, k, value_weight, monkeypatch):
    """The head stays in Python: any head's ∇ℓ and H t meet the chain at the logits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(23, 31), nn.SiLU(), nn.Linear(31, 27), nn.ReLU(),
                          nn.Linear(27, k))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 23, generator=g)
    y = {"mse": torch.randn(9, 3, generator=g), "bce": torch.rand(9, 1, generator=g),
         "output": None, "logprob_sum": torch.randint(0, 4, (9,), generator=g)}[head]
    spy = _Spy(monkeypatch)
    ref = oracle_grads(copy.deepcopy(model).double(), x.double(),
                       None if y is None else (y.double() if y.is_floating_point() else y),
                       LAM, head=head, value_weight=value_weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = oracle_grads(model, x, y, LAM, head=head, value_weight=value_weight)[0]
    _, fused = _fused(model, x, y, value_weight=value_weight, head=head)
    assert spy.calls == 1
    assert _rel(fused, ref) <= 1.25 * _rel(eager, ref)
