"""convert(): same state_dict keys, same outputs, and a user's own double-backprop loop
(R1 penalty, gradient penalty) gives the same gradients through the drop-in modules."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

import gradreg_kernels.nn as gnn
from gradreg_kernels import gradreg_loss
from gradreg_kernels.nn import cifar_resnet, convert, dcgan_critic


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 9), nn.BatchNorm1d(9),
                         nn.Softplus(beta=2.0), nn.Linear(9, 7), nn.LeakyReLU(0.1),
                         nn.Linear(7, 5))


def _small_critic() -> nn.Sequential:
    return dcgan_critic(channels=3, width=4)


def _randomize_bn_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_()


MODELS = {  # name → (builder, input shape, labels or None for a scalar score)
    "mlp": (_mlp, (7, 13), 5),
    "critic": (_small_critic, (3, 3, 64, 64), None),
    "resnet": (lambda: cifar_resnet(1, 4), (3, 3, 32, 32), 10),
    # a Linear + SiLU pair (fused into the product) and a SiLU after BN (its own module)
    "silu": (lambda: nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 8),
                                   nn.BatchNorm1d(8), nn.SiLU(), nn.Linear(8, 3)), (5, 6), 3),
    # the other activations, as fused pairs and as modules of their own
    "more-activations": (lambda: nn.Sequential(
        nn.Linear(6, 8), nn.Mish(), nn.Linear(8, 8), nn.Hardswish(), nn.Linear(8, 8),
        nn.BatchNorm1d(8), nn.SELU(), nn.Linear(8, 8), nn.CELU(0.8), nn.Linear(8, 8),
        nn.ReLU6(), nn.Linear(8, 8), nn.Hardtanh(-0.5, 0.7), nn.Linear(8, 3)), (5, 6), 3),
}


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """‖a − b‖ / ‖b‖, with ‖b‖ floored (a gradient that is zero in exact arithmetic, as a
    bias before train-mode BN, is rounding noise on both sides)."""
    return float((a - b).norm() / b.norm().clamp_min(floor))


def _assert_same_grads(new: dict, ref: dict, tol: float = 1e-4) -> None:
    flat = [torch.cat([g.flatten() for g in d.values()]) for d in (new, ref)]
    assert _rel(flat[0], flat[1]) < tol
    total = flat[1].norm()
    for n, g in ref.items():  # floored at 1 % of the whole: 1e-6 of it absolute, ~8 ulps
        assert _rel(new[n], g, floor=1e-2 * float(total)) < tol, n


def _user_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, lam: float):
    """A user's own step: forward, autograd.grad(create_graph=True), penalty, backward."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    if y is None:  # R1 on a critic score
        data = out.sum()
    else:          # gradient penalty on the cross-entropy
        data = nn.functional.cross_entropy(out, y, reduction="sum")
    (g,) = torch.autograd.grad(data, x, create_graph=True)
    loss = data / x.shape[0] + lam * g.pow(2).sum() / x.shape[0]
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, x.grad.clone()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_keys_and_parameters_kept(name):
    model = MODELS[name][0]()
    before = model.state_dict()
    params = list(model.parameters())
    convert(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert any(isinstance(m, gnn.Conv2d | gnn.Linear) for m in model.modules())
    fresh = MODELS[name][0]()
    fresh.load_state_dict(after)  # a plain torch model loads the converted one's weights


def test_pairs_fuse_into_the_product():
    model = convert(_mlp())
    assert isinstance(model[0], gnn.Linear) and model[0].act.name == "tanh"
    assert isinstance(model[1], nn.Identity)
    assert model[2].act is None and isinstance(model[3], gnn.BatchNorm1d)
    assert isinstance(model[4], gnn.Softplus)
    assert model[5].act.name == "leaky_relu" and model[5].act.params == (0.1,)


def test_silu_pairs_and_modules_convert():
    model = convert(MODELS["silu"][0]())
    assert isinstance(model[0], gnn.Linear) and model[0].act.name == "silu"
    assert isinstance(model[1], nn.Identity)
    assert isinstance(model[3], gnn.BatchNorm1d) and isinstance(model[4], gnn.SiLU)


def test_shared_or_hooked_products_are_not_fused():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Tanh())
    hooked = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    hooked[0].register_forward_hook(lambda m, i, o: None)
    convert(model)
    convert(hooked)
    assert shared.act is None and isinstance(model[1], gnn.ReLU)
    assert hooked[0].act is None and isinstance(hooked[1], gnn.ReLU)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_user_double_backprop_loop_unchanged(name, train):
    torch.manual_seed(1)
    build, shape, classes = MODELS[name]
    ref = build()
    _randomize_bn_stats(ref)
    ref.train(train)
    new = convert(copy.deepcopy(ref))
    x = torch.randn(shape)
    y = None if classes is None else torch.randint(0, classes, (shape[0],))
    with torch.no_grad():
        out_ref, out_new = ref(x), new(x)
    assert _rel(out_new, out_ref) < 1e-5
    g_ref, gx_ref = _user_loop(ref, x, y, lam=3.0)
    g_new, gx_new = _user_loop(new, x, y, lam=3.0)
    _assert_same_grads(g_new, g_ref)
    assert _rel(gx_new, gx_ref) < 1e-4
    for (n, b_ref), b_new in zip(ref.named_buffers(), new.buffers(), strict=True):
        torch.testing.assert_close(b_new, b_ref, rtol=1e-5, atol=1e-6, msg=n)


