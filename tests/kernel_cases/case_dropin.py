"""The drop-in Functions on a GPU backend: a user's own double-backprop step through
``convert``ed models and ``softmax_cross_entropy`` against the float64 oracle.

The step is the one users write by hand (forward, ``autograd.grad(create_graph=True)``,
penalty, backward):  loss = mean CE + λ mean_n ‖∇_{x_n} CE_n‖²  (or a critic's R1 step).
The float64 reference runs the same step through torch.nn on the unconverted model; every
parameter gradient of the float32 step must agree within 1e-4 relative (TF32 off). The
models cover every Function: linear_act, conv2d_act, bias_act (after a convolution with a
non-zeros padding mode), batch_norm (train and eval), max_pool2d, softmax_cross_entropy,
with fused activations whose σ'' is zero (ReLU, LeakyReLU) and non-zero (Tanh, Softplus,
ELU, GELU). Odd sizes, fresh random weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kernel_check import rel_err, step_backends
from torch import nn

from gradreg_kernels.functional import softmax_cross_entropy
from gradreg_kernels.nn import convert
from reference import user_step

LAM = 0.7
BACKENDS = step_backends()


def mlp() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 19), nn.Softplus(2.0),
                         nn.Linear(19, 21), nn.ReLU(), nn.Linear(21, 11), nn.GELU(),
                         nn.Linear(11, 7)), (13,)


def cnn() -> tuple[nn.Module, tuple[int, ...]]:
    net = nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3, padding=1, padding_mode="reflect"), nn.ELU(),
        nn.Conv2d(6, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 1, 9), nn.BatchNorm1d(9), nn.Tanh(), nn.Linear(9, 7))
    net[11].eval()  # one BatchNorm in eval mode: its running statistics are used
    return net, (2, 10, 7)


def _gradreg_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ce) -> torch.Tensor:
    """The hand-written step; fills p.grad, returns the loss."""
    x = x.detach().requires_grad_(True)
    per_example = ce(model(x), y)
    (g,) = torch.autograd.grad(per_example.sum(), x, create_graph=True)
    loss = per_example.mean() + LAM * g.pow(2).flatten(1).sum(1).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [mlp, cnn])
def test_converted_model_gradreg_step_matches_oracle(make, backend, device):
    torch.manual_seed(0)
    model, in_shape = make()
    ref = copy.deepcopy(model).double()
    model = convert(model.to(device), backend=backend)
    b = 5
    x = torch.rand(b, *in_shape, device=device)
    y = torch.randint(0, 7, (b,), device=device)
    loss = _gradreg_step(model, x, y, lambda z, t: softmax_cross_entropy(
        z, t, "none", backend=backend))
    loss_ref = _gradreg_step(ref, x.double().cpu(), y.cpu(),
                             lambda z, t: F.cross_entropy(z, t, reduction="none"))
    assert rel_err(loss, loss_ref) < 1e-5
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[name].grad) < 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_critic_r1_step_matches_oracle(backend, device):
    """A DCGAN-style critic's R1 step: score = D(x), loss = −mean D + (γ/2) mean ‖∇D‖²."""
    torch.manual_seed(1)
    critic = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
                           nn.Conv2d(4, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8),
                           nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4, 1, 0, bias=False),
                           nn.Flatten())
    ref = copy.deepcopy(critic).double()
    model = convert(critic.to(device), backend=backend)

    def r1(m: nn.Module, x: torch.Tensor) -> torch.Tensor:  # as a user writes the step
        return user_step(m, x, head="output", lam=5.0, value_weight=-1.0)

    x = torch.randn(3, 3, 16, 16, device=device)
    assert rel_err(r1(model, x), r1(ref, x.double().cpu())) < 1e-5
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[name].grad) < 1e-4, name
