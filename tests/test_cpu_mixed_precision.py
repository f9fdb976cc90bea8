"""The cpu backend under CPU autocast (docs/math.md, "Precision").

With bf16 products native here, the fused step's products run in bf16 and its masked,
pooling and reduction kernels read and write bf16. Its gradients must be as close to the
float64 oracle as eager autocast double backprop's own gradients on the same inputs, for
every layer kind, the penalty's own gradient too (value_weight = 0). A float16 autocast
(no reduced-precision kernels for it; emulated products on most CPUs) runs the step in
float32 and says so.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradreg_kernels import get_backend, gradreg_loss
from gradreg_kernels.backends import cpu_autocast
from reference import oracle_grads

try:
    get_backend("cpu", torch.device("cpu"))
except (RuntimeError, ValueError) as e:  # no compiler / no oneDNN here
    pytest.skip(f"cpu backend unavailable: {e}", allow_module_level=True)

BF16_NATIVE = cpu_autocast.native(torch.bfloat16)
needs_bf16 = pytest.mark.skipif(not BF16_NATIVE, reason="no native bf16 products on this CPU")
LAM = 0.3


def _mlp(act: type[nn.Module], *args) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(75, 45), act(*args), nn.Linear(45, 37),
                         act(*args), nn.Linear(37, 7))


MODELS = {
    "relu": lambda: _mlp(nn.ReLU),
    "leaky_relu": lambda: _mlp(nn.LeakyReLU, 0.2),
    "softplus": lambda: _mlp(nn.Softplus),
    "silu": lambda: _mlp(nn.SiLU),
    "tanh": lambda: _mlp(nn.Tanh),
    "conv_bn_pool": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12, 40), nn.BatchNorm1d(40), nn.ReLU(),
        nn.Dropout(0.3), nn.Linear(40, 7)),
    "norms_gelu": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 25, 33), nn.LayerNorm(33), nn.GELU(), nn.Linear(33, 7)),
    "first_conv_fold": lambda: nn.Sequential(  # G = Wᵀ δ and the fold (C ≤ 3, O ≥ C·kh·kw)
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4, 40), nn.SiLU(), nn.Linear(40, 7)),
    "wide_head": lambda: nn.Sequential(  # a last layer above the thin kernels' 16 outputs
        nn.Flatten(), nn.Linear(75, 41), nn.ReLU(), nn.Linear(41, 23)),
}


def _inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    k = 23 if name == "wide_head" else 7
    return (torch.randn(13, 3, 5, 5, generator=g),
            torch.randint(0, k, (13,), generator=g))


def _rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """‖got − ref‖ / ‖ref‖ over all parameter gradients as one vector."""
    num = sum(((got[n].double() - r) ** 2).sum() for n, r in ref.items())
    return float(num.sqrt() / sum((r ** 2).sum() for r in ref.values()).sqrt())


def _fused(model: nn.Module, x, y, value_weight: float, dtype) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype):
        gradreg_loss(model, x, y, LAM, backend="cpu", value_weight=value_weight).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _three_ways(name: str, value_weight: float):
    """(fused bf16 error, eager bf16 error) against the float64 oracle, one draw of dropout."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    x, y = _inputs(name)
    torch.manual_seed(1)  # every step below draws the same dropout mask
    ref = oracle_grads(copy.deepcopy(model).double(), x.double(), y, LAM,
                       value_weight=value_weight)[0]
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = oracle_grads(model, x, y, LAM, value_weight=value_weight)[0]
    fused = _fused(model, x, y, value_weight, torch.bfloat16)
    return _rel(fused, ref), _rel(eager, ref)


@needs_bf16
@pytest.mark.parametrize("value_weight", [1.0, 0.0])
@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_gradients_as_close_to_the_oracle_as_eager_autocast(name, value_weight):
    fused_err, eager_err = _three_ways(name, value_weight)
    # a float32 step would be ~1e-6 off: the comparison is bf16 against bf16
    assert fused_err > 1e-4, f"{name}: the step did not run in bf16 ({fused_err:.1e})"
    assert fused_err <= 1.25 * eager_err, (
        f"{name}: fused bf16 error {fused_err:.2e} > eager autocast's {eager_err:.2e}")


class _ProductDtypes(TorchDispatchMode):
    """The operand dtypes of every library product a step makes."""

    OPS = ("aten.mm", "aten.addmm", "aten.convolution", "aten.convolution_backward",
           "mkldnn._linear_pointwise", "aten.mkldnn_convolution")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).rsplit(".", 1)[0]
        if name in self.OPS:
            dts = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.append((name, dts))
        return func(*args, **(kwargs or {}))