def test_convert_makes_hardsigmoid_twice_differentiable():
    """torch's Hardsigmoid has no double backward, so a user's R1-style loop fails on it; the
    converted model runs the same loop, matching the activation written out in torch ops."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Hardsigmoid(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6) * 3, torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        _user_loop(model, x, y, lam=2.0)

    class WrittenOut(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return (nn.functional.hardtanh(t, -3.0, 3.0) + 3.0) / 6.0

    ref = nn.Sequential(model[0], WrittenOut(), model[2])
    g_ref, gx_ref = _user_loop(copy.deepcopy(ref), x, y, lam=2.0)
    g_new, gx_new = _user_loop(convert(copy.deepcopy(model)), x, y, lam=2.0)
    _assert_same_grads(g_new, g_ref)
    assert _rel(gx_new, gx_ref) < 1e-4


def test_converted_model_runs_fused_in_gradreg_loss():
    torch.manual_seed(2)
    model = convert(cifar_resnet(1, 4).double())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    out = gradreg_loss(model, x, torch.randint(0, 10, (3,)), 0.5, strict=True)
    assert out.backend != "autograd"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unsupported_conv_padding_still_correct():
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.ELU(),
                        nn.Conv2d(3, 2, 2, padding="same"), nn.MaxPool2d(2), nn.Flatten())
    new = convert(copy.deepcopy(ref))
    x = torch.randn(3, 2, 7, 7)
    g_ref, _ = _user_loop(ref, x, None, 2.0)
    g_new, _ = _user_loop(new, x, None, 2.0)
    _assert_same_grads(g_new, g_ref)


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert(lambda x: x)


def test_input_gradient_alone_makes_no_weight_product(monkeypatch):
    """Under autograd.grad(out, x) the drop-ins skip the weight-gradient products."""
    from gradreg_kernels import get_backend

    kernels = get_backend("torch", torch.device("cpu"))
    calls = Counter()
    for name in ("linear_weight_grad", "conv2d_weight_grad"):
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(kernels, name, counted)
    model = convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(3 * 5 * 5, 4)), backend="torch")
    x = torch.randn(3, 2, 7, 7, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    assert sum(calls.values()) == 0
    g.pow(2).sum().backward()
    assert calls["linear_weight_grad"] >= 1 and calls["conv2d_weight_grad"] >= 1
    assert model[0].weight.grad is not None and model[3].weight.grad is not None
