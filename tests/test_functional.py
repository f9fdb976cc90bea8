"""gradcheck and gradgradcheck (float64) of every drop-in Function on every usable backend,
plus forward values against torch's own ops."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from gradreg_kernels import backend_names, get_backend
from gradreg_kernels.functional import (
    batch_norm,
    bias_act,
    conv2d_act,
    linear_act,
    max_pool2d,
    softmax_cross_entropy,
)


def _usable_backends() -> list[tuple[str, str]]:
    """(device, backend) pairs: every registered backend usable on each present device."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs = []
    for dev in devices:
        for name in backend_names():
            try:
                get_backend(name, torch.device(dev))
            except (RuntimeError, ValueError):
                continue
            pairs.append((dev, name))
    return pairs


BACKENDS = [f"{dev}:{name}" for dev, name in _usable_backends()]
_DEVICE = {"dev": "cpu"}
ACTS = {  # name → (act_args, torch reference)
    "linear": ((), lambda z: z),
    "relu": ((), F.relu),
    "leaky_relu": ((0.2,), lambda z: F.leaky_relu(z, 0.2)),
    "softplus": ((2.0, 3.0), lambda z: F.softplus(z, 2.0, 3.0)),
    "tanh": ((), torch.tanh),
    "sigmoid": ((), torch.sigmoid),
    "gelu": ((), F.gelu),
    "gelu_tanh": ((), lambda z: F.gelu(z, approximate="tanh")),
    "elu": ((0.7,), lambda z: F.elu(z, 0.7)),
    "silu": ((), F.silu),
    "hardtanh": ((-0.5, 1.5), lambda z: F.hardtanh(z, -0.5, 1.5)),
    "hardsigmoid": ((), F.hardsigmoid),
    "hardswish": ((), F.hardswish),
    "mish": ((), F.mish),
    "selu": ((), F.selu),
    "celu": ((0.7,), lambda z: F.celu(z, 0.7)),
    "logsigmoid": ((), F.logsigmoid),
    "softsign": ((), F.softsign),
    "tanhshrink": ((), F.tanhshrink),
}


def _r(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=_DEVICE["dev"], requires_grad=True)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """A backend name; tensors made by _r live on its device for the test."""
    dev, name = request.param.split(":")
    _DEVICE["dev"] = dev
    yield name
    _DEVICE["dev"] = "cpu"


def _check(fn, inputs, fast: bool = True):
    """Both checks; fast mode compares random projections uᵀ J v (a full check per draw).

    On CUDA, cuDNN's weight-gradient kernels sum with atomics, so a repeated backward
    differs in the last bits: the reentrancy check gets float64 rounding slack there.
    """
    nondet = 1e-10 if any(t.is_cuda for t in inputs) else 0.0
    kw = dict(eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast, nondet_tol=nondet)
    assert gradcheck(fn, inputs, **kw)
    assert gradgradcheck(fn, inputs, **kw)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_bias_act(act, backend):
    args, ref = ACTS[act]
    x, b = _r(3, 5, 2), _r(5)
    y = bias_act(x, b, act, args, dim=1, backend=backend)
    torch.testing.assert_close(y, ref(x + b[:, None]), rtol=1e-12, atol=1e-12)
    _check(lambda x, b: bias_act(x, b, act, args, dim=1, backend=backend), (x, b), fast=False)
    _check(lambda x: bias_act(x, None, act, args, backend=backend), (_r(2, 3),))


@pytest.mark.parametrize("act", sorted(ACTS))
def test_linear_act(act, backend):
    args, ref = ACTS[act]
    x, w, b = _r(3, 1, 5), _r(3, 5), _r(3)
    y = linear_act(x, w, b, act, args, backend=backend)
    torch.testing.assert_close(y, ref(F.linear(x, w, b)), rtol=1e-12, atol=1e-12)
    _check(lambda x, w, b: linear_act(x, w, b, act, args, backend=backend), (x, w, b))


@pytest.mark.parametrize("act", ["linear", "relu", "softplus", "elu"])
@pytest.mark.parametrize("geom", [((1, 1), (1, 0), (1, 1), 1), ((2, 1), (1, 1), (1, 2), 1),
                                  ((1, 2), (0, 1), (1, 1), 2)])
