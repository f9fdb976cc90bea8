"""ConvTranspose2dRule and UpsampleNearestRule, each pass driven directly in float64 against
torch autograd / torch.func: forward = the module, chain = the vjp, tangent = the jvp (J r),
and after the four passes param_grads() = ∇_θ (⟨d, A_θ r⟩ + ⟨ā, F(a; θ)⟩) and the returned
input gradient = Jᵀ ā."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vjp

import gradreg_kernels.backends
from gradreg_kernels.rules.conv_transpose import (
    ConvTranspose2dRule,
    conv_transpose2d_unsupported,
)
from gradreg_kernels.rules.upsample import UpsampleNearestRule, upsample_unsupported

DT = torch.float64
RTOL = 1e-10

# torch.func.jvp's first call loads decompositions through torch.jit.script (torch's own)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


@pytest.fixture
def kernels():
    return gradreg_kernels.backends.get_backend("torch", torch.device("cpu"))


def assert_close(got: Tensor | None, want: Tensor) -> None:
    """|got − want| ≤ 1e-10 · max|want| everywhere (a relative bound that tolerates zeros)."""
    assert got is not None
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert scale > 0, "a degenerate reference"
    assert err <= RTOL * scale, f"max error {err:.3e} vs scale {scale:.3e}"


# ---- ConvTranspose2d ---------------------------------------------------------------------

# (N, C_in, C_out, kernel, stride, padding, output_padding, dilation, groups, bias, H, W)
CONVT_CASES = [
    (1, 3, 5, 3, 2, 1, 1, 1, 1, True, 7, 5),
    (3, 6, 10, (3, 2), (2, 1), (1, 0), (1, 0), 2, 2, False, 5, 9),
    (3, 6, 6, 3, 1, 2, 1, 2, 2, True, 5, 7),  # output_padding ≥ stride (dilation 2)
    (1, 5, 3, 4, 3, 2, 2, 1, 1, True, 3, 5),
    (3, 2, 3, (1, 3), (2, 3), (0, 1), (1, 2), (1, 3), 1, True, 9, 3),
    (1, 6, 9, 2, 2, 0, 0, 1, 3, False, 1, 1),
]
CONVT_IDS = [f"case{i}" for i in range(len(CONVT_CASES))]


def make_convt(case, w_grad: bool = True, b_grad: bool = True) -> tuple[nn.ConvTranspose2d,
                                                                          Tensor]:
    n, cin, cout, k, s, p, op, dil, g, bias, h, w = case
    m = nn.ConvTranspose2d(cin, cout, k, stride=s, padding=p, output_padding=op, groups=g,
                           bias=bias, dilation=dil).to(DT)
    m.weight.requires_grad_(w_grad)
    if m.bias is not None:
        with torch.no_grad():
            m.bias.normal_()
        m.bias.requires_grad_(b_grad)
    return m, torch.randn(n, cin, h, w, dtype=DT)


def convt_linear(m: nn.ConvTranspose2d, x: Tensor, w: Tensor | None = None) -> Tensor:
    """A_W x (no bias), W the module's weight unless given."""
    return F.conv_transpose2d(x, m.weight if w is None else w, None, m.stride, m.padding,
                              m.output_padding, m.groups, m.dilation)


@pytest.mark.parametrize("case", CONVT_CASES, ids=CONVT_IDS)
@pytest.mark.parametrize("grads", [(True, True), (False, True), (True, False)],
                         ids=["wb", "frozen_w", "frozen_b"])
@pytest.mark.parametrize("need_input_grad", [True, False])
def test_conv_transpose_four_passes(kernels, case, grads, need_input_grad):
    m, a = make_convt(case, *grads)
    rule = ConvTranspose2dRule(m, kernels)
    with torch.no_grad():
        z = rule.forward(a)
    want_z = m(a).detach()
    assert_close(z, want_z)
    assert (rule.a is not None) == m.weight.requires_grad  # a only for the weight gradient

    d, r, abar = torch.randn_like(z), torch.randn_like(a), torch.randn_like(z)
    _, pull = vjp(lambda x: m(x), a)
    with torch.no_grad():
        g = rule.chain(d)
    assert_close(g, pull(d)[0].detach())

    with torch.no_grad():
        jr = rule.tangent(r)
    assert_close(jr, jvp(lambda x: m(x), (a,), (r,))[1].detach())
    assert rule.d is None  # released in the tangent pass (keep_saved is off)

    with torch.no_grad():
        abar_in = rule.backward(abar, need_input_grad)
    if need_input_grad:
        assert_close(abar_in, pull(abar)[0].detach())
    else:
        assert abar_in is None

    params = [p for p in (m.weight, m.bias) if p is not None and p.requires_grad]
    got = rule.param_grads()
    assert [p for p, _ in got] == params
    if not params:  # nothing to learn here (frozen weight, no bias)
        return
    objective = (d * convt_linear(m, r)).sum() + (abar * m(a)).sum()
    want = torch.autograd.grad(objective, params)
    for (_, gp), wp in zip(got, want):
        assert_close(gp, wp)
    assert rule.gw_tangent is None


