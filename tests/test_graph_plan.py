"""Models with their own forward run fused (plan.py traces them with torch.fx): the float64
oracle on the models users write (tests/graph_models.py), on the C++ ``cpu`` backend in
float32 and the portable ``torch`` backend in float64, train and eval mode, the total loss
and the penalty's own gradient (value_weight=0), the input's gradient; and one test per
reason a forward falls back, each naming the node and the line it came from."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from graph_models import MODEL_CASES, example_batch, tiny
from oracle_check import check_against_oracle, check_matches_autograd, rel_err
from torch import nn

from gradreg_kernels import FallbackWarning, UnsupportedModelError, build_plan, gradreg_loss
from gradreg_kernels.plan import Plan
from reference import oracle_loss

#: (backend, dtype): what users get (C++ kernels, float32) and the portable reference
BACKENDS = [("cpu", torch.float32), ("torch", torch.float64)]


def _head(name: str) -> str:
    return "output" if MODEL_CASES[name][2] == 1 else "ce"


@pytest.mark.parametrize("value_weight", [1.0, 0.0])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_model_runs_fused_and_matches_the_oracle(name, backend, dtype, train, value_weight):
    model = tiny(name, seed=3).train(train)
    x, y = example_batch(name, batch=3, seed=4)
    out = check_against_oracle(model, x, y, lam=0.7, head=_head(name), dtype=dtype,
                               backend=backend, value_weight=value_weight)
    assert out.backend == backend


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("name", ["resnet_small", "unet", "inception", "tanh_skip_mlp"])
def test_input_gradient_where_asked(name, backend, dtype):
    """x.requires_grad: x.grad is the loss's gradient in x (fan-out at the input sums)."""
    model = tiny(name, seed=5).to(dtype).train()
    ref_model = copy.deepcopy(model).double()
    x, y = example_batch(name, batch=3, seed=6)
    xf = x.detach().to(dtype).requires_grad_(True)
    torch.manual_seed(0)
    gradreg_loss(model, xf, y, 0.6, head=_head(name), backend=backend).loss.backward()
    x64 = x.detach().double().requires_grad_(True)
    torch.manual_seed(0)
    loss, *_ = oracle_loss(ref_model, x64, y, 0.6, _head(name))
    loss.backward()
    assert rel_err(xf.grad, x64.grad) < (1e-4 if dtype == torch.float32 else 1e-10)


def test_inplace_relu_after_a_value_read_later_is_what_eager_computes():
    """ReLU(inplace=True) writes over h, so the later ``h + y`` reads relu(h) twice, as in
    eager; readers after an in-place op read its result."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.relu, self.out = nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)

        def forward(self, x):
            h = self.lin(x)
            y = self.relu(h)
            return self.out(h + y)

    torch.manual_seed(0)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    for backend, dtype in BACKENDS:
        check_against_oracle(Net(), x, y, dtype=dtype, backend=backend)


def test_augmented_assignment_writes_over_its_target():
    """``out += identity`` is recorded as an in-place add (not ``out + identity``): a name
    bound to the old value reads the new one afterwards, as in eager."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            out = self.a(x)
            alias = out
            out += x
            return self.b(torch.tanh(alias))

    torch.manual_seed(1)
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    for backend, dtype in BACKENDS:
        check_against_oracle(Net(), x, y, dtype=dtype, backend=backend)


def test_a_plain_sequential_is_a_chain_of_the_graph():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    plan = build_plan(model)
    assert isinstance(plan, Plan)
    assert [s.path for s in plan.steps] == ["_0", "_1", "_2", "_3"]
    assert all(s.ins == (i,) and s.out == i + 1 for i, s in enumerate(plan.steps))
    # each value is released by its one reader, the logits are kept for the head
    assert [s.free_fwd for s in plan.steps] == [(0,), (1,), (2,), (3,)]


def test_dead_branches_are_not_planned():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            _ = self.unused(x)
            return self.used(x)

    plan = build_plan(Net())
    assert [s.path for s in plan.steps] == ["used"]


# --- every fallback names the node and the line of the forward ----------------------------

class _Lin(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(n, 3)


class DataDependent(_Lin):
    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


class ReadsItem(_Lin):
    def forward(self, x):
        return self.lin(x) * x.sum().item()


class NoRuleFunction(_Lin):
    def forward(self, x):
        return self.lin(torch.sin(x))


class DividesByATensor(_Lin):
    def forward(self, x):
        return self.lin(x / (2 * x + 1))


class IndexesATensor(_Lin):
    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x):
        return self.lin(x[:, :2])


class ReturnsTuple(_Lin):
    def forward(self, x):
        return self.lin(x), x


