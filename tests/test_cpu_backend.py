"""The "cpu" backend: each kernel against the portable backend, the full fused step against
the float64 oracle, and the extension's build cache, lock and no-compiler path."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.activation_math import spec_by_name
from gradreg_kernels.backends import cpu_build, get_backend
from gradreg_kernels.backends.torch_ops import TorchBackend
from reference import oracle_grads, oracle_loss

ROOT = Path(__file__).resolve().parent.parent

if shutil.which(cpu_build.compiler().split()[0]) is None:
    pytest.skip("no C++ compiler: the cpu backend cannot be built here", allow_module_level=True)


@pytest.fixture(scope="module")
def kernels():
    from gradreg_kernels.backends import cpu

    why = cpu.available()
    assert why is None, why  # a compiler is present, so the build must succeed
    return cpu.CpuBackend()


REF = TorchBackend()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-6) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert rel(a, b) < tol, rel(a, b)


# ---- products ----------------------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["onednn", "mkl"])
def products(request, monkeypatch):
    """Both product libraries, whichever this CPU's default is (cpu.ONEDNN_PRODUCTS: oneDNN
    on AVX-512 CPUs, MKL on AVX2 ones)."""
    from gradreg_kernels.backends import cpu

    monkeypatch.setattr(cpu, "ONEDNN_PRODUCTS", request.param)
    return request.param


@pytest.mark.parametrize("choice,want", [("onednn", True), ("mkl", False)])
def test_product_library_follows_the_environment(monkeypatch, choice, want):
    from gradreg_kernels.backends import cpu

    monkeypatch.setenv("GRADREG_KERNELS_PRODUCTS", choice)
    assert cpu._onednn_products() is want
    monkeypatch.setattr(cpu, "ONEDNN_PRODUCTS", want)
    assert cpu._product_path(512, 10**8) == choice
    assert cpu._product_path(512, 1000) == "mkl" and cpu._product_path(16, 10**8) == "thin"
    monkeypatch.setenv("GRADREG_KERNELS_PRODUCTS", "blas")
    with pytest.warns(RuntimeWarning, match="GRADREG_KERNELS_PRODUCTS .*'blas'"):
        by_cpu = cpu._onednn_products()
    assert by_cpu is torch.backends.cpu.get_cpu_capability().startswith("AVX512")


# n · in · out below ONEDNN_MIN_WORK runs on MKL, above on oneDNN where it is chosen (Wᵀ as a
# strided view; the weight product copies the narrower side): both orders of in / out
@pytest.mark.parametrize("n", [1, 3, 67, 131, 300, 1111])
@pytest.mark.parametrize("out_f, in_f", [(29, 37), (41, 23)])
def test_linear_products(kernels, products, n, out_f, in_f):
    a, w, b = torch.randn(n, in_f), torch.randn(out_f, in_f), torch.randn(out_f)
    d, d2, a2 = torch.randn(n, out_f), torch.randn(n, out_f), torch.randn(n, in_f)
    close(kernels.linear(a, w, b), REF.linear(a, w, b))
    close(kernels.linear(a, w, None), REF.linear(a, w, None))
    close(kernels.linear_input_grad(d, w), REF.linear_input_grad(d, w))
    close(kernels.linear_weight_grad([(d, a)]), REF.linear_weight_grad([(d, a)]))
    pairs = [(d, a), (d2, a2)]
    close(kernels.linear_weight_grad(pairs), REF.linear_weight_grad(pairs))


@pytest.mark.parametrize("n, out_f, in_f", [(5, 29, 37), (256, 300, 97), (131, 129, 2000)])
def test_weight_product_accumulates_in_place(kernels, products, n, out_f, in_f):
    """acc += Σ dᵀa in place on both backends (the oneDNN one in blocks of output rows, the
    last one short), one pair and two."""
    pairs = [(torch.randn(n, out_f), torch.randn(n, in_f)) for _ in range(2)]
    acc0 = torch.randn(out_f, in_f)
    for backend in (kernels, REF):
        for k in (1, 2):
            acc = acc0.clone()
            out = backend.linear_weight_grad(pairs[:k], acc=acc)
            assert out.data_ptr() == acc.data_ptr()
            ref = acc0.double() + sum(d.double().t() @ a.double() for d, a in pairs[:k])
            close(out, ref.float())


def test_weight_product_reads_stacked_operands_without_a_copy(kernels, products):
    """The Linear rule's [a; r] buffer is read as one operand; other parts are concatenated."""
    from gradreg_kernels.backends.cpu import _stacked_rows

    a, r = torch.randn(67, 801), torch.randn(67, 801)
    a_view, r_view = kernels.weight_grad_operands(a, r)
    assert _stacked_rows([a_view, r_view]).data_ptr() == a_view.data_ptr()  # no copy
    assert _stacked_rows([r_view, a_view]).data_ptr() not in (a_view.data_ptr(),
                                                              r_view.data_ptr())  # order
    assert torch.equal(_stacked_rows([a, r]), torch.cat([a, r]))
    z, d = torch.randn(67, 512), torch.randn(67, 512)
    close(kernels.linear_weight_grad([(z, a_view), (d, r_view)]),
          REF.linear_weight_grad([(z, a), (d, r)]))


