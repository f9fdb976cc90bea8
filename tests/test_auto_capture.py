"""AutoCapture (gradreg_kernels.auto_capture): which changes re-capture, the refusal beyond
max_graphs, a warm-up that leaves one step's updates, and the optimizer loop, with an
emulated graph on the CPU (tests/graph_emulation.py); on a GPU, the same with real graphs."""

from __future__ import annotations

import copy

import pytest
import torch
from graph_emulation import EmulatedGraph
from torch import nn

from gradreg_kernels import GradRegLoss, gradreg_loss
from gradreg_kernels.auto_capture import AutoCapture


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(10, 4))


def _batch(b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 2, 2, generator=g), torch.randint(0, 4, (b,), generator=g)


def _emulated(model: nn.Module):
    return lambda device, pool: EmulatedGraph(model)


def _step(model: nn.Module, lam: float = 0.5, **kw) -> AutoCapture:
    return AutoCapture(GradRegLoss(model, lam, backend="torch"), _recorder=_emulated(model),
                       **kw)


def test_the_same_key_replays_and_each_change_captures_again():
    model = _model()
    step = _step(model)
    x, y = _batch()
    step(x, y)
    step(*_batch(seed=2))
    assert step.captures == 1
    step(*_batch(b=5))                       # another batch size
    assert step.captures == 2
    step(x.double().float(), y.int())        # labels of another dtype
    assert step.captures == 3
    step.loss_fn.lam = 2.0                   # a λ schedule
    step(x, y)
    assert step.captures == 4
    model.eval()                             # train / eval: another plan
    step(x, y)
    assert step.captures == 5
    model.train()
    step(x, y)                               # back in train mode: λ = 2's graph again
    assert step.captures == 5
    with torch.no_grad():                    # a parameter moved to new storage
        model[1].weight.data = model[1].weight.data.clone()
    step(x, y)
    assert step.captures == 6
    plain = step.key(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = step.key(x, y)
    assert plain[4] == (False,) and under[4] == (True, torch.bfloat16)
    assert plain[:4] + plain[5:] == under[:4] + under[5:]


def test_a_key_beyond_max_graphs_is_refused_naming_the_change():
    model = _model()
    step = _step(model, max_graphs=2)
    x, y = _batch()
    step(x, y)
    step(*_batch(b=5))
    with pytest.raises(RuntimeError, match=r"holds its 2 graphs .* x, y changed"):
        step(*_batch(b=6))
    step.loss_fn.lam = 3.0
    with pytest.raises(RuntimeError, match=r"loss options changed"):
        step(*_batch(b=5))


def test_each_call_makes_one_steps_updates():
    """The warm-up runs on the user's batch, and its BatchNorm updates and random draws are
    put back: after a call, the running statistics and the batch count are those of one
    uncaptured step, and the dropout mask that step drew (same seed) gives its gradient."""
    captured, plain = _model(), _model()
    x, y = _batch()
    step = _step(captured, warmup=3)
    torch.manual_seed(7)
    step(x, y)
    torch.manual_seed(7)
    plain.zero_grad(set_to_none=True)
    gradreg_loss(plain, x, y, 0.5, backend="torch").loss.backward()
    for (name, a), b in zip(captured.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name
    for (name, p), q in zip(captured.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_the_optimizer_loop_trains_as_uncaptured_steps_do():
    captured, plain = _model(), copy.deepcopy(_model())
    captured.eval(), plain.eval()  # no dropout: the draws of emulated replays differ
    step = _step(captured)
    opt_c = torch.optim.Adam(captured.parameters(), lr=1e-2)
    opt_p = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for seed in range(4):
        x, y = _batch(seed=seed)
        opt_c.zero_grad()
        step(x, y)
        opt_c.step()
        opt_p.zero_grad()
        gradreg_loss(plain, x, y, 0.5, backend="torch").loss.backward()
        opt_p.step()
    assert step.captures == 1
    for (name, a), b in zip(captured.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="wraps a GradRegLoss"):
        AutoCapture(_model())
    with pytest.raises(ValueError, match="max_graphs must be >= 1"):
        AutoCapture(GradRegLoss(_model()), max_graphs=0)
    with pytest.raises(ValueError, match="captures CUDA graphs: x is on cpu"):
        GradRegLoss(_model()).captured()(*_batch())


@pytest.mark.gpu
def test_captured_steps_on_the_gpu_train_as_uncaptured_ones(no_tf32):
    captured, plain = _model().cuda().eval(), _model().cuda().eval()
    step = GradRegLoss(captured, 0.5).captured(warmup=2)
    opt_c = torch.optim.SGD(captured.parameters(), lr=0.05, momentum=0.9)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    for seed in range(4):
        x, y = (t.cuda() for t in _batch(b=8 if seed < 3 else 5, seed=seed))
        opt_c.zero_grad()
        loss = step(x, y).clone()
        opt_c.step()
        opt_p.zero_grad()
        want = gradreg_loss(plain, x, y, 0.5)
        want.loss.backward()
        opt_p.step()
        torch.testing.assert_close(loss, want.loss.detach(), rtol=1e-5, atol=1e-6)
    assert step.captures == 2
    for (name, a), b in zip(captured.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_check_finite_given_to_the_loss_module_overrides_its_own():
    x, y = _batch()
    loss_fn = GradRegLoss(_model(), 0.5, backend="torch")
    with pytest.raises(ValueError, match="non-finite"):
        loss_fn(x * float("nan"), y)
    assert not torch.isfinite(loss_fn(x * float("nan"), y, check_finite=False).loss)
    unchecked = GradRegLoss(_model(), 0.5, backend="torch", check_finite=False)
    with pytest.raises(ValueError, match="non-finite"):
        unchecked(x * float("nan"), y, check_finite=True)
