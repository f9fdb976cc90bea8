"""backend="auto" by measurement (gradreg_kernels.backend_choice): the fastest backend of a
timed whole step, remembered per key, said once, with the model's state put back; run here
on the CPU's two backends with a clock that the test sets."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from gradreg_kernels import backend_choice, gradreg_loss
from gradreg_kernels.backend_choice import AutoBackendChoice
from gradreg_kernels.backends import measurable_backends


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(8, 3))


def _batch(b: int = 6):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, 3, 4, generator=g), torch.randint(0, 3, (b,), generator=g)


@pytest.fixture
def measured_cpu(monkeypatch):
    """"auto" measured on the CPU, under a clock where ``clock[name]`` is the time of a step
    on backend ``name``; ``calls`` lists the backends gradreg_loss asked for."""
    import gradreg_kernels.backends as backends

    monkeypatch.setattr(backend_choice, "MEASURED_DEVICE_TYPES", ("cpu",))
    backend_choice.forget()
    clock = {"torch": 1.0, "cpu": 2.0}
    calls: list[str] = []
    real_get = backends.get_backend

    def recording_get(name, device):
        calls.append(name)
        return real_get(name, device)

    monkeypatch.setattr("gradreg_kernels.loss.get_backend", recording_get)

    def fake_timer(step, device):
        step()
        return clock[calls[-1]]

    monkeypatch.setattr(backend_choice, "time_step", fake_timer)
    yield clock, calls
    backend_choice.forget()


@pytest.mark.parametrize("fastest", ["torch", "cpu"])
def test_auto_runs_the_backend_measured_fastest_and_says_so(measured_cpu, fastest):
    clock, calls = measured_cpu
    clock[fastest] = 0.5
    model = _model()
    x, y = _batch()
    with pytest.warns(AutoBackendChoice, match=rf"it runs on '{fastest}'"):
        out = gradreg_loss(model, x, y, 0.5)
    assert out.backend == fastest
    with warnings.catch_warnings():  # remembered: no second measurement, no second warning
        warnings.simplefilter("error", AutoBackendChoice)
        n = len(calls)
        assert gradreg_loss(model, x, y, 0.5).backend == fastest
        assert len(calls) == n + 1
    with pytest.warns(AutoBackendChoice):  # another batch shape is another key
        gradreg_loss(model, *_batch(b=9), 0.5)


def test_the_measurement_puts_the_model_back(measured_cpu):
    """After the measured call, buffers, gradients and the generator are those of one
    ordinary step on the chosen backend."""
    model, plain = _model(), _model()
    x, y = _batch()
    for m in (model, plain):
        m[1].weight.grad = torch.full_like(m[1].weight, 3.0)
    torch.manual_seed(11)
    with pytest.warns(AutoBackendChoice):
        gradreg_loss(model, x, y, 0.5).loss.backward()
    after = torch.rand(3)
    torch.manual_seed(11)
    gradreg_loss(plain, x, y, 0.5, backend="torch").loss.backward()
    assert torch.equal(after, torch.rand(3))
    for (name, a), b in zip(model.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_backend_that_fails_is_not_chosen(measured_cpu):
    model = _model()
    x, y = _batch()
    times = {"torch": 1.0}

    def run(name):
        if name == "cpu":
            raise RuntimeError("no such kernel")
        gradreg_loss(copy.deepcopy(model), x, y, 0.5, backend=name).loss.backward()

    with pytest.warns(AutoBackendChoice, match="torch 1000.00 ms"):
        best = backend_choice.choose(model, x, lambda: ["cpu", "torch"], run,
                                     timer=lambda step, dev: (step(), times["torch"])[1])
    assert best == "torch"
    with pytest.raises(RuntimeError, match="no backend ran the step: cpu: RuntimeError"):
        backend_choice.choose(model, x[:5], lambda: ["cpu"], run)


def test_priority_decides_where_not_measured(monkeypatch):
    backend_choice.forget()
    assert not backend_choice.measured(torch.device("cpu"))
    monkeypatch.setattr(backend_choice, "MEASURED_DEVICE_TYPES", ("cpu",))
    assert backend_choice.measured(torch.device("cpu"))
    monkeypatch.setenv("GRADREG_KERNELS_AUTO", "priority")
    assert not backend_choice.measured(torch.device("cpu"))
    monkeypatch.delenv("GRADREG_KERNELS_AUTO")
    model = _model()
    x, _ = _batch()
    with torch.no_grad():
        assert backend_choice.choose(model, x, lambda: ["torch", "cpu"],
                                     lambda name: None) == "auto"
    assert measurable_backends(torch.device("cpu"))[:2] == ["cpu", "torch"]


def test_a_remembered_choice_lists_no_backends(measured_cpu, monkeypatch):
    """The measurable backends are listed only where no choice is remembered for the key."""
    import gradreg_kernels.loss as loss

    listed: list[torch.device] = []

    def listing(device):
        listed.append(device)
        return measurable_backends(device)

    monkeypatch.setattr(loss, "measurable_backends", listing)
    model = _model()
    x, y = _batch()
    with pytest.warns(AutoBackendChoice):
        gradreg_loss(model, x, y, 0.5)
    gradreg_loss(model, x, y, 0.5)
    assert len(listed) == 1
