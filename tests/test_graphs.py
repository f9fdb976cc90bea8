"""CUDA-graph capture of whole steps (gradreg_kernels.graphs): argument errors everywhere; the
bookkeeping around a replay (gradients re-attached after ``zero_grad()``, parameters given
new storage refused) with an emulated graph on the CPU; on a GPU, a captured user step
(converted critic's R1, drop-in Functions) and the captured fused step against the same
steps uncaptured, replayed on fresh batches, in an ordinary optimizer loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from graph_emulation import EmulatedGraph

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


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 9), torch.nn.BatchNorm1d(9),
                               torch.nn.Tanh(), torch.nn.Linear(9, 4))


def _batches(n: int, b: int = 7):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(b, 3, 2, 2, generator=g), torch.randint(0, 4, (b,), generator=g))
            for _ in range(n)]


def test_the_ordinary_optimizer_loop_trains_a_graphed_step():
    """opt.zero_grad(); loss = step(x, y); opt.step(): zero_grad sets p.grad = None, and
    the replays write into the captured gradients, which the step re-attaches; the
    parameters move exactly as uncaptured steps move them."""
    graphed, plain = _mlp(), _mlp()
    batches = _batches(4)
    step = GraphedStep(graphed, *batches[0], 0.8, backend="torch", warmup=1,
                       _recorder=EmulatedGraph(graphed))
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.1, momentum=0.9)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    plain(batches[0][0])  # the warm-up's BatchNorm update (the capture made none)
    for x, y in batches[1:]:
        opt_g.zero_grad()
        loss = step(x, y).clone()
        opt_g.step()
        opt_p.zero_grad()
        want = gradreg_loss(plain, x, y, 0.8, backend="torch").loss
        want.backward()
        opt_p.step()
        assert _rel(loss, want.detach()) < 1e-6
    for (name, a), b in zip(graphed.named_parameters(), plain.parameters()):
        assert _rel(a.detach(), b.detach()) < 1e-6, name
    for a, b in zip(graphed.buffers(), plain.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7)


def test_a_captured_user_step_finds_the_parameters_of_the_model_it_names():
    """CapturedStep without ``params``: the parameters of the model its closure names get
    their captured gradients back after zero_grad()."""
    model = _mlp()
    x0, y0 = _batches(1)[0]

    def user(x, y):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    class Emulated(EmulatedGraph):
        def replay(self) -> None:
            attached = [p.grad for p in self.params]
            self.out.copy_(self.fn())
            for p, g, a in zip(self.params, self.grads, attached):
                g.copy_(p.grad)
                p.grad = a

    step = CapturedStep(user, x0, y0, warmup=1, _recorder=Emulated(model))
    assert {id(p) for p, _ in step.grads} == {id(p) for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    step(x0, y0)
    assert all(p.grad is not None for p in model.parameters())


def test_a_parameter_given_new_storage_is_refused():
    model = _mlp()
    x, y = _batches(1)[0]
    step = GraphedStep(model, x, y, 0.5, backend="torch", warmup=1,
                       _recorder=EmulatedGraph(model))
    step(x, y)
    with torch.no_grad():
        model[1].weight.data = model[1].weight.data.clone()
    with pytest.raises(RuntimeError, match=r"parameter of shape \(9, 12\) was given new storage"):
        step(x, y)


def test_replays_refuse_other_shapes_dtypes_and_missing_inputs():
    model = _mlp()
    x, y = _batches(1)[0]
    step = GraphedStep(model, x, y, 0.5, backend="torch", warmup=1,
                       _recorder=EmulatedGraph(model))
    with pytest.raises(ValueError, match=r"captured for x of shape \(7, 3, 2, 2\)"):
        step(x[:3], y[:3])
    with pytest.raises(ValueError, match=r"captured for y of shape \(7,\) torch.int64"):
        step(x, y.int())
    with pytest.raises(ValueError, match="captured with labels y; pass them"):
        step(x)


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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_the_ordinary_optimizer_loop_trains_a_captured_step_on_the_gpu(no_tf32, backend):
    """The loop users write (zero_grad sets p.grad = None) around real CUDA-graph replays:
    the parameters move as uncaptured steps move them."""
    graphed, plain = _mlp().cuda(), _mlp().cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(4)]
    step = GraphedStep(graphed, *batches[0], 0.8, backend=backend, warmup=1)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.1, momentum=0.9)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    plain(batches[0][0])  # the warm-up's BatchNorm update
    for x, y in batches[1:]:
        opt_g.zero_grad()
        step(x, y)
        opt_g.step()
        opt_p.zero_grad()
        gradreg_loss(plain, x, y, 0.8, backend=backend).loss.backward()
        opt_p.step()
    for (name, a), b in zip(graphed.named_parameters(), plain.parameters()):
        assert _rel(a.detach(), b.detach()) < 1e-5, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_a_step_on_the_second_gpu_captures_and_replays_there(no_tf32):
    model = _mlp().to("cuda:1")
    x, y = (t.to("cuda:1") for t in _batches(1)[0])
    with torch.cuda.device(0):
        step = GraphedStep(model, x, y, 0.5, warmup=1)
        loss = step(x, y)
    assert loss.device == torch.device("cuda:1")
    assert all(p.grad.device == torch.device("cuda:1") for p in model.parameters())
