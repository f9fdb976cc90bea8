"""The whole fused step on a GPU backend vs the float64 autograd oracle.

float32: every parameter gradient within 1e-4 relative (TF32 off); bf16 under autocast
within 1e-2, or twice the error of eager double backprop under the same autocast.
Fresh random weights and inputs, odd sizes; BatchNorm in train mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from kernel_check import rel_err, step_backends
from torch import nn

from gradreg_kernels import gradreg_loss
from reference import oracle_grads

BACKENDS = step_backends()


def mlp() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 19), nn.Softplus(2.0),
                         nn.Linear(19, 21), nn.ReLU(), nn.Linear(21, 23), nn.GELU(),
                         nn.Linear(23, 7)), (13,)


def cnn() -> tuple[nn.Module, tuple[int, ...]]:
    net = nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ELU(), nn.Flatten(),
        nn.Linear(6 * 3 * 2, 11, bias=False), nn.BatchNorm1d(11), nn.LeakyReLU(0.2),
        nn.Dropout(0.5), nn.Linear(11, 7))
    net[11].eval()  # the dropout draw is tested elsewhere; BatchNorm stays in train mode
    return net, (2, 10, 9)


def norms() -> tuple[nn.Module, tuple[int, ...]]:
    """The per-sample norms, SiLU, PReLU and global pooling."""
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.SiLU(), nn.AdaptiveAvgPool2d((3, 2)),
        nn.InstanceNorm2d(6, affine=True), nn.PReLU(6), nn.Flatten(), nn.Linear(36, 9),
        nn.LayerNorm(9), nn.GELU(), nn.Linear(9, 7)), (2, 10, 9)


def run_case(make, backend, device, *, head="ce", use_mask=False, bf16=False, b=17,
             lam=0.7, seed=0, value_weight=1.0):
    torch.manual_seed(seed)
    model, in_shape = make()
    model = model.to(device)
    x = torch.rand(b, *in_shape, device=device)
    y = torch.randint(0, 7, (b,), device=device)
    mask = (torch.rand(x.shape, device=device) > 0.3).float() if use_mask else None
    ref_model = copy.deepcopy(model).double()
    grads_ref, loss_ref, _, _ = oracle_grads(ref_model, x.double(), y, lam, head,
                                             None if mask is None else mask.double(),
                                             value_weight)
    eager = copy.deepcopy(model)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = gradreg_loss(model, x, y, lam, head=head, mask=mask, backend=backend,
                           value_weight=value_weight)
        out.loss.backward()
        eager_grads = oracle_grads(eager, x, y, lam, head, mask)[0] if bf16 else None
    assert out.backend == backend
    errs = {n: rel_err(p.grad, grads_ref[n]) for n, p in model.named_parameters()}
    if bf16:  # the same loss by eager autograd under the same autocast: the fair yardstick
        eager_errs = {n: rel_err(g, grads_ref[n]) for n, g in eager_grads.items()}
        return rel_err(out.loss, loss_ref), errs, eager_errs
    return rel_err(out.loss, loss_ref), errs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [mlp, cnn, norms])
@pytest.mark.parametrize("head,use_mask", [("ce", False), ("logprob_sum", True)])
@pytest.mark.parametrize("value_weight", [1.0, 0.0])
def test_fused_step_float32_matches_oracle(make, head, use_mask, backend, device, value_weight):
    """value_weight = 0: the penalty's own gradient, which the data term could hide."""
    loss_err, errs = run_case(make, backend, device, head=head, use_mask=use_mask,
                              value_weight=value_weight)
    assert loss_err < (1e-5 if value_weight else 1e-4)
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [mlp, cnn, norms])
def test_fused_step_bf16_autocast_matches_oracle(make, backend, device):
    """Within 1e-2, or within twice eager double backprop's own bf16 error where that is
    larger (BatchNorm's statistics of bf16 activations on these tiny layers)."""
    loss_err, errs, eager_errs = run_case(make, backend, device, bf16=True, b=33)
    assert loss_err < 1e-2
    bound = max(1e-2, 2 * max(eager_errs.values()))
    assert max(errs.values()) < bound, (errs, eager_errs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step_batch_of_one(backend, device):
    loss_err, errs = run_case(mlp, backend, device, b=1)
    assert loss_err < 1e-5 and max(errs.values()) < 1e-4, errs