class ExtraInput(_Lin):
    def forward(self, x, scale):
        return self.lin(x) * scale


class WritesIntoAView(_Lin):
    def forward(self, x):
        h = self.lin(x)
        v = h.view(h.shape[0], 3)
        h.mul_(2)
        return v + h


class AddsAParameter(_Lin):
    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.lin(x) + self.shift


class NoRuleModule(_Lin):
    def __init__(self) -> None:
        super().__init__()
        self.soft = nn.Softmin(dim=1)

    def forward(self, x):
        return self.soft(self.lin(x))


FALLBACKS = [
    (DataDependent, r"forward '<model>' \(DataDependent\): its forward cannot be traced "
                    r"\(TraceError.*test_graph_plan\.py:\d+: if x\.sum\(\) > 0:"),
    (ReadsItem, r"node 'item' \(Tensor\.item\): no fused rule for Tensor\.item "
                r"at .*test_graph_plan\.py:\d+: return self\.lin\(x\) \* x\.sum\(\)\.item\(\)"),
    (NoRuleFunction, r"node 'sin' \(torch\.sin\): no fused rule for torch\.sin "
                     r"at .*test_graph_plan\.py:\d+: return self\.lin\(torch\.sin\(x\)\)"),
    (DividesByATensor, r"node 'truediv' \(operator\.truediv\): divides by a tensor computed "
                       r"from the input .*:\d+: return self\.lin\(x / \(2 \* x \+ 1\)\)"),
    (IndexesATensor, r"node 'getitem' \(operator\.getitem\): indexes a tensor .*"
                     r"return self\.lin\(x\[:, :2\]\)"),
    (ReturnsTuple, r"node 'output' \(tuple\): the forward must return one tensor"),
    (ExtraInput, r"node 'scale' \(input\): the forward takes inputs besides x"),
    (WritesIntoAView, r"node 'mul_' \(in-place\): writes in place into a tensor that is also "
                      r"read through a view"),
    (AddsAParameter, r"node 'add' \(operator\.add\): adds a tensor that is not computed from "
                     r"the input .*return self\.lin\(x\) \+ self\.shift"),
    (NoRuleModule, r"module 'soft' \(Softmin\): no fused rule for this module type .*"
                   r"return self\.soft\(self\.lin\(x\)\)"),
]


@pytest.mark.parametrize("cls,message", FALLBACKS, ids=[c.__name__ for c, _ in FALLBACKS])
def test_each_fallback_reason_names_the_node_and_line(cls, message):
    torch.manual_seed(0)
    model = cls().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    with pytest.raises(UnsupportedModelError, match=message):
        gradreg_loss(model, x, y, 0.5, strict=True)
    if cls in (ReturnsTuple, ExtraInput):
        return  # eager cannot run these with gradreg_loss's one input and one output either
    with pytest.warns(FallbackWarning, match=message) as record:
        out = gradreg_loss(model, x, y, 0.5)
    assert len([w for w in record if issubclass(w.category, FallbackWarning)]) == 1
    assert out.backend == "autograd"
    check_matches_autograd(model, x, y, 0.5, out)


def test_hooks_patched_forwards_and_overridden_activations_still_fall_back():
    class ScaledTanh(nn.Tanh):
        def forward(self, x):
            return 2 * torch.tanh(x)

    class Net(nn.Module):
        def __init__(self, act: nn.Module) -> None:
            super().__init__()
            self.lin, self.act, self.out = nn.Linear(4, 5), act, nn.Linear(5, 3)

        def forward(self, x):
            return self.out(self.act(self.lin(x)))

    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    hooked = Net(nn.ReLU())
    hooked.lin.register_forward_hook(lambda *a: None)
    patched = Net(nn.ReLU())
    patched.act.forward = lambda t: t * 3
    for model, why in [(hooked, r"module 'lin' \(Linear\): has hooks"),
                       (patched, r"module 'act' \(ReLU\): its forward is replaced"),
                       (Net(ScaledTanh()), r"module 'act' \(ScaledTanh\): a subclass of Tanh "
                                           r"with its own forward")]:
        with pytest.raises(UnsupportedModelError, match=why):
            gradreg_loss(model, x, y, 1.0, strict=True)


def test_functional_forms_of_every_activation_run_fused():
    """F.hardsigmoid runs fused too, but torch's has no double backward for the oracle; CELU
    takes α = 0.5 because torch's own CELU rounds 1/α to float32 (7e-9 off in float64)."""
    fns = [F.relu, torch.relu, F.gelu, lambda t: F.gelu(t, approximate="tanh"), F.silu,
           lambda t: F.leaky_relu(t, 0.2), lambda t: F.softplus(t, beta=2.0), F.elu, torch.tanh,
           torch.sigmoid, F.mish, F.relu6, F.hardtanh, F.hardswish, F.selu,
           lambda t: F.celu(t, 0.5), F.logsigmoid, F.softsign, F.tanhshrink,
           lambda t: t.relu(), lambda t: t.sigmoid(), lambda t: t.tanh()]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.fn(self.a(x)))

    torch.manual_seed(2)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for fn in fns:
        net = Net()
        net.fn = fn
        for backend, dtype in BACKENDS:
            check_against_oracle(net, x, y, dtype=dtype, backend=backend, value_weight=0.0)