def test_products_see_weights_updated_in_place(kernels, products):
    """oneDNN reads W through a view on every call: an optimizer step in place is seen."""
    w, d, a = torch.randn(512, 784), torch.randn(256, 512), torch.randn(256, 784)
    for _ in range(2):
        close(kernels.linear_input_grad(d, w), REF.linear_input_grad(d, w))
        close(kernels.linear(a, w, None), REF.linear(a, w, None))
        w.mul_(-0.5).add_(1.0)


@pytest.mark.parametrize("k", [1, 2, 7, 10, 16])
@pytest.mark.parametrize("n, in_f", [(1, 3), (5, 16), (64, 512), (131, 17), (300, 1001)])
def test_thin_products(kernels, k, n, in_f):
    """A layer with ≤ THIN_MAX outputs runs its products in the extension's one-sweep
    kernels: each against float64, odd sizes (rows and columns not multiples of 16)."""
    from gradreg_kernels.backends.cpu import THIN_MAX

    assert k <= THIN_MAX
    a, w, b = torch.randn(n, in_f), torch.randn(k, in_f), torch.randn(k)
    d, d2, a2 = torch.randn(n, k), torch.randn(n, k), torch.randn(n, in_f)
    ad, wd = a.double(), w.double()
    close(kernels.linear(a, w, b), ad @ wd.t() + b.double())
    close(kernels.linear(a, w, None), ad @ wd.t())
    close(kernels.linear_input_grad(d, w), d.double() @ wd)
    ref = d.double().t() @ ad + d2.double().t() @ a2.double()
    close(kernels.linear_weight_grad([(d, a), (d2, a2)]), ref)
    acc0 = torch.randn(k, in_f)
    acc = acc0.clone()
    gw, gb = kernels.linear_param_grads([(d, a), (d2, a2)], acc, True, True)
    assert gw.data_ptr() == acc.data_ptr()  # added in place
    close(gw, ref + acc0.double())
    close(gb, d.double().sum(0))


def test_thin_kernels_name_bad_operands(kernels):
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        kernels.ext.thin_linear(torch.randn(3, 5), torch.randn(17, 5), None)
    with pytest.raises(RuntimeError, match="d \\(N, K\\) and W \\(K, in\\)"):
        kernels.ext.thin_input_grad(torch.randn(3, 4), torch.randn(5, 7))
    with pytest.raises(RuntimeError, match="acc must be"):
        kernels.ext.thin_weight_grad([torch.randn(3, 4)], [torch.randn(3, 5)], torch.randn(4, 6),
                                False)


