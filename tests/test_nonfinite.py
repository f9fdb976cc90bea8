"""Non-finite values behave as in torch: every activation's forward maps NaN, ±inf, ±0,
denormals and ±1e30 as torch's own does, on the C++ ``cpu`` backend (what users get) and
the portable one; a NaN in the input or born inside the network gives the loss torch
gives, and ``NonFiniteLossError`` exactly where the plain-autograd loss is non-finite."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradreg_kernels import NonFiniteLossError, get_backend, gradreg_loss
from gradreg_kernels.activation_math import autograd_derivatives, spec_by_name
from reference import oracle_loss

SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30, 3.5, -2.25,
            20.5, -20.5, 88.0, -88.0, 1e-3, -1e-3]

#: every activation kind, with non-default hyper-parameters where it has them
KINDS = [("relu",), ("leaky_relu", 0.1), ("softplus", 1.0, 20.0), ("softplus", 2.0, 5.0),
         ("tanh",), ("sigmoid",), ("gelu",), ("gelu_tanh",), ("elu", 1.0), ("elu", 0.5),
         ("silu",), ("hardtanh", -1.0, 1.0), ("hardtanh", 0.0, 6.0), ("hardsigmoid",),
         ("hardswish",), ("mish",), ("selu",), ("celu", 0.5), ("logsigmoid",), ("softsign",),
         ("tanhshrink",)]


def _specials(reps: int = 9) -> torch.Tensor:
    """(reps, len(SPECIALS)) float32, each row shuffled (so every value meets every lane of
    a vectorized sweep), enough elements for the kernels' parallel split."""
    g = torch.Generator().manual_seed(0)
    base = torch.tensor(SPECIALS, dtype=torch.float32)
    return torch.stack([base[torch.randperm(len(SPECIALS), generator=g)] for _ in range(reps)])


def _same_values(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), (y, ref)
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref)), (y, ref)
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref)), (y, ref)
    fin = torch.isfinite(ref)
    torch.testing.assert_close(y[fin], ref[fin], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(map(str, k)))
def test_activation_forward_maps_special_values_as_torch(kind, backend):
    spec = spec_by_name(*kind)
    kernels = get_backend(backend, torch.device("cpu"))
    z = _specials()
    with torch.no_grad():
        ref = spec.value(z.clone())  # torch's own function
    y, _ = kernels.act_forward(spec, z.clone())
    _same_values(y, ref)


#: finite values where the kernels' clamps and saturations meet torch's formulas
HUGE = [1e30, -1e30, 1e25, -1e25, 1e10, -1e10, 100.0, -100.0, 30.0, -30.0, 20.5, -20.5, 15.0,
        -15.0, 88.0, -88.0, 1e-40, -1e-40, 3.5, -2.25]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(map(str, k)))
def test_activation_derivatives_at_huge_values_are_torch_autograds(kind, backend):
    """σ' ⊙ d (chain) and σ'' ⊙ u ⊙ r (tangent) at large finite z equal torch autograd's
    σ', σ'' there (NaN where torch's formula gives NaN): a clamped exp or tanh that leaves
    1 − t² at 2e-17 instead of 0 makes z (1 − t²) huge at z = 1e10. Where torch's own double
    backward breaks down (Mish's σ'' is NaN above z = 100), σ'' is its limit 0."""
    spec = spec_by_name(*kind)
    kernels = get_backend(backend, torch.device("cpu"))
    z = torch.tensor(HUGE * 3, dtype=torch.float32)
    d1, d2 = autograd_derivatives(spec, z)
    _, saved = kernels.act_forward(spec, z.clone())
    ones = torch.ones_like(z)
    chain = kernels.act_chain(spec, saved, ones.clone())
    _same_values(chain, d1)
    if spec.smooth:
        _, s = kernels.act_tangent(spec, saved, ones.clone(), ones.clone())
        if spec.name == "mish":
            broken = torch.isnan(d2) & (z >= 100)
            assert (s[broken] == 0).all()
            s, d2 = s[~broken], d2[~broken]
        _same_values(s, d2)