@pytest.mark.parametrize("case", CONVT_CASES[:3], ids=CONVT_IDS[:3])
def test_conv_transpose_keep_saved_reruns(kernels, case):
    """Under keep_saved, passes 3-4 run twice with the same results (d and the tangent
    term kept)."""
    m, a = make_convt(case)
    rule = ConvTranspose2dRule(m, kernels)
    rule.set_keep_saved(True)
    with torch.no_grad():
        z = rule.forward(a)
        d, r, abar = torch.randn_like(z), torch.randn_like(a), torch.randn_like(z)
        rule.chain(d)
        runs = []
        for _ in range(2):
            jr = rule.tangent(r)
            g_in = rule.backward(abar)
            runs.append([jr, g_in] + [g.clone() for _, g in rule.param_grads()])
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_conv_transpose_unsupported():
    m = nn.ConvTranspose2d(3, 4, 3)
    assert conv_transpose2d_unsupported(m) is None
    m.padding_mode = "reflect"  # the constructor refuses it; set afterwards
    reason = conv_transpose2d_unsupported(m)
    assert reason is not None and "padding_mode" in reason
    with pytest.raises(ValueError, match="padding_mode"):
        ConvTranspose2dRule(m, None)


# ---- nearest upsampling ------------------------------------------------------------------

# (input shape, size, scale_factor, recompute_scale_factor)
UPSAMPLE_CASES = [
    ((1, 3, 5), None, 2, None),
    ((3, 5, 7), None, 2.5, None),
    ((3, 5, 7), 11, None, None),
    ((1, 3, 9), 4, None, None),  # down-sampling
    ((3, 5, 7), None, 1.7, True),
    ((1, 3, 5, 7), None, 2, None),
    ((3, 5, 5, 7), None, (1.7, 2.3), None),
    ((3, 5, 5, 7), (11, 13), None, None),
    ((3, 5, 5, 7), None, 1.7, True),
    ((1, 3, 9, 7), None, (0.6, 1.5), None),  # down-sampling in H
    ((3, 5, 7, 9), (4, 5), None, None),
    ((1, 3, 3, 5, 4), None, (1.5, 2, 1.3), None),
    ((3, 2, 3, 3, 5), (5, 7, 6), None, None),
]
UPSAMPLE_IDS = [f"case{i}" for i in range(len(UPSAMPLE_CASES))]


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("case", UPSAMPLE_CASES, ids=UPSAMPLE_IDS)
@pytest.mark.parametrize("need_input_grad", [True, False])
def test_upsample_four_passes(case, mode, need_input_grad):
    shape, size, sf, recompute = case
    m = nn.Upsample(size=size, scale_factor=sf, mode=mode, recompute_scale_factor=recompute)
    rule = UpsampleNearestRule(m.size, m.scale_factor, m)
    assert rule.mode == mode and rule.recompute_scale_factor == recompute

    def f(x: Tensor) -> Tensor:
        return F.interpolate(x, size=size, scale_factor=sf, mode=mode,
                             recompute_scale_factor=recompute)

    a = torch.randn(shape, dtype=DT)
    y = rule.forward(a)
    assert torch.equal(y, f(a)) and torch.equal(y, m(a))
    d, r, abar = torch.randn_like(y), torch.randn_like(a), torch.randn_like(y)
    _, pull = vjp(f, a)
    assert_close(rule.chain(d), pull(d)[0])
    assert_close(rule.tangent(r), jvp(f, (a,), (r,))[1])
    got = rule.backward(abar, need_input_grad)
    if need_input_grad:
        assert_close(got, pull(abar)[0])
    else:
        assert got is None
    assert rule.param_grads() == []
    assert not rule.has_trainable_params()


def test_upsample_plain_arguments_and_nearest2d_module():
    """Without a module the rule is mode 'nearest' with recompute_scale_factor=None; an
    nn.UpsamplingNearest2d is a nearest nn.Upsample."""
    a = torch.randn(3, 5, 5, 7, dtype=DT)
    rule = UpsampleNearestRule(None, 1.7)
    y = rule.forward(a)
    assert torch.equal(y, F.interpolate(a, scale_factor=1.7, mode="nearest"))
    abar = torch.randn_like(y)
    _, pull = vjp(lambda x: F.interpolate(x, scale_factor=1.7, mode="nearest"), a)
    assert_close(rule.backward(abar), pull(abar)[0])
    m = nn.UpsamplingNearest2d(scale_factor=2)
    rule = UpsampleNearestRule(m.size, m.scale_factor, m)
    assert torch.equal(rule.forward(a), m(a))


def test_upsample_unsupported():
    assert upsample_unsupported("nearest") is None
    assert upsample_unsupported("nearest-exact", None, True, None) is None
    for mode in ("bilinear", "linear", "bicubic", "trilinear", "area"):
        reason = upsample_unsupported(mode, False)
        assert reason is not None and "only mode='nearest'" in reason
        with pytest.raises(ValueError, match="only mode='nearest'"):
            UpsampleNearestRule(None, 2.0, nn.Upsample(scale_factor=2.0, mode=mode))
    assert upsample_unsupported("nearest", True) is not None
    assert upsample_unsupported("nearest", None, True, (4, 4)) is not None
    for size, sf in ((None, None), (4, 2.0)):
        with pytest.raises(ValueError, match="exactly one"):
            UpsampleNearestRule(size, sf)
    with pytest.raises(ValueError, match="4-D"):
        UpsampleNearestRule(None, 2.0).forward(torch.randn(3, 4, dtype=DT))