@pytest.mark.parametrize("need_w, need_b", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("n, out_f, in_f", [(3, 29, 37), (64, 512, 784), (131, 300, 97)])
def test_linear_param_grads_sum_the_bias_in_the_layout_sweep(kernels, need_w, need_b, n, out_f,
                                                             in_f):
    """(Σ dᵀa (+ acc), Σ_n z̄) on both backends, the oneDNN path taking the bias sum from
    the transposing sweep."""
    pairs = [(torch.randn(n, out_f), torch.randn(n, in_f)) for _ in range(2)]
    ref_w = sum(d.double().t() @ a.double() for d, a in pairs)
    for backend in (kernels, REF):
        for acc in (None, torch.randn(out_f, in_f)):
            if acc is not None and not need_w:
                continue
            acc0 = None if acc is None else acc.clone()
            gw, gb = backend.linear_param_grads(pairs, acc, need_w, need_b)
            if need_w:
                close(gw, ref_w if acc0 is None else ref_w + acc0.double())
            else:
                assert gw is None
            if need_b:
                close(gb, pairs[0][0].double().sum(0))
            else:
                assert gb is None


def test_kept_delta_is_its_transposed_copy_and_serves_every_weight_product(kernels,
                                                                             monkeypatch):
    """keep_delta gives δᵀ (a new buffer: δ itself can go) where oneDNN's product copies δ
    transposed anyway, δ as it is elsewhere (MKL's products included); every weight product
    reads the kept form, on either library."""
    from gradreg_kernels.backend_protocol import TransposedDelta
    from gradreg_kernels.backends import cpu

    d, a, a2 = torch.randn(300, 200), torch.randn(300, 301), torch.randn(300, 301)
    monkeypatch.setattr(cpu, "ONEDNN_PRODUCTS", False)
    assert kernels.keep_delta(d, 301) is d
    monkeypatch.setattr(cpu, "ONEDNN_PRODUCTS", True)
    kept = kernels.keep_delta(d, 301)
    assert isinstance(kept, TransposedDelta) and kept.t.is_contiguous()
    assert kept.t._base is None and kept.t.data_ptr() != d.data_ptr()
    assert kernels.keep_delta(d, 150) is d                       # δ wider than the input
    assert kernels.keep_delta(torch.randn(300, 16), 301).shape == (300, 16)  # thin layer
    assert kernels.keep_delta(torch.randn(2, 200), 301).shape == (2, 200)    # small product
    ref = d.double().t() @ a.double()
    close(kernels.linear_weight_grad([(kept, a)]), ref)
    acc0 = torch.randn(200, 301)
    close(kernels.linear_weight_grad([(kept, a)], acc=acc0.clone()), ref + acc0.double())
    ref2 = ref + d.double().t() @ a2.double()
    close(kernels.linear_weight_grad([(kept, a), (d, a2)]), ref2)
    gw, gb = kernels.linear_param_grads([(kept, a)], None, True, True)
    close(gw, ref)
    close(gb, d.double().sum(0))
    monkeypatch.setattr(cpu, "ONEDNN_PRODUCTS", False)  # a δᵀ kept before a switch to MKL
    close(kernels.linear_weight_grad([(kept, a)]), ref)


@pytest.mark.parametrize("keep_saved", [False, True])
def test_step_with_kept_deltas_matches_float64_oracle(kernels, products, keep_saved):
    """An MLP whose dᵀr terms run in pass 3 from the kept δᵀ (B = 300; λ large enough that the
    penalty's terms carry the gradient): against the float64 oracle; under keep_saved a
    second backward adds the same gradients again."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(301, 200), nn.ReLU(), nn.Linear(200, 180), nn.Softplus(),
                          nn.Linear(180, 10))
    x, y = torch.randn(300, 301), torch.randint(0, 10, (300,))
    m64 = copy.deepcopy(model).double()
    out = gradreg_loss(model, x, y, lam=40.0, backend="cpu", keep_saved=keep_saved)
    out.loss.backward(retain_graph=keep_saved)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    want, loss, _, _ = oracle_grads(m64, x.double(), y, lam=40.0)
    assert rel(out.loss.detach(), loss) < 1e-5
    assert _global_rel(got, want) < 1e-4
    if keep_saved:
        out.loss.backward()
        for n, p in model.named_parameters():
            close(p.grad, 2 * got[n], 1e-5)


@pytest.mark.parametrize("c", [1, 15, 16, 45, 512])
def test_transpose_cat(kernels, c):
    """Exact, with 16 × 16 register tiles and the edges element by element; the column sums
    of the first operand (the bias gradient) on the side."""
    parts = [torch.randn(n, c) for n in (3, 70, 1, 32)]
    assert torch.equal(kernels.ext.transpose_cat(parts), torch.cat(parts).t())
    out, sums = kernels.ext.transpose_cat_sum(parts[1:])
    assert torch.equal(out, torch.cat(parts[1:]).t())
    close(sums, parts[1].double().sum(0))


# ---- activations ---------------------------------------------------------------------------
ACTS = [("relu",), ("leaky_relu", 0.07), ("softplus", 1.5, 4.0), ("softplus", 1.0, 20.0),
        ("softplus", 0.5, 15.0), ("tanh",), ("sigmoid",), ("gelu",), ("gelu_tanh",),
        ("elu", 0.8), ("silu",), ("hardtanh", -0.5, 1.5), ("hardswish",), ("mish",), ("selu",),
        ("celu", 0.7)]
#: the kinds whose derivatives come from the output (the passes keep y alone)
FROM_OUTPUT = {("softplus", 1.0, 20.0), ("softplus", 0.5, 15.0), ("tanh",), ("sigmoid",),
               ("elu", 0.8)}
#: the other smooth kinds: the passes keep z and recompute σ', σ'' from it
FROM_INPUT = {("softplus", 1.5, 4.0), ("gelu",), ("gelu_tanh",), ("silu",), ("mish",),
              ("hardswish",)}


@pytest.mark.parametrize("act", ACTS, ids=["-".join(map(str, a)) for a in ACTS])
def test_activation_steps(kernels, act):
    spec = spec_by_name(*act)
    z = torch.randn(3, 41, 7) * 3
    # kinks, tails, both sides of softplus' linear region and where 1 − e^{−βy} cancels
    z.view(-1)[:13] = torch.tensor([0.0, -0.0, 1e-8, 30.0, -30.0, 19.99, 20.01, 29.99, 30.01,
                                    -12.0, -4.0, -2.2, -1.9])
    d, r, u, s0 = (torch.randn_like(z) for _ in range(4))
    # every output against float64, allowed a few times the portable float32 error
    z64 = z.double()
    y, saved = kernels.act_forward(spec, z)
    y_ref, saved_ref = REF.act_forward(spec, z)
    y64, saved64 = REF.act_forward(spec, z64)

    def check(got, ref32, ref64):
        assert rel(got, ref64) <= max(4 * rel(ref32, ref64), 1e-6), (rel(got, ref64),
                                                                      rel(ref32, ref64))

    check(y, y_ref, y64)
    from gradreg_kernels.backends.cpu import _SmoothState

    if act in FROM_OUTPUT:  # the state is the output itself, no second buffer
        assert isinstance(saved, _SmoothState) and saved.from_output and saved.tensor is y
    if act in FROM_INPUT:  # the state is z itself (σ', σ'' recomputed from it), one buffer
        assert isinstance(saved, _SmoothState) and not saved.from_output and saved.tensor is z
    check(kernels.act_chain(spec, saved, d), REF.act_chain(spec, saved_ref, d),
          REF.act_chain(spec, saved64, d.double()))
    out, s = kernels.act_tangent(spec, saved, r, u)
    out_ref, s_ref = REF.act_tangent(spec, saved_ref, r, u)
    out64, s64 = REF.act_tangent(spec, saved64, r.double(), u.double())
    check(out, out_ref, out64)
    assert (s is None) == (s_ref is None)
    if s is not None:
        check(s, s_ref, s64)
    s_in = s0 if spec.smooth else None
    check(kernels.act_backward(spec, saved, d, s_in), REF.act_backward(spec, saved_ref, d, s_in),
          REF.act_backward(spec, saved64, d.double(), None if s_in is None else s_in.double()))


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "mish", "hardswish"])
def test_smooth_derivatives_on_a_dense_grid(kernels, name):
    """σ, σ', σ'' at every float on a fine grid over [−12, 12] (the fitted Φ of GELU has two
    branches, |z| below and above √2): the worst error, relative to max(|value|, 1), within
    3e-7 (2.5 float32 ulps) or 1.5× that of the same formula in torch's float32 ops."""
    spec = spec_by_name(name)
    z = torch.linspace(-12.0, 12.0, 240_001)
    y, saved = kernels.act_forward(spec, z)
    ones = torch.ones_like(z)
    d1 = kernels.act_chain(spec, saved, ones)
    _, d2 = kernels.act_tangent(spec, saved, ones, ones)
    z64 = z.double()
    def worst(t: torch.Tensor, ref: torch.Tensor) -> float:
        return float(((t.double() - ref).abs() / ref.abs().clamp_min(1.0)).max())

    for got, f in ((y, spec.value), (d1, spec.d1), (d2, spec.d2)):
        ref = f(z64)
        ours, torch32 = worst(got, ref), worst(f(z), ref)
        assert ours <= max(3e-7, 1.5 * torch32), (ours, torch32)
    if name == "gelu":  # Φ keeps its relative accuracy in the lower tail (erfc, not 1 + erf)
        tail = (z < -4) & (z > -7)  # below −7 (|z|/√2 > 5) the fit is clamped: Φ < 1.3e-12
        ref = spec.value(z64)[tail]
        # (torch's float32 GELU, through 1 + erf, is off by up to 100 % there)
        assert ((y[tail].double() - ref).abs() <= 1e-4 * ref.abs()).all()