@needs_bf16
@pytest.mark.parametrize("name", ["relu", "silu", "conv_bn_pool", "first_conv_fold",
                                  "wide_head"])
def test_every_library_product_runs_in_bf16(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    x, y = _inputs(name)
    rec = _ProductDtypes()
    with rec, torch.autocast("cpu", dtype=torch.bfloat16):
        gradreg_loss(model, x, y, LAM, backend="cpu").loss.backward()
    assert rec.seen, "no library product recorded"
    wrong = [(op, dts) for op, dts in rec.seen if dts != {torch.bfloat16}]
    assert not wrong, f"products outside bf16: {wrong}"


@needs_bf16
def test_parameter_gradients_are_float32():
    torch.manual_seed(0)
    model = MODELS["conv_bn_pool"]()
    x, y = _inputs("conv_bn_pool")
    grads = _fused(model, x, y, 1.0, torch.bfloat16)
    assert {g.dtype for g in grads.values()} == {torch.float32}


def test_float16_autocast_runs_in_float32_and_says_so():
    torch.manual_seed(0)
    model = MODELS["conv_bn_pool"]()
    x, y = _inputs("conv_bn_pool")
    cpu_autocast._SAID.discard(torch.float16)
    with pytest.warns(RuntimeWarning, match="float32 under this autocast"):
        half = _fused(model, x, y, 1.0, torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        _fused(model, x, y, 1.0, torch.float16)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    gradreg_loss(model, x, y, LAM, backend="cpu").loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert _rel(half, {n: g.double() for n, g in plain.items()}) < 1e-6


# ---- the kernels' bf16 operands, against torch's own bf16 ops ----------------------------

def _ext():
    from gradreg_kernels.backends.cpu import extension
    return extension()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 1001])
@pytest.mark.parametrize("lo", [0.0, 0.2])
@pytest.mark.parametrize("dt_in,dt_out", [(torch.bfloat16, torch.bfloat16),
                                          (torch.float32, torch.bfloat16),
                                          (torch.bfloat16, torch.float32),
                                          (torch.float32, torch.float32)])
def test_mask_kernels_read_and_write_bf16(n, lo, dt_in, dt_out):
    """The 16-lane (AVX-512), 8-lane (AVX2) and scalar sweeps against torch, at sizes that
    leave a tail for each, NaN included (ReLU keeps its bit on, LeakyReLU off)."""
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, generator=g).to(dt_in)
    z[0] = float("nan") if n > 1 else z[0]
    y, bits, finite = _ext().mask_forward(z, lo, dt_out)
    want = torch.nn.functional.leaky_relu(z.float(), lo).to(dt_out)
    fin = torch.isfinite(z)
    assert y.dtype == dt_out and torch.equal(y[fin], want[fin])
    assert finite == bool(fin.all())
    t = torch.randn(n, generator=g).to(dt_in)
    out = _ext().mask_apply(bits, t, 1.25, lo, dt_out)
    on = (z.float() > 0) if lo else ~(z.float() <= 0)
    want_t = torch.where(on, t.float() * 1.25, t.float() * lo).to(dt_out)
    assert out.dtype == dt_out and torch.equal(out, want_t)


@pytest.mark.parametrize("shape", [(2, 3, 9, 9), (1, 1, 4, 6), (3, 2, 7, 5)])
def test_pool_kernels_read_and_write_bf16(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape, generator=g).bfloat16()
    y, idx = _ext().max_pool2d(a, 2, 2, 2, 2, 0, 0, 1, 1, False)
    want, want_idx = torch.nn.functional.max_pool2d(a.float(), 2, return_indices=True)
    assert y.dtype == torch.bfloat16 and torch.equal(y.float(), want)
    assert torch.equal(idx, want_idx)
    r = torch.randn(shape, generator=g).bfloat16()
    assert torch.equal(_ext().pool_gather(r, idx),
                       r.flatten(2).gather(2, idx.flatten(2)).view_as(idx))
    d = torch.randn(y.shape, generator=g).bfloat16()
    back = _ext().pool_scatter(d, idx, shape[2] * shape[3]).view(shape)
    want_back = torch.zeros(shape).flatten(2).scatter_add(
        2, idx.flatten(2), d.float().flatten(2)).view(shape)
    assert back.dtype == torch.bfloat16 and torch.equal(back.float(), want_back)