def test_the_plan_is_traced_once_per_model(monkeypatch):
    from gradreg_kernels import plan as plan_mod

    calls = []
    real = plan_mod.build_plan
    monkeypatch.setattr(plan_mod, "build_plan", lambda m: calls.append(1) or real(m))
    model = tiny("resnet_small")
    x, y = example_batch("resnet_small", batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            gradreg_loss(model, x, y, 0.5).loss.backward()
        model.eval()
        gradreg_loss(model, x, y, 0.5).loss.backward()
    assert len(calls) == 2  # once in train mode, once in eval mode


def test_fallback_messages_are_one_line():
    with pytest.raises(UnsupportedModelError) as info:
        gradreg_loss(DataDependent(), torch.randn(2, 4), torch.tensor([0, 1]), 1.0, strict=True)
    assert "\n" not in str(info.value) and re.search(r":\d+: ", str(info.value))


def test_constant_shifts_and_scalings_inside_the_network():
    """y = c a + k before a nonlinearity (the shift matters there, not at the logits)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = self.a(x)
            h = torch.tanh(1 - h) + torch.sigmoid(h + 2) - torch.tanh(h / 4 - 0.5)
            return self.b(-h * 3 + torch.rsub(h, 1))  # torch.rsub(h, 1) = 1 - h

    torch.manual_seed(3)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    for backend, dtype in BACKENDS:
        for w in (1.0, 0.0):
            check_against_oracle(Net(), x, y, dtype=dtype, backend=backend, value_weight=w)


def test_a_kept_graph_plan_does_not_keep_the_model_alive():
    """The plan holds the leaf modules and the parameters F.linear reads, never the model
    itself: the model goes once the user drops it."""
    import gc
    import weakref

    from gradreg_kernels import plan as plan_mod

    refs = []
    for name in ("resnet_small", "functional_mlp", "unet"):
        model = tiny(name)
        x, y = example_batch(name, batch=2)
        gradreg_loss(model, x, y, 0.5).loss.backward()
        assert model in plan_mod._PLANS  # kept, under a weak key
        refs.append(weakref.ref(model))
        del model
    gc.collect()
    assert all(r() is None for r in refs)


class FunctionalLayers(nn.Module):
    """Pools, padding, dropout, upsampling and convolutions in their functional forms."""

    def __init__(self, train_dropout: bool) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3), nn.Conv1d(4, 3, 2)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(3 * 3, 5)
        self.train_dropout = train_dropout

    def forward(self, x):
        h = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h = F.conv2d(h, self.c1.weight, self.c1.bias, padding=1)
        h = F.pad(F.avg_pool2d(torch.tanh(h), 2), (0, 1, 1, 0), value=0.5)
        h = F.interpolate(F.softplus(self.up(h)), scale_factor=0.5, mode="nearest")
        h = F.max_pool2d(F.pad(h, (1, 0, 0, 1), mode="replicate"), 2, stride=1)
        h = F.dropout(h, 0.3, training=self.train_dropout)
        h = F.adaptive_avg_pool2d(h, (1, 5)).squeeze(2)
        h = F.conv1d(F.elu(h), self.c2.weight, self.c2.bias)
        h = F.max_pool1d(F.avg_pool1d(F.silu(h), 2, stride=1), 1)
        h = F.adaptive_avg_pool1d(h, 3)
        return F.linear(h.reshape(h.size(0), -1), self.fc.weight, self.fc.bias)


@pytest.mark.parametrize("train_dropout", [True, False])
def test_functional_layers_run_fused(train_dropout):
    """F.pad (reflect, constant, replicate), F.conv2d / F.conv1d / F.linear with module
    parameters, the F. pools, F.interpolate, ConvTranspose2d and F.dropout with its
    training flag (the mask drawn as torch draws it: the oracle sees the same one)."""
    torch.manual_seed(4)
    x, y = torch.randn(3, 2, 9, 7), torch.randint(0, 5, (3,))
    for backend, dtype in BACKENDS:
        for w in (1.0, 0.0):
            check_against_oracle(FunctionalLayers(train_dropout), x, y, dtype=dtype,
                                 backend=backend, value_weight=w, seed=5)