def test_relu_saves_one_bit_per_element(kernels):
    z = torch.randn(9, 131)
    _, saved = kernels.act_forward(spec_by_name("relu"), z)
    assert saved.bits.dtype == torch.uint8 and saved.bits.numel() == (z.numel() + 7) // 8


# ---- dropout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 5), (7, 33), (3, 4, 5, 5)])
def test_dropout_draws_torch_mask_and_stream(kernels, shape):
    a, t = torch.randn(shape), torch.randn(shape)
    torch.manual_seed(11)
    y, saved = kernels.dropout_forward(a, 0.4)
    after = torch.rand(3)
    torch.manual_seed(11)
    y_ref, saved_ref = REF.dropout_forward(a, 0.4)
    after_ref = torch.rand(3)
    close(y, y_ref, 1e-7)
    close(kernels.dropout_apply(saved, t), REF.dropout_apply(saved_ref, t), 1e-7)
    assert torch.equal(after, after_ref)


# ---- heads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("n,k", [(1, 2), (3, 10), (65, 7)])
def test_softmax_head_and_hvp(kernels, uniform, n, k):
    z, t = torch.randn(n, k) * 4, torch.randn(n, k)
    y = torch.randint(0, k, (n,))
    got = kernels.softmax_head(z, y, uniform)
    want = REF.softmax_head(z, y, uniform)
    for g, w in zip(got, want, strict=True):
        close(g, w)
    close(kernels.softmax_hvp(got[1], t), REF.softmax_hvp(want[1], t))


# ---- pooling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [(2, 2, 0, 1, False), (2, 2, 0, 1, True), (3, 2, 1, 1, True),
                                  (2, 1, 0, 2, False)])
def test_max_pool_gather_scatter(kernels, args):
    a = torch.randn(3, 5, 11, 9)
    a[0, 0] = torch.randint(0, 3, (11, 9)).float()  # ties: the first maximum wins
    a[1, 2, 3:6, 2:5] = float("nan")  # NaN wins, as in torch
    y, idx = kernels.max_pool2d(a, *args)
    y_ref, idx_ref = REF.max_pool2d(a, *args)
    assert torch.allclose(y, y_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, idx_ref)
    r, d = torch.randn_like(a), torch.randn_like(y)
    close(kernels.pool_gather(r, idx), REF.pool_gather(r, idx), 1e-12)
    close(kernels.pool_scatter(d, idx, a.shape), REF.pool_scatter(d, idx, a.shape), 1e-6)