def test_reductions_read_bf16():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(70_001, generator=g).bfloat16()
    s, want = _ext().sum_squares(t), float((t.double() ** 2).sum())
    assert s.dtype == torch.float32
    assert abs(float(s) - want) < 2e-4 * want  # float sums per 65 536 values, then double
    assert _ext().all_finite(t)
    t[12_345] = float("inf")
    assert not _ext().all_finite(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 2, 1, 1), (4, 33, 2, 3)])
def test_conv_bias_gradient_sums_each_channel_in_float32(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    d = torch.randn(shape, generator=g).to(dtype)
    got = get_backend("cpu", torch.device("cpu")).conv2d_bias_grad(d)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), d.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


# one bf16 ulp: the bf16 sweeps compute in float32 as the float32 ones do, and round once
BF16_ULP = dict(rtol=2.0 ** -8, atol=1e-30)
SMOOTH = {"softplus": (2, 1.0, 20.0), "tanh": (3, 0.0, 0.0), "sigmoid": (4, 0.0, 0.0),
          "gelu": (5, 0.0, 0.0), "gelu_tanh": (6, 0.0, 0.0), "elu": (7, 1.0, 0.0),
          "silu": (8, 0.0, 0.0), "mish": (9, 0.0, 0.0), "hardswish": (10, 0.0, 0.0)}
FROM_OUTPUT = ("softplus", "tanh", "sigmoid", "elu")


@pytest.mark.parametrize("n", [1, 17, 8193, 20_000])
@pytest.mark.parametrize("name", list(SMOOTH))
def test_smooth_sweeps_read_and_write_bf16(name, n):
    """Each sweep on bf16 operands = the float32 sweep on the same (widened) values, rounded."""
    kind, p0, p1 = SMOOTH[name]
    ext = _ext()
    g = torch.Generator().manual_seed(n + kind)
    z, t, s, u = (torch.randn(n, generator=g).mul(3).bfloat16() for _ in range(4))
    y = ext.smooth_value(z, kind, p0, p1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ext.smooth_value(z.float(), kind, p0, p1)
                               .bfloat16().float(), **BF16_ULP)
    kept = y if name in FROM_OUTPUT else z
    mul_add = ext.output_mul_add if name in FROM_OUTPUT else ext.z_mul_add
    tangent = ext.output_tangent if name in FROM_OUTPUT else ext.z_tangent
    for extra in (None, s):
        got = mul_add(kept, t, extra, kind, p0, p1)
        want = mul_add(kept.float(), t.float(), None if extra is None else extra.float(),
                       kind, p0, p1)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.bfloat16().float(), **BF16_ULP)
    o1, o2 = tangent(kept, t, u, kind, p0, p1)
    w1, w2 = tangent(kept.float(), t.float(), u.float(), kind, p0, p1)
    assert o1.dtype == o2.dtype == torch.bfloat16
    torch.testing.assert_close(o1.float(), w1.bfloat16().float(), **BF16_ULP)
    torch.testing.assert_close(o2.float(), w2.bfloat16().float(), **BF16_ULP)


def test_smooth_sweeps_refuse_operands_of_another_dtype():
    z = torch.randn(9).bfloat16()
    with pytest.raises(RuntimeError, match="dtype"):
        _ext().z_mul_add(z, torch.randn(9), None, 8, 0.0, 0.0)


@pytest.mark.parametrize("k", [1, 7, 10, 16])
@pytest.mark.parametrize("n,width", [(1, 5), (13, 33), (70, 512)])
def test_thin_kernels_read_bf16_activations(k, n, width):
    """a (and u) in bf16 give the float32 kernels' results on the widened values."""
    ext = _ext()
    g = torch.Generator().manual_seed(k * n + width)
    a = torch.randn(n, width, generator=g).bfloat16()
    w, b = torch.randn(k, width, generator=g), torch.randn(k, generator=g)
    d = torch.randn(n, k, generator=g)
    z = ext.thin_linear(a, w, b)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, ext.thin_linear(a.float(), w, b), rtol=1e-6, atol=1e-5)
    u = ext.thin_input_grad(d, w, torch.bfloat16)
    assert u.dtype == torch.bfloat16
    torch.testing.assert_close(u.float(), ext.thin_input_grad(d, w).bfloat16().float(),
                               **BF16_ULP)
    r = torch.randn(n, width, generator=g)  # one pair bf16, one float32
    gw, gb = ext.thin_weight_grad([d, d], [a, r], None, True)
    want, want_b = ext.thin_weight_grad([d, d], [a.float(), r], None, True)
    torch.testing.assert_close(gw, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gb, want_b)
    torch.testing.assert_close(gw.double(), d.double().t() @ (a.double() + r.double()),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dts", [(torch.bfloat16, torch.bfloat16),
                                 (torch.float32, torch.bfloat16),
                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(1,), (3, 17), (512, 784)])
