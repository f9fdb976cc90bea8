"""Every bad input gets an error that names the problem."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradreg_kernels import NonFiniteLossError, gradreg_loss


@pytest.fixture
def model():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


X = torch.randn(5, 4)
Y = torch.tensor([0, 1, 2, 1, 0])


def test_batch_mismatch(model):
    with pytest.raises(ValueError, match=r"y must have shape \(B,\) = \(5,\)"):
        gradreg_loss(model, X, Y[:4], 1.0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("bad", [-1, 3, 7])
def test_labels_out_of_range(model, bad, backend):
    """The same error whether Python checks the labels or a backend's softmax head does
    (the C++ head of the "cpu" backend, which "auto" picks for float32 on the CPU, checks
    them even under check_finite=False)."""
    y = Y.clone()
    y[2] = bad
    for check_finite in (True, False) if backend == "auto" else (True,):
        with pytest.raises(ValueError, match=rf"\[0, 3\).*y\[2\] = {bad}"):
            gradreg_loss(model, X, y, 1.0, backend=backend, check_finite=check_finite)


def test_labels_must_be_integers(model):
    with pytest.raises(TypeError, match="integer tensor"):
        gradreg_loss(model, X, Y.float(), 1.0)


def test_labels_required_for_ce(model):
    with pytest.raises(ValueError, match="needs labels"):
        gradreg_loss(model, X, None, 1.0)


def test_non_float_x(model):
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        gradreg_loss(model, X.long(), Y, 1.0)


def test_dtype_mismatch(model):
    with pytest.raises(TypeError, match="float32 but x is torch.float64"):
        gradreg_loss(model, X.double(), Y, 1.0)


def test_mask_not_broadcastable(model):
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not broadcast.*\(5, 4\)"):
        gradreg_loss(model, X, Y, 1.0, mask=torch.ones(3))


def test_mask_that_would_grow_x(model):
    with pytest.raises(ValueError, match="does not broadcast"):
        gradreg_loss(model, X, Y, 1.0, mask=torch.ones(2, 5, 4))


@pytest.mark.parametrize("lam", [-1.0, math.inf, math.nan])
def test_bad_lam(model, lam):
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        gradreg_loss(model, X, Y, lam)


def test_lam_not_a_number(model):
    with pytest.raises(TypeError, match="lam must be a real number"):
        gradreg_loss(model, X, Y, "big")


def test_devices_differ(model):
    model.to("meta")
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        gradreg_loss(model, X, Y, 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_x(model, bad):
    x = X.clone()
    x[1, 2] = bad
    with pytest.raises(ValueError, match="x holds 1 non-finite"):
        gradreg_loss(model, x, Y, 1.0)


def test_inf_and_minus_inf_together_are_caught(model):
    x = X.clone()
    x[0, 0], x[2, 1] = math.inf, -math.inf
    with pytest.raises(ValueError, match="x holds 2 non-finite"):
        gradreg_loss(model, x, Y, 1.0)


def test_large_finite_x_whose_sum_overflows_is_accepted():
    """The finite check sums first; an overflowing sum of finite values must not be an error."""
    from gradreg_kernels.checks import check_finite_input

    x = torch.full((4, 8), 3e38)
    assert not torch.isfinite(x.sum())
    check_finite_input(x, None)
    with pytest.raises(ValueError, match="mask holds non-finite"):
        check_finite_input(x, torch.tensor([1.0, math.nan]).repeat(4, 4))


def test_non_finite_loss_is_reported_before_any_gradient(model):
    with torch.no_grad():
        model[2].weight.fill_(1e38)  # finite weights whose logits overflow
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        gradreg_loss(model, X, Y, 1.0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_non_finite_parameter_is_named(model, bad):
    with torch.no_grad():
        model[2].bias[1] = bad
    with pytest.raises(ValueError, match=r"parameter '2.bias' holds 1 non-finite values"):
        gradreg_loss(model, X, Y, 1.0)
    assert all(p.grad is None for p in model.parameters())
    gradreg_loss(model, X, Y, 1.0, check_finite=False)  # unchecked: runs


def test_unknown_head_and_backend(model):
    with pytest.raises(ValueError, match="head must be one of"):
        gradreg_loss(model, X, Y, 1.0, head="huber")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        gradreg_loss(model, X, Y, 1.0, backend="nope")


def test_ce_head_needs_matrix_logits():
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"a softmax head needs \(B, K\) logits from the "
                       r"model, got shape \(5,\)"):
        gradreg_loss(model, X, Y, 1.0)


def test_x_without_batch_dim(model):
    with pytest.raises(ValueError, match=r"batch of shape \(B, \.\.\.\)"):
        gradreg_loss(model, torch.randn(4), Y, 1.0)


def test_bn_train_single_value_per_channel():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        gradreg_loss(model, torch.randn(1, 4), torch.tensor([0]), 1.0)


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 2), nn.InstanceNorm2d(2, affine=True)])
def test_norms_over_single_values_are_refused_as_torch_refuses(norm):
    model = nn.Sequential(nn.Conv2d(1, 2, 1), norm, nn.Flatten(), nn.Linear(2, 3))
    x = torch.randn(1, 1, 1, 1)
    with pytest.raises(ValueError, match="expected more than 1 (value per channel|spatial)"):
        gradreg_loss(model, x, torch.tensor([0]), 1.0)
    with pytest.raises(ValueError, match="[Ee]xpected more than 1"):
        model(x)  # torch's own forward refuses the same input