# ---- train-mode batch norm --------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 7), (3, 6, 5, 4), (1, 3, 9, 7)])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_steps(kernels, shape, affine):
    a = torch.randn(shape) * 2 + 1
    c = shape[1]
    gamma, beta = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    got = kernels.bn_train_forward(a, gamma, beta, 1e-5)
    want = REF.bn_train_forward(a, gamma, beta, 1e-5)
    for g, w in zip(got, want, strict=True):
        close(g, w, 1e-5)
    xhat, inv_std = want[1], want[2]
    d, r = torch.randn(shape), torch.randn(shape)
    pd, mxd = kernels.bn_project(d, xhat)
    pd_ref, mxd_ref = REF.bn_project(d, xhat)
    close(pd, pd_ref, 1e-5)
    close(mxd, mxd_ref, 1e-5)
    gamma_c = gamma.view([1, -1] + [1] * (a.dim() - 2)) if affine else a.new_ones(())
    # the fused per-pass kernels (the tangent's includes the second-order term s) against
    # the portable composition of the steps
    k = (gamma_c * inv_std).reshape(-1).expand(c).contiguous()
    out, saved, means = kernels.bn_chain(d, xhat, k)
    out_ref, saved_ref, means_ref = REF.bn_chain(d, xhat, k)
    close(out, out_ref, 1e-5)
    for m, m_ref in zip(means, means_ref, strict=True):
        close(m, m_ref, 1e-5)
    tangent_ref = REF.bn_tangent(saved_ref, r, xhat, k, inv_std, gamma_c)
    for g, w in zip(kernels.bn_tangent(saved, r, xhat, k, inv_std, gamma_c), tangent_ref,
                    strict=True):
        close(g, w, 1e-5)
    s_ref = tangent_ref[1]  # the second-order term, the backward's extra input
    abar = torch.randn(shape)
    for extra in (None, s_ref):
        for g, w in zip(kernels.bn_backward(abar, xhat, k, extra),
                        REF.bn_backward(abar, xhat, k, extra), strict=True):
            close(g, w, 1e-5)


@pytest.mark.parametrize("shape", [(5, 7), (3, 6, 5, 4), (1, 3, 9, 7)])
def test_batchnorm_without_affine_keeps_one_tensor(kernels, shape):
    """Without γ, β the output y is x̂ itself, not an equal second tensor."""
    y, xhat, *_ = kernels.bn_train_forward(torch.randn(shape), None, None, 1e-5)
    assert y is xhat
    y, xhat, *_ = kernels.bn_train_forward(torch.randn(shape), torch.randn(shape[1]), None, 1e-5)
    assert y.data_ptr() != xhat.data_ptr()


@pytest.mark.parametrize("shape", [(5, 7), (3, 6, 5, 4), (1, 3, 9, 7), (3001, 13), (2, 5, 1)])
def test_channel_dot(kernels, shape):
    """Σ a ⊙ b per channel of (N, C, ...) operands; (R, C) ones (a LayerNorm's features)
    take the row sweep, with enough rows for every thread to hold a partial sum."""
    a, b = torch.randn(shape) * 3, torch.randn(shape)
    want = (a.double() * b.double()).sum(dim=[0] + list(range(2, a.dim())))
    close(kernels.channel_dot(a, b), want.float(), 1e-6)
    close(REF.channel_dot(a, b), want.float(), 1e-5)