def test_widened_sum_is_the_float32_sum(shape, dts):
    g = torch.Generator().manual_seed(len(shape))
    a, b = (torch.randn(shape, generator=g).to(dt) for dt in dts)
    got = _ext().widened_sum(a, b)
    assert got.dtype == torch.float32 and torch.equal(got, a.float() + b.float())


def test_widened_sum_refuses_other_shapes():
    with pytest.raises(RuntimeError, match="shapes differ"):
        _ext().widened_sum(torch.randn(3, 4).bfloat16(), torch.randn(4, 3).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (256, 512), (3001, 17), (0, 5)])
def test_row_sums_of_a_matrix_in_float32(dtype, shape):
    """channel_sum of (R, C): a linear layer's bias gradient, Σ over the rows per column."""
    g = torch.Generator().manual_seed(sum(shape))
    t = torch.randn(shape, generator=g).to(dtype)
    got = _ext().channel_sum(t)
    assert got.dtype == torch.float32 and got.shape == (shape[1],)
    torch.testing.assert_close(got.double(), t.double().sum(0), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geom", [(3, 1, 5, 5, 28, 28, 2, 2), (2, 3, 3, 3, 7, 9, 1, 1),
                                  (1, 2, 4, 3, 6, 5, 0, 2), (2, 1, 3, 3, 5, 5, 3, 0),
                                  (1, 1, 1, 1, 4, 4, 0, 0), (2, 2, 5, 5, 3, 4, 2, 2)])
def test_col_fold_is_torch_fold(geom, dtype):
    n, c, kh, kw, h, w, ph, pw = geom
    hd, wd = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    g = torch.Generator().manual_seed(sum(geom))
    cols = torch.randn(n, c * kh * kw, hd * wd, generator=g).to(dtype)
    got = _ext().col_fold(cols, c, kh, kw, h, w, ph, pw)
    want = torch.nn.functional.fold(cols.double(), (h, w), (kh, kw), padding=(ph, pw))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


def test_col_fold_refuses_a_mismatched_column_matrix():
    with pytest.raises(RuntimeError, match="cols must be"):
        _ext().col_fold(torch.randn(2, 9, 20), 1, 3, 3, 5, 5, 1, 1)


@pytest.mark.parametrize("n", [0, 1, 17, 16_384, 70_001])
def test_narrowed_copies_are_torch_casts_and_say_whether_finite(n):
    g = torch.Generator().manual_seed(n)
    ts = [torch.randn(n, generator=g), torch.randn(3, 5, generator=g) * 1e38]
    copies, finite = _ext().narrowed_all_finite(ts)
    assert finite
    for t, c in zip(ts, copies):
        assert c.dtype == torch.bfloat16 and torch.equal(c.view(torch.int16),
                                                         t.bfloat16().view(torch.int16))
    if n:
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = ts[0].clone()
            t[n // 2] = bad
            assert not _ext().narrowed_all_finite([ts[1], t])[1]


@needs_bf16
def test_the_parameter_check_hands_its_bf16_copies_to_the_products_once():
    be = get_backend("cpu", torch.device("cpu"))
    lin = nn.Linear(40, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert be.all_finite_many(list(lin.parameters()))
        w = lin.weight.detach()
        first = be.product_weight(w)
        assert torch.equal(first, w.bfloat16())
        again = be.product_weight(w)  # taken once: a fresh cast now
        assert again is not first and torch.equal(again, first)
        be.all_finite_many(list(lin.parameters()))
        with torch.no_grad():
            lin.weight.add_(1.0)  # an optimizer step after the check: the copy is stale
        assert torch.equal(be.product_weight(lin.weight.detach()), lin.weight.detach().bfloat16())


@needs_bf16
def test_steps_with_and_without_the_parameter_check_agree_across_optimizer_steps():
    torch.manual_seed(0)
    x, y = _inputs("relu")
    grads = []
    for check in (True, False):
        model = MODELS["relu"]()
        torch.manual_seed(0)
        model.load_state_dict(MODELS["relu"]().state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                gradreg_loss(model, x, y, LAM, backend="cpu", check_finite=check).loss.backward()
            opt.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