def test_conv2d_act(act, geom, backend):
    args, ref = ACTS[act]
    stride, padding, dilation, groups = geom
    x, w, b = _r(2, 2, 5, 4), _r(3 * groups, 2 // groups, 3, 2), _r(3 * groups)

    def f(x, w, b):
        return conv2d_act(x, w, b, stride, padding, dilation, groups, act, args, backend)

    torch.testing.assert_close(f(x, w, b), ref(F.conv2d(x, w, b, stride, padding, dilation,
                                                        groups)), rtol=1e-12, atol=1e-12)
    _check(f, (x, w, b))


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 3, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_train(shape, affine, backend):
    c = shape[1]
    x = _r(*shape)
    g, b = (_r(c), _r(c)) if affine else (None, None)
    dev = x.device
    rm = torch.randn(c, dtype=torch.float64, device=dev)
    rv = torch.rand(c, dtype=torch.float64, device=dev) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, g, b, training=True, momentum=0.3, eps=1e-3, backend=backend)
    y_ref = F.batch_norm(x, rm_ref, rv_ref, g, b, training=True, momentum=0.3, eps=1e-3)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((rm, rv), (rm_ref, rv_ref), rtol=1e-12, atol=1e-12)
    inputs = (x, g, b) if affine else (x,)

    def f(x, g=None, b=None):
        return batch_norm(x, None, None, g, b, training=True, eps=1e-3, backend=backend)

    _check(f, inputs)


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 3, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_eval(shape, affine):
    c = shape[1]
    x = _r(*shape)
    g, b = (_r(c), _r(c)) if affine else (None, None)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    y = batch_norm(x, rm, rv, g, b, training=False, eps=1e-3)
    torch.testing.assert_close(y, F.batch_norm(x, rm, rv, g, b, False, eps=1e-3),
                               rtol=1e-12, atol=1e-12)
    inputs = (x, g, b) if affine else (x,)
    _check(lambda x, g=None, b=None: batch_norm(x, rm, rv, g, b, False, eps=1e-3), inputs)


@pytest.mark.parametrize("cfg", [(2, None, 0, 1, False), (3, 2, 1, 1, True), (2, 1, 0, 2, False)])
def test_max_pool2d(cfg, backend):
    k, s, p, d, ceil = cfg
    x = _r(1, 2, 7, 6)
    y = max_pool2d(x, k, s, p, d, ceil, backend=backend)
    torch.testing.assert_close(y, F.max_pool2d(x, k, s, p, d, ceil), rtol=0, atol=0)
    _check(lambda x: max_pool2d(x, k, s, p, d, ceil, backend=backend), (x,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_cross_entropy(reduction, backend):
    z = _r(5, 7)
    y = torch.randint(0, 7, (5,), device=z.device)
    out = softmax_cross_entropy(z, y, reduction, backend)
    torch.testing.assert_close(out, F.cross_entropy(z, y, reduction=reduction),
                               rtol=1e-12, atol=1e-12)
    _check(lambda z: softmax_cross_entropy(z, y, reduction, backend), (z,))


def test_linear_products_are_differentiable_to_third_order(backend):
    """The bilinear products reuse each other, so derivatives of any order exist."""
    x, w = _r(3, 4), _r(2, 4)
    assert gradgradcheck(lambda x, w: linear_act(x, w, None, backend=backend), (x, w),
                         check_fwd_over_rev=False)
    (gx,) = torch.autograd.grad(linear_act(x, w).pow(2).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.pow(2).sum(), w, create_graph=True)
    (gx2,) = torch.autograd.grad(gw.pow(2).sum(), x)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    (rx,) = torch.autograd.grad(F.linear(xr, wr).pow(2).sum(), xr, create_graph=True)
    (rw,) = torch.autograd.grad(rx.pow(2).sum(), wr, create_graph=True)
    (rx2,) = torch.autograd.grad(rw.pow(2).sum(), xr)
    torch.testing.assert_close(gx2, rx2, rtol=1e-10, atol=1e-10)


def test_third_derivative_of_activation_says_unsupported():
    x, w = _r(3, 4), _r(2, 4)
    (gx,) = torch.autograd.grad(linear_act(x, w, None, "tanh").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable twice"):
        torch.autograd.grad(gx.pow(2).sum(), w, create_graph=True)


def test_bad_arguments_name_the_problem():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="unknown activation"):
        bias_act(x, None, "swish")
    with pytest.raises(ValueError, match="b must have shape"):
        bias_act(x, torch.randn(4))
    with pytest.raises(ValueError, match="in_features=5"):
        linear_act(x, torch.randn(2, 5))
    with pytest.raises(ValueError, match="channels"):
        conv2d_act(torch.randn(1, 3, 4, 4), torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="labels must lie"):
        softmax_cross_entropy(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="running_mean"):
        batch_norm(torch.randn(2, 3), None, None, training=False)


def test_inplace_change_of_a_saved_output_is_caught():
    """On the portable backend the ReLU output doubles as its derivative mask; autograd's
    version check guards it (other backends save a separate mask)."""
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(2, 4)
    y = linear_act(x, w, None, "relu", backend="torch")
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_gradient_with_respect_to_an_intermediate():
    """autograd.grad(out, h) for h made by a drop-in op: the captured input is produced."""
    x, w1, w2 = _r(3, 4), _r(5, 4), _r(2, 5)
    h = linear_act(x, w1, None, "tanh")
    (gh,) = torch.autograd.grad(linear_act(h, w2, None, "relu").sum(), h)
    hr = torch.tanh(F.linear(x, w1)).detach().requires_grad_()
    (ref,) = torch.autograd.grad(F.relu(F.linear(hr, w2)).sum(), hr)
    torch.testing.assert_close(gh, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act, args", [("softplus", (1.0, 20.0)), ("tanh", ()), ("sigmoid", ()),
                                       ("elu", (0.7,))])
def test_cpu_activation_kept_as_its_output(act, args):
    """The cpu backend keeps a Softplus / Tanh / Sigmoid / ELU output alone and recomputes
    σ', σ'' from it: a float32 double-backward step matches float64, the output is saved
    through autograd (an in-place change of it is caught) and is freed with its graph (no
    reference cycle through the saved state)."""
    if ("cpu", "cpu") not in _usable_backends():
        pytest.skip("the cpu backend is not built here")
    gen = torch.Generator().manual_seed(5)
    x0, w0, b0 = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in
                  [(37, 53), (29, 53), (29,)])

    def step(dtype, backend):
        x, w, b = (t.to(dtype).requires_grad_(True) for t in (x0, w0, b0))
        y = linear_act(x, w, b, act, args, backend=backend)
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum() + y.sum(), (w, b))

    for got, ref in zip(step(torch.float32, "cpu"), step(torch.float64, "torch")):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-4

    x = torch.randn(5, 53, requires_grad=True)
    y = linear_act(x, w0.float(), None, act, args, backend="cpu")
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y = linear_act(x, w0.float(), None, act, args, backend="cpu")
    alive = weakref.ref(y)
    gc.disable()
    try:
        del y
        assert alive() is None
    finally:
        gc.enable()