def _tanh_net(scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        net[0].weight.mul_(scale)
    return net


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_nan_in_the_input_gives_a_nan_loss_without_the_check(backend):
    net = _tanh_net()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    x[1, 2] = math.nan
    out = gradreg_loss(net, x, y, 0.5, backend=backend, check_finite=False)
    ref, *_ = oracle_loss(net, x, y, 0.5)
    assert math.isnan(float(out.loss)) and math.isnan(float(ref))
    assert torch.equal(torch.isnan(out.logits), torch.isnan(net(x)))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("scale,finite", [(1e38, True), (1.0, True)])
def test_saturated_tanh_after_an_overflow_keeps_the_loss_finite(backend, scale, finite):
    """x Wᵀ overflows to ±inf, tanh saturates at ±1 and σ' = 0 there: the loss (and the
    autograd loss) stay finite; no 0 · inf inside the kernels turns them into NaN."""
    net = _tanh_net(scale)
    x, y = torch.rand(4, 6) + 0.5, torch.tensor([0, 1, 2, 0])
    ref, *_ = oracle_loss(net, x, y, 0.5)
    assert math.isfinite(float(ref)) == finite
    out = gradreg_loss(net, x, y, 0.5, backend=backend)
    assert math.isfinite(float(out.loss))
    assert abs(float(out.loss) - float(ref)) <= 1e-4 * max(1.0, abs(float(ref)))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_an_overflow_inside_the_network_is_a_nonfinite_loss_error(backend):
    """ReLU passes the overflow on: the logits are ±inf / NaN, autograd's loss is NaN, and
    the fused step raises NonFiniteLossError before any gradient is written."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        net[0].weight.fill_(1e38)
    x, y = torch.rand(4, 6) + 0.5, torch.tensor([0, 1, 2, 0])
    ref, *_ = oracle_loss(net, x, y, 0.5)
    assert not math.isfinite(float(ref))
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        gradreg_loss(net, x, y, 0.5, backend=backend)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_zero_weight_removes_its_term_even_where_the_term_is_infinite(backend):
    """A critic whose score overflows to +inf while its input gradient is exactly 0 (tanh
    saturated): with value_weight=0 the loss is λ · penalty = 0, not 0 · inf = NaN, and the
    step runs; with lam=0 and the score's weight, the loss is the score (+inf), reported."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    with torch.no_grad():
        net[0].weight.fill_(1e38)
        net[2].weight.fill_(1e38)
    x = torch.rand(4, 6) + 0.5
    out = gradreg_loss(net, x, None, 0.5, head="output", backend=backend, value_weight=0.0)
    assert math.isinf(float(out.ce)) and float(out.penalty) == 0.0
    assert float(out.loss) == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(NonFiniteLossError):
        gradreg_loss(net, x, None, 0.0, head="output", backend=backend)


def test_both_weights_zero_is_a_named_error():
    net = _tanh_net()
    with pytest.raises(ValueError, match="lam and value_weight are both 0"):
        gradreg_loss(net, torch.randn(2, 6), torch.tensor([0, 1]), 0.0, value_weight=0.0)


@pytest.mark.parametrize("w", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_value_weight_is_a_named_error(w):
    net = _tanh_net()
    with pytest.raises(ValueError, match="value_weight must be finite"):
        gradreg_loss(net, torch.randn(2, 6), torch.tensor([0, 1]), 0.5, value_weight=w)


@pytest.mark.parametrize("bad", [True, "1", torch.ones(2), None])
def test_lam_and_value_weight_must_be_real_numbers(bad):
    net = _tanh_net()
    x, y = torch.randn(2, 6), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="lam must be a real number"):
        gradreg_loss(net, x, y, bad)
    with pytest.raises(TypeError, match="value_weight must be a real number"):
        gradreg_loss(net, x, y, 0.5, value_weight=bad)


def test_one_element_tensors_are_read_as_constant_weights():
    """lam and value_weight as 0-dim tensors: their values, not differentiated through."""
    net = _tanh_net().double()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 1, 2])
    a = gradreg_loss(net, x, y, torch.tensor(0.7), value_weight=torch.tensor(-1.0)).loss
    b = gradreg_loss(net, x, y, float(torch.tensor(0.7)), value_weight=-1.0).loss
    assert float(a) == float(b)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_an_overflowing_penalty_is_a_nonfinite_loss_error(backend):
    """Both parts finite, λ · penalty beyond float32 (λ = 1e300): NonFiniteLossError, as the
    autograd loss of the same λ is inf; no raw error, no gradient."""
    net = _tanh_net()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    ref, *_ = oracle_loss(net, x, y, 1e300)
    assert math.isinf(float(ref))
    with pytest.raises(NonFiniteLossError, match="non-finite loss inf: data term = "):
        gradreg_loss(net, x, y, 1e300, backend=backend)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("label", [-1, 3, 10**6])