@pytest.mark.parametrize("n", [1, 7, 65537, 200003])
def test_whole_tensor_reductions(kernels, n):
    """The penalty's Σ g² and the input's finite check, over one chunk and over several."""
    t = torch.randn(n) * 3
    total, seed = kernels.penalty_terms(t, None)
    close(total, (t.double() ** 2).sum().float(), 1e-6)
    assert seed is t
    assert kernels.all_finite(t)
    for bad in (math.nan, math.inf, -math.inf):
        t2 = t.clone()
        t2[n // 2] = bad
        assert not kernels.all_finite(t2)
    assert kernels.all_finite(torch.full((n,), 3e38))  # its sum overflows; every value is finite


# ---- convolutions -----------------------------------------------------------------------------
@pytest.mark.parametrize("geom", [
    (64, 1, 28, 28, 32, 5, 1, 2, 1),  # the paper CNN's first layer: product + fold
    (3, 1, 9, 7, 16, 3, 2, 1, 1),     # strided, a row and a column dropped by the forward
    (2, 2, 11, 10, 40, 3, 3, 0, 2),   # dilated
    (4, 3, 13, 13, 30, 3, 2, 2, 1),
    (4, 3, 12, 12, 16, 3, 1, 1, 1),   # O < C·kh·kw: the transposed convolution
    (2, 6, 9, 9, 4, 3, 1, 1, 1),      # many input channels: the transposed convolution
    (3, 16, 32, 32, 32, 1, 2, 0, 1),  # strided 1×1 (ResNet shortcut): product to every 2nd pixel
    (2, 5, 9, 8, 7, 1, 3, 0, 1),      # strided 1×1 with rows and columns dropped
])
def test_conv_input_grad(kernels, geom):
    n, c, h, w_, o, k, s, p, dil = geom
    w = torch.randn(o, c, k, k)
    y_shape = F.conv2d(torch.zeros(n, c, h, w_), w, None, s, p, dil).shape
    d = torch.randn(y_shape)
    g = ((s, s), (p, p), (dil, dil), 1)
    got = kernels.conv2d_input_grad(d, w, (n, c, h, w_), g)
    close(got, REF.conv2d_input_grad(d.double(), w.double(), (n, c, h, w_), g), 1e-6)


# ---- the full step against the float64 oracle ------------------------------------------------
def _mlp():
    return nn.Sequential(nn.Linear(13, 17), nn.ReLU(), nn.Linear(17, 11), nn.Softplus(2.0),
                         nn.Linear(11, 9), nn.LeakyReLU(0.1), nn.Linear(9, 7), nn.Tanh(),
                         nn.Linear(7, 8), nn.GELU(), nn.Linear(8, 6), nn.ELU(), nn.Linear(6, 5))


def _cnn(bn1d: bool):
    tail = [nn.BatchNorm1d(9)] if bn1d else []
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3), nn.BatchNorm2d(6), nn.Sigmoid(), nn.Flatten(),
        nn.Linear(6 * 2 * 2, 9), *tail, nn.ReLU(), nn.Dropout(0.3), nn.Linear(9, 5))


def _global_rel(got: dict, want: dict) -> float:
    g = torch.cat([got[k].double().flatten() for k in want])
    w = torch.cat([want[k].flatten() for k in want])
    return rel(g, w)


@pytest.mark.parametrize("value_weight", [1.0, 0.0])
@pytest.mark.parametrize("b", [1, 3, 64])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("head", ["ce", "logprob_sum"])
def test_full_step_matches_float64_oracle(b, kind, head, value_weight):
    """value_weight = 0 checks the penalty's own gradient: with the data term beside it the
    penalty is a small share of the MLP rows' gradient, which a dropped term could hide in."""
    torch.manual_seed(b + len(kind))
    model = _mlp() if kind == "mlp" else _cnn(bn1d=b > 1)
    x = torch.randn(b, 13) if kind == "mlp" else torch.randn(b, 2, 9, 9)
    x = x.transpose(0, -1).contiguous().transpose(0, -1)  # a non-contiguous input
    y = torch.randint(0, 5, (b,))
    mask = torch.rand_like(x)
    m64 = copy.deepcopy(model).double()  # before the fused step moves the running stats
    torch.manual_seed(5)
    out = gradreg_loss(model, x, y, lam=0.37, head=head, mask=mask, backend="cpu",
                       value_weight=value_weight)
    out.loss.backward()
    assert out.backend == "cpu"
    got = {n: p.grad for n, p in model.named_parameters()}
    torch.manual_seed(5)  # the oracle's dropout draws the same mask
    want, loss, _, _ = oracle_grads(m64, x.double(), y, lam=0.37, head=head,
                                    mask=mask.double(), value_weight=value_weight)
    assert rel(out.loss.detach(), loss) < 1e-5
    assert _global_rel(got, want) < 1e-4


def test_auto_picks_cpu_backend_on_cpu_tensors(kernels):
    assert get_backend("auto", torch.device("cpu")).name == "cpu"
    model = nn.Sequential(nn.Linear(4, 3))
    out = gradreg_loss(model, torch.randn(2, 4), torch.tensor([0, 2]), lam=1.0)
    assert out.backend == "cpu"


def test_environment_switch_turns_the_backend_off(kernels, monkeypatch):
    from gradreg_kernels.backends import cpu

    dev = torch.device("cpu")
    assert get_backend("auto", dev) is get_backend("cpu", dev)  # one instance, remembered
    monkeypatch.setenv("GRADREG_KERNELS_CPU_EXT", "0")
    assert "GRADREG_KERNELS_CPU_EXT" in cpu.available()
    assert get_backend("auto", dev).name == "torch"  # the remembered choice follows the switch
    with pytest.raises(RuntimeError, match="GRADREG_KERNELS_CPU_EXT"):
        get_backend("cpu", dev)
    monkeypatch.delenv("GRADREG_KERNELS_CPU_EXT")
    assert get_backend("auto", dev).name == "cpu"


