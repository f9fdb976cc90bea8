"""CUDA-graph capture of whole steps (gradreg_kernels.graphs): argument errors everywhere; on a
GPU, a captured user step (converted critic's R1, drop-in Functions) and the captured fused
step against the same steps uncaptured, replayed on fresh batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gradreg_kernels import gradreg_loss
from gradreg_kernels.graphs import CapturedStep, GraphedStep
from gradreg_kernels.nn import cifar_resnet, convert, dcgan_critic
from reference import user_step


def test_capture_needs_cuda_tensors():
    with pytest.raises(ValueError, match="CUDA tensors"):
        CapturedStep(lambda x: x * 2, torch.randn(3))
    with pytest.raises(TypeError, match="example inputs as tensors"):
        CapturedStep(lambda x: x, 3.0)
    with pytest.raises(TypeError, match="example inputs as tensors"):
        CapturedStep(lambda: None)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="CUDA tensors"):
        GraphedStep(model, torch.randn(2, 4), torch.tensor([0, 1]), 1.0)


def _r1_step(model, x):
    """The critic's R1 step as a user writes it (create_graph=True): −mean D + 5 mean ‖∇D‖²."""
    return user_step(model, x, head="output", lam=5.0, value_weight=-1.0)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_captured_r1_step_of_a_converted_critic(no_tf32, backend):
    """Replays on new batches give the uncaptured step's loss and gradients (BatchNorm in
    train mode: running statistics advance on both copies alike)."""
    torch.manual_seed(0)
    base = dcgan_critic(width=8).cuda().train()
    plain = convert(copy.deepcopy(base), backend=backend)
    graphed = convert(copy.deepcopy(base), backend=backend)
    xs = [torch.randn(5, 3, 64, 64, device="cuda") for _ in range(3)]
    step = CapturedStep(lambda x: _r1_step(graphed, x), xs[0], warmup=2)
    for _ in range(2):  # the warm-up ran the step on xs[0] twice (a capture runs nothing)
        _r1_step(plain, xs[0])
    for x in xs[1:]:
        want = _r1_step(plain, x)
        got = step(x)
        assert _rel(got, want) < 1e-4
        assert _rel(_grads(graphed), _grads(plain)) < 1e-4
    for a, b in zip(plain.buffers(), graphed.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_captured_gradient_penalty_step_with_drop_in_cross_entropy(no_tf32):
    from gradreg_kernels.functional import softmax_cross_entropy

    torch.manual_seed(1)
    base = cifar_resnet(1, 8).cuda().train()
    plain, graphed = convert(copy.deepcopy(base)), convert(copy.deepcopy(base))

    def gp_step(model, x, y):
        x = x.detach().requires_grad_(True)
        ce = softmax_cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(ce, x, create_graph=True)
        loss = ce / x.shape[0] + g.pow(2).sum() / x.shape[0]
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    x0, y0 = torch.randn(6, 3, 32, 32, device="cuda"), torch.randint(0, 10, (6,), device="cuda")
    step = CapturedStep(lambda x, y: gp_step(graphed, x, y), x0, y0, warmup=1)
    gp_step(plain, x0, y0)  # as the warm-up did
    x, y = torch.randn_like(x0), torch.randint(0, 10, (6,), device="cuda")
    want = gp_step(plain, x, y)
    assert _rel(step(x, y), want) < 1e-4
    assert _rel(_grads(graphed), _grads(plain)) < 1e-4
    with pytest.raises(ValueError, match="input 0 was captured as"):
        step(torch.randn(7, 3, 32, 32, device="cuda"), y)


@pytest.mark.gpu
def test_graphed_fused_step_matches_the_uncaptured_one(no_tf32):
    torch.manual_seed(2)
    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 33), torch.nn.ReLU(),
                               torch.nn.Linear(33, 10)).cuda()
    plain, graphed = copy.deepcopy(base), copy.deepcopy(base)
    x0, y0 = torch.randn(9, 3, 4, 4, device="cuda"), torch.randint(0, 10, (9,), device="cuda")
    step = GraphedStep(graphed, x0, y0, 2.0, warmup=1)
    x, y = torch.randn_like(x0), torch.randint(0, 10, (9,), device="cuda")
    plain.zero_grad(set_to_none=True)
    out = gradreg_loss(plain, x, y, 2.0)
    out.loss.backward()
    assert _rel(step(x, y), out.loss.detach()) < 1e-5
    assert _rel(_grads(graphed), _grads(plain)) < 1e-5
    assert step.backend_name == out.backend
    assert F.cross_entropy(step.out.logits, y).isfinite()