def test_a_label_outside_the_classes_never_wraps(backend, label):
    """check_finite=False skips the label check: the portable head (and the Triton one,
    which shares its gradient) gives that row a NaN loss instead of reading another class;
    the C++ head of the cpu backend checks the labels anyway."""
    net = _tanh_net()
    x, y = torch.randn(4, 6), torch.tensor([0, label, 2, 1])
    if backend == "cpu":
        with pytest.raises(ValueError, match=r"y must lie in \[0, 3\) .* y\[1\] = "):
            gradreg_loss(net, x, y, 0.5, backend=backend, check_finite=False)
        return
    out = gradreg_loss(net, x, y, 0.5, backend=backend, check_finite=False)
    assert math.isnan(float(out.ce)) and math.isnan(float(out.loss))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("where", ["input", "weight"])
def test_special_values_through_every_forward_kernel(backend, where):
    """NaN / ±inf / 1e30 in the input or a weight, through convolution, batch norm, an
    activation, max pooling, average pooling, dropout, a Linear and the softmax head: the
    fused step's logits and loss parts have torch's forward's NaNs and infinities."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ELU(),
                        nn.MaxPool2d(2), nn.AvgPool2d(1), nn.Dropout(0.3), nn.Flatten(),
                        nn.Linear(3 * 2 * 2, 4), nn.Softplus(), nn.Linear(4, 3))
    x = torch.randn(5, 2, 4, 4)
    if where == "input":
        x[0, 0, 0, 0], x[1, 1, 2, 3], x[3, 0, 1, 1] = math.nan, math.inf, -1e30
    else:
        with torch.no_grad():
            net[7].weight[1, 2] = math.inf
    y = torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(1)
    out = gradreg_loss(net, x, y, 0.5, backend=backend, check_finite=False)
    torch.manual_seed(1)
    ref = net(x)
    _same_values(out.logits, ref.detach())
    ce = nn.functional.cross_entropy(ref, y)
    assert math.isnan(float(out.ce)) == math.isnan(float(ce))
    assert math.isinf(float(out.ce)) == math.isinf(float(ce))


def test_batch_norm_statistics_of_values_near_float_range():
    """A convolution with weights of 1e38 feeds batch norm values whose squares overflow
    float: the cpu backend's statistics fall back to double accumulation for that channel
    and the loss is the float64 oracle's (it was NaN)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 2, 1, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    with torch.no_grad():
        net[0].weight.mul_(1e38)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 2, 3, 3, generator=g), torch.tensor([0, 2])
    ref = oracle_loss(copy.deepcopy(net).double(), x.double(), y, 0.5)[0]
    out = gradreg_loss(copy.deepcopy(net), x, y, 0.5, backend="cpu")
    assert abs(float(out.loss) - float(ref)) <= 1e-4 * abs(float(ref))
