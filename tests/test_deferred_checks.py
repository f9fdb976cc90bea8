"""gradreg_loss's finite checks: on backends that defer them (every backend but the C++ cpu
one: checks.DeferredChecks, one read-back per step), each bad input raises the error the
immediate checks raise, and on every backend a step that raises leaves the model as it was
(no gradient, BatchNorm's running statistics and batch count untouched)."""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.backends import get_backend
from gradreg_kernels.checks import NonFiniteLossError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from launch_count import count_step  # noqa: E402

BACKENDS = ["torch", "cpu"]


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 7), nn.BatchNorm1d(7, momentum=None),
                         nn.Tanh(), nn.Linear(7, 3)).train()


def _batch(b: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 2, 5, 5, generator=g), torch.randint(0, 3, (b,), generator=g)


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.buffers()]


def test_only_the_cpu_backend_checks_before_pass_1():
    assert get_backend("torch", torch.device("cpu")).defers_finite_checks
    assert not get_backend("cpu", torch.device("cpu")).defers_finite_checks


def _bad_x(m, x, y):
    x = x.clone()
    x[2, 1, 3, 3] = math.nan
    x[4, 0, 0, 1] = math.inf
    return m, x, y, dict(), ValueError, r"x holds 2 non-finite values"


def _bad_mask(m, x, y):
    mask = torch.ones_like(x)
    mask[0, 0, 0, 0] = math.nan
    return m, x, y, dict(mask=mask), ValueError, "mask holds non-finite values"


def _bad_param(m, x, y):
    with torch.no_grad():
        m[4].weight[1, 5] = -math.inf
    return m, x, y, dict(), ValueError, r"parameter '4.weight' holds 1 non-finite values"


def _bad_label(m, x, y):
    y = y.clone()
    y[3] = 3
    return m, x, y, dict(), ValueError, r"y must lie in \[0, 3\) .* y\[3\] = 3"


def _negative_label(m, x, y):
    y = y.clone()
    y[1] = -1
    return m, x, y, dict(head="logprob_sum", value_weight=0.0), ValueError, r"y\[1\] = -1"


def _overflow(m, x, y):
    return m, x, y, dict(lam=1e300), NonFiniteLossError, "non-finite loss inf: data term = "


class _WithSpare(nn.Module):
    """A max-pool first (a −inf that is no window's maximum never reaches the loss) and a
    trainable layer the forward does not use (its values never reach the loss either)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
        self.spare = nn.Linear(2, 2)

    def forward(self, x):
        return self.net(x)


def _hidden_x(m, x, y):
    x = torch.rand(x.shape[0], 2, 4, 4) + 1.0
    x[1, 0, 0, 0] = -math.inf  # below its window's values: the loss stays finite
    return _WithSpare(), x, y, dict(), ValueError, r"x holds 1 non-finite values"


def _hidden_param(m, x, y):
    m = _WithSpare()
    with torch.no_grad():
        m.spare.bias[0] = math.nan
    return m, torch.rand(x.shape[0], 2, 4, 4), y, dict(), ValueError, \
        r"parameter 'spare.bias' holds 1 non-finite values"


CASES = [_hidden_x, _hidden_param, _bad_x, _bad_mask, _bad_param, _bad_label, _negative_label,
         _overflow]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
def test_a_bad_step_raises_its_named_error_and_changes_nothing(backend, case):
    model, x, y, kw, err, msg = case(_model(), *_batch())
    lam = kw.pop("lam", 1.0)
    before = _state(model)
    with pytest.raises(err, match=msg):
        gradreg_loss(model, x, y, lam, backend=backend, **kw)
    for a, b in zip(before, _state(model)):
        assert torch.equal(a, b), "a step that raised changed a buffer"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_statistics_advance_once_per_step_as_in_torch(backend):
    """Three good steps update the running statistics (momentum and cumulative average)
    exactly as the module's own forward does."""
    fused, plain = _model(), _model()
    for step in range(3):
        x, y = _batch(6 + step)
        gradreg_loss(fused, x, y, 0.5, backend=backend).loss.backward()
        plain(x)
    for (name, a), b in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_deferred_step_reads_back_once():
    """With labels, a mask and BatchNorm, the portable backend's checks read one value
    vector back (the CPU-only finite checks of its kernels run where the device is the
    CPU: the model has ReLU and Tanh on float32 inputs of finite values, and each BN's
    variance check is one more read here only)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(50, 9), nn.ReLU(), nn.Linear(9, 3))
    x, y = _batch()
    mask = torch.rand_like(x)

    def step():
        model.zero_grad(set_to_none=True)
        gradreg_loss(model, x, y, 1.0, mask=mask, backend="torch").loss.backward()

    step()
    count = count_step(step)
    assert count.syncs == 1, count.sync_ops
    assert dict(count.sync_ops) == {"tolist": 1}


def test_the_deferred_and_immediate_steps_agree():
    model = _model()
    x, y = _batch()
    grads = {}
    for backend in BACKENDS:
        m = copy.deepcopy(model)
        gradreg_loss(m, x, y, 0.7, backend=backend).loss.backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in m.parameters()])
    torch.testing.assert_close(grads["torch"], grads["cpu"], rtol=1e-4, atol=1e-5)