def test_float64_runs_the_portable_kernels(kernels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    out = gradreg_loss(model, x, y, lam=0.5, backend="cpu")
    out.loss.backward()
    want, _, _, _ = oracle_grads(model, x, y, lam=0.5)
    assert _global_rel({n: p.grad for n, p in model.named_parameters()}, want) < 1e-12


# ---- build cache, lock and missing compiler -------------------------------------------------
def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_unchanged_source_is_never_rebuilt(kernels, monkeypatch):
    so = Path(kernels.ext.__file__)
    mtime = so.stat().st_mtime_ns

    def no_build(*args, **kw):
        raise AssertionError("rebuilt an unchanged source")

    monkeypatch.setattr(cpu_build, "_build", no_build)
    assert Path(cpu_build.load_extension().__file__) == so
    # a fresh process imports the cached module without calling the builder either
    code = """
        import torch.utils.cpp_extension as ce
        ce.load = None  # any build attempt would fail
        from gradreg_kernels.backends import cpu_build
        print(cpu_build.load_extension().__file__)
    """
    env = {k: os.environ[k] for k in ("GRADREG_KERNELS_CACHE",) if k in os.environ}
    res = _run(code, env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(so)
    assert so.stat().st_mtime_ns == mtime


def test_two_processes_building_at_once_build_once(kernels, tmp_path):
    # The real compiler is replaced by a slow stand-in that copies the built module, so
    # the test exercises the lock and the stamp, not the compiler.
    real_so = Path(kernels.ext.__file__)
    log = tmp_path / "builds.log"
    code = f"""
        import shutil, time
        from pathlib import Path
        from gradreg_kernels.backends import cpu_build, native_build

        def slow_build(name, out, verbose):
            with open({str(log)!r}, "a") as f:
                f.write("build\\n")
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.time()  # hold the lock until the other process asks too (or 120 s)
            while open({str(log)!r}).read().count("enter") < 2 and time.time() - t0 < 120:
                time.sleep(0.05)
            shutil.copy({str(real_so)!r}, out / (name + ".so"))
            (out / native_build.STAMP).write_text(native_build.stamp_of(out / (name + ".so")))
            return native_build.import_so(name, out / (name + ".so"))

        cpu_build._build = slow_build
        with open({str(log)!r}, "a") as f:
            f.write(f"enter {{time.time()}}\\n")
        m = cpu_build.load_extension()
        with open({str(log)!r}, "a") as f:
            f.write(f"loaded {{time.time()}}\\n")
        assert hasattr(m, "mask_forward")
    """
    env = {"GRADREG_KERNELS_CACHE": str(tmp_path / "cache")}
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=full,
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    lines = log.read_text().split("\n")
    assert lines.count("build") == 1
    # the two first uses overlapped: both had asked for the extension before either had it
    enters = [float(ln.split()[1]) for ln in lines if ln.startswith("enter")]
    loads = [float(ln.split()[1]) for ln in lines if ln.startswith("loaded")]
    assert len(enters) == len(loads) == 2 and max(enters) < min(loads)


def test_a_corrupted_cached_library_is_rebuilt(kernels, tmp_path):
    """A cache entry whose library was truncated after its build finished (loading it
    would crash the process with SIGBUS): the stamp's size and SHA-256 no longer match, and
    the next first use rebuilds it."""
    real_so = Path(kernels.ext.__file__)
    cache = tmp_path / "cache"
    log = tmp_path / "builds.log"
    code = f"""
        import shutil
        from gradreg_kernels.backends import cpu_build, native_build

        out = cpu_build.build_dir()
        name = out.name.replace("cpu-", cpu_build.EXT_PREFIX + "_")
        out.mkdir(parents=True)
        so = out / (name + ".so")
        shutil.copy({str(real_so)!r}, so)  # a finished build, stamped
        (out / native_build.STAMP).write_text(native_build.stamp_of(so))
        so.write_bytes(so.read_bytes()[:4096])  # then truncated on disk

        def build(name, out, verbose):
            open({str(log)!r}, "a").write("build\\n")
            shutil.copy({str(real_so)!r}, out / (name + ".so"))
            return native_build.import_so(name, out / (name + ".so"))

        cpu_build._build = build
        assert hasattr(cpu_build.load_extension(), "mask_forward")
    """
    res = _run(code, {"GRADREG_KERNELS_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    assert log.read_text() == "build\n"


def test_no_compiler_gives_clear_error_and_portable_backend_works(tmp_path):
    code = """
        import torch
        from torch import nn
        from gradreg_kernels import gradreg_loss
        from gradreg_kernels.backends import get_backend
        from gradreg_kernels.backends.cpu import available
        why = available()
        assert why is not None and "no C++ compiler" in why, why
        try:
            get_backend("cpu", torch.device("cpu"))
        except RuntimeError as e:
            assert "no C++ compiler" in str(e), e
        else:
            raise AssertionError("backend='cpu' did not raise")
        model = nn.Sequential(nn.Linear(4, 3))
        out = gradreg_loss(model, torch.randn(2, 4), torch.tensor([0, 2]), lam=1.0)
        out.loss.backward()
        assert out.backend == "torch", out.backend
        print("ok")
    """
    env = {"CXX": str(tmp_path / "no-such-compiler"),
           "GRADREG_KERNELS_CACHE": str(tmp_path / "cache")}
    res = _run(code, env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_bad_operand_gives_clear_error(kernels):
    with pytest.raises(RuntimeError, match="float32"):
        kernels.ext.mask_forward(torch.randn(3, dtype=torch.float64), 0.0)
    with pytest.raises(RuntimeError, match="bit mask"):
        kernels.ext.mask_apply(torch.zeros(1, dtype=torch.uint8), torch.randn(20), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\).*y\[1\] = 3"):
        kernels.ext.softmax_head(torch.randn(2, 3), torch.tensor([0, 3]), False)


def test_functional_dropout_unchanged_by_backend_mask():
    # the portable backend's mask is exactly F.dropout's (guards the rule's contract)
    a = torch.randn(4, 9)
    torch.manual_seed(2)
    y, _ = REF.dropout_forward(a, 0.25)
    torch.manual_seed(2)
    assert torch.equal(y, F.dropout(a, 0.25, True))


def _fast_path_cnn():
    """A model through every fast path: a 1-channel first layer (product + fold input
    gradient), 2×2 pooling (plane-vectorized, plain-store scatter), a strided 1×1 convolution,
    BatchNorm2d / BatchNorm1d (channel-major copy) and a Linear wide enough for the dᵀr term
    to run in pass 3."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 8, 1, stride=2), nn.BatchNorm2d(8), nn.Softplus(), nn.Flatten(),
        nn.Linear(8 * 3 * 3, 300), nn.BatchNorm1d(300), nn.ReLU(), nn.Linear(300, 5))


@pytest.mark.parametrize("value_weight", [1.0, 0.0])
@pytest.mark.parametrize("b", [2, 37, 130])
def test_fast_paths_match_float64_oracle(kernels, products, b, value_weight):
    torch.manual_seed(b)
    model = _fast_path_cnn()
    x, y = torch.randn(b, 1, 12, 12), torch.randint(0, 5, (b,))
    m64 = copy.deepcopy(model).double()
    out = gradreg_loss(model, x, y, lam=0.9, backend="cpu", value_weight=value_weight)
    out.loss.backward()
    assert out.backend == "cpu"
    got = {n: p.grad for n, p in model.named_parameters()}
    want, loss, _, _ = oracle_grads(m64, x.double(), y, lam=0.9, value_weight=value_weight)
    # the penalty alone: ‖g‖² of a float32 g (B = 2 through BatchNorm1d is ill-conditioned)
    assert rel(out.loss.detach(), loss) < (1e-5 if value_weight else 1e-4)
    assert _global_rel(got, want) < 1e-4
    for name, g in got.items():  # each parameter on its own scale too
        assert rel(g, want[name]) < 1e-3 or want[name].norm() < 1e-6 * max(
            w.norm() for w in want.values()), name


@pytest.mark.parametrize("b", [1, 5, 129])
@pytest.mark.parametrize("widths", [(37, 9), (37, 7, 16, 11)], ids=["logistic", "thin-hidden"])
def test_thin_layers_in_the_fused_step(kernels, b, widths):
    """Layers with ≤ 16 outputs anywhere in the chain (a logistic regression; 7- and 16-wide
    hidden layers, whose dᵀr terms run in pass 3 or 4 by batch size), the input gradient
    asked for too: loss, every parameter gradient and x.grad against the float64 oracle."""
    torch.manual_seed(b)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers)
    x, y = torch.randn(b, widths[0]), torch.randint(0, widths[-1], (b,))
    m64 = copy.deepcopy(model).double()
    x32 = x.clone().requires_grad_(True)
    out = gradreg_loss(model, x32, y, lam=0.7, backend="cpu")
    out.loss.backward()
    assert out.backend == "cpu"
    want, loss, _, _ = oracle_grads(m64, x.double(), y, lam=0.7)
    assert rel(out.loss.detach(), loss) < 1e-5
    got = {n: p.grad for n, p in model.named_parameters()}
    assert _global_rel(got, want) < 1e-4
    x64 = x.double().requires_grad_(True)
    (gx,) = torch.autograd.grad(oracle_loss(m64, x64, y, 0.7)[0], x64)
    assert rel(x32.grad, gx) < 1e-4


@pytest.mark.parametrize("b", [2, 130])  # the dᵀr term in pass 4 (b = 2) and in pass 3
def test_keep_saved_backward_twice_on_the_fast_paths(kernels, b):
    """keep_saved=True: a second backward adds the same gradients again (float32 kernels)."""
    torch.manual_seed(b)
    model = _fast_path_cnn()
    x, y = torch.randn(b, 1, 12, 12), torch.randint(0, 5, (b,))
    kept = gradreg_loss(model, x, y, 0.9, backend="cpu", keep_saved=True).loss
    kept.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    kept.backward()
    for g, p in zip(first, model.parameters(), strict=True):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-5, atol=1e-6)