def test_nested_functions_skip_autograd_bookkeeping_without_a_graph(monkeypatch):
    """Where no graph is recorded (a backward without create_graph, inference under
    no_grad) a drop-in's nested Functions run their forward directly: the same values, no
    Function.apply call; with create_graph the nested Functions are applied as before."""
    from gradreg_kernels.functional import conv as fconv

    calls = {"n": 0}
    real = fconv.Conv2dInputGrad.apply.__func__

    def counting(cls, *args):
        calls["n"] += 1
        return real(cls, *args)

    monkeypatch.setattr(fconv.Conv2dInputGrad, "apply", classmethod(counting))
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def grads(create_graph):
        y = conv2d_act(x, w, None, padding=1, act="tanh", backend="torch")
        return torch.autograd.grad(y.pow(2).sum(), (x, w), create_graph=create_graph)

    plain = grads(False)
    assert calls["n"] == 0
    graphed = grads(True)
    assert calls["n"] == 1 and graphed[0].requires_grad
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b.detach())
    with torch.no_grad():
        y = conv2d_act(x, w, None, padding=1, act="tanh", backend="torch")
    assert y.grad_fn is None
    assert torch.equal(y, conv2d_act(x, w, None, padding=1, act="tanh", backend="torch").detach())


class _Counting:
    """The cpu backend's extension with every kernel call counted."""

    def __init__(self, ext) -> None:
        self.ext, self.calls = ext, {}

    def __getattr__(self, name):
        fn = getattr(self.ext, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "softplus", "tanh", "sigmoid", "gelu",
                                 "elu", "silu", "mish", "hardswish"])
def test_second_derivatives_on_the_cpu_kernels_match_float64(act, monkeypatch):
    """float32 on the C++ kernels (float64 gradcheck runs the portable ones): the first and
    second derivatives of bias_act / linear_act equal float64 autograd of torch's own ops,
    and the extension's kernels are what ran (counted)."""
    from gradreg_kernels.backends.cpu import available

    if available() is not None:
        pytest.skip(f"cpu backend unavailable: {available()}")
    kernels = get_backend("cpu", torch.device("cpu"))
    counting = _Counting(kernels.ext)
    monkeypatch.setattr(kernels, "ext", counting)
    args, ref = ACTS[act]
    g = torch.Generator().manual_seed(len(act))
    x, w, b = (torch.randn(*s, generator=g) for s in ((7, 9), (6, 9), (6,)))
    v = torch.randn(7, 9, generator=g)

    def second(fn, x, w, b):
        x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))
        y = fn(x, w, b)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad((gx * v.to(gx.dtype)).sum(), (x, w, b))

    got = second(lambda x, w, b: linear_act(x, w, b, act, args, backend="cpu"), x, w, b)
    want = second(lambda x, w, b: ref(F.linear(x, w, b)), x.double(), w.double(), b.double())
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)
    calls = counting.calls
    assert calls.get("mask_forward", 0) + calls.get("smooth_value", 0) == 1, calls
    assert sum(calls.get(k, 0) for k in ("mask_apply", "z_mul_add", "output_mul_add",
                                         "z_tangent", "output_tangent")) >= 2, calls
