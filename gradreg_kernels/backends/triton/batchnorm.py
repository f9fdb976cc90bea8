"""Train-mode BatchNorm per channel: statistics, projection and second-order term.

A tensor (N, C, *spatial) is viewed as (N, C, S); channel c holds M = N·S values.
Each step on float32 operands is three launches: ``_channel_sums_kernel`` on a
(C, SPLITS) grid writes float32 partial sums (NV, C, SPLITS), one ``sum(-1)`` gives the
(NV, C) totals, and one flat kernel computes the per-channel arithmetic inline from the
totals and writes the per-element results:
    forward:   μ, var (about the shift), 1/σ; x̂ = (a − μ)/σ, y = γ x̂ + β   (_bn_forward_kernel)
    chain:     k P δ (k = γ/σ), P v = v − mean(v) − x̂ mean(x̂ v)          (_bn_project_kernel)
    tangent:   k P ṙ, s and Σ δ P ṙ / σ, P δ rebuilt from δ                 (_bn_tangent_kernel)
    backward:  k P ā + s; Σ ā x̂ and Σ ā are rows of the totals            (_bn_project_kernel)
    project:   P v and mean(x̂ v)                                  (_bn_project_kernel, k = 1)
    2nd order: s from P δ, P ṙ and the means                                (_bn_second_kernel)
with s = −(γ/σ²) [x̂ ⟨δ, Pṙ⟩/M + mean(x̂ ṙ) P δ + mean(x̂ δ) P ṙ]. A per-channel result
(μ, var, 1/σ; the means of δ; Σ δ P ṙ / σ) is stored in float32 by the program that
holds the channel's first element (flat index c·S, n = 0) and returned as it is for
float32 operands; for other dtypes one torch cast per step rounds them to the operands'
dtype. The variance is summed about a per-channel shift (the channel's first value) to
keep float32 cancellation small. The running statistics' update is one more launch
(``_bn_running_stats_kernel``, one program).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ...tensor_ops import channel_shape
from ._common import ELEMENT_BLOCK, INTERPRET, flat_grid, supported

_SUM_BLOCK = 1024
_STATS_BLOCK = 1024

MODE_SHIFTED = 0  # (Σ (x − x₀), Σ (x − x₀)²)
MODE_PAIR = 1     # (Σ x, Σ x·y)
MODE_DOT = 2      # (Σ x·y)
MODE_TRIPLE = 3   # (Σ x, Σ x·y, Σ x·z)

#: the number of sums (NV) each mode writes
N_SUMS = {MODE_SHIFTED: 2, MODE_PAIR: 2, MODE_DOT: 1, MODE_TRIPLE: 3}


@triton.jit(do_not_specialize=["m_size", "chunk"])
def _channel_sums_kernel(x_ptr, y_ptr, z_ptr, out_ptr, c_count, s_size, m_size, chunk,
                         MODE: tl.constexpr, BLOCK: tl.constexpr):
    """out[v, c, split] (NV, C, SPLITS) = the sums of ``MODE`` over the split's share of
    channel c's M values, in float32."""
    c = tl.program_id(0)
    sp = tl.program_id(1)
    n_splits = tl.num_programs(1)
    lo = sp * chunk
    base = tl.arange(0, BLOCK)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK], dtype=tl.float32)
    shift = tl.load(x_ptr + c * s_size).to(tl.float32)
    for start in range(0, chunk, BLOCK):
        i = lo + start + base
        m = (i < m_size) & (start + base < chunk)
        nn = i // s_size
        offs = (nn.to(tl.int64) * c_count + c) * s_size + (i - nn * s_size)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if MODE == 0:
            xs = tl.where(m, x - shift, 0.0)
            acc1 += xs
            acc2 += xs * xs
        elif MODE == 1:
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
            acc1 += x
            acc2 += x * y
        elif MODE == 2:
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
            acc1 += x * y
        else:
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
            acc1 += x
            acc2 += x * y
            acc3 += x * z
    out = out_ptr + c * n_splits + sp
    step = c_count * n_splits
    tl.store(out, tl.sum(acc1, axis=0))
    if MODE != 2:
        tl.store(out + step, tl.sum(acc2, axis=0))
    if MODE == 3:
        tl.store(out + 2 * step, tl.sum(acc3, axis=0))


@triton.jit(do_not_specialize=["n", "m_size", "eps"])
def _bn_forward_kernel(a_ptr, tot_ptr, g_ptr, b_ptr, g_stride, b_stride, y_ptr, xhat_ptr,
                       stats_ptr, n, c_count, s_size, m_size, eps, AFFINE: tl.constexpr,
                       BLOCK: tl.constexpr):
    """x̂ = (a − μ)/σ, y = γ x̂ + β from the shifted sums tot (2, C) = (Σ (a − a₀), Σ (a − a₀)²):
    μ = a₀ + Σ(a − a₀)/M, var = max(Σ(a − a₀)²/M − (μ − a₀)², 0), 1/σ = rsqrt(var + eps);
    the program holding channel c's first element stores stats[:, c] = (μ, var, 1/σ)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = (offs // s_size) % c_count
    shift = tl.load(a_ptr + c * s_size, mask=m, other=0.0).to(tl.float32)
    dm = tl.load(tot_ptr + c, mask=m, other=0.0) / m_size
    mean = shift + dm
    var = tl.load(tot_ptr + c_count + c, mask=m, other=0.0) / m_size - dm * dm
    var = tl.where(var < 0.0, 0.0, var)  # clamp at 0, NaN kept
    inv = tl.math.rsqrt(var + eps)
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xh = (a - mean) * inv
    tl.store(xhat_ptr + offs, xh.to(xhat_ptr.dtype.element_ty), mask=m)
    if AFFINE:  # without an affine, y is x̂ itself
        xh = (xh * tl.load(g_ptr + c * g_stride, mask=m, other=0.0).to(tl.float32)
              + tl.load(b_ptr + c * b_stride, mask=m, other=0.0).to(tl.float32))
        tl.store(y_ptr + offs, xh.to(y_ptr.dtype.element_ty), mask=m)
    first = m & (offs < c_count * s_size) & (offs % s_size == 0)
    tl.store(stats_ptr + c, mean, mask=first)
    tl.store(stats_ptr + c_count + c, var, mask=first)
    tl.store(stats_ptr + 2 * c_count + c, inv, mask=first)


@triton.jit(do_not_specialize=["n", "m_size"])
def _bn_project_kernel(v_ptr, xhat_ptr, tot_ptr, k_ptr, k_stride, add_ptr, out_ptr, means_ptr,
                       n, c_count, s_size, m_size, HAS_K: tl.constexpr, ADD: tl.constexpr,
                       MEANS: tl.constexpr, BLOCK: tl.constexpr):
    """out = k (v − mean(v) − x̂ mean(x̂ v)) (+ add) from tot (2, C) = (Σ v, Σ x̂ v) (k = 1
    without HAS_K); with MEANS the program holding channel c's first element stores
    means[:, c] = (mean(v), mean(x̂ v))."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = (offs // s_size) % c_count
    mv = tl.load(tot_ptr + c, mask=m, other=0.0) / m_size
    mxv = tl.load(tot_ptr + c_count + c, mask=m, other=0.0) / m_size
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xh = tl.load(xhat_ptr + offs, mask=m, other=0.0).to(tl.float32)
    out = v - mv - xh * mxv
    if HAS_K:
        out = out * tl.load(k_ptr + c * k_stride, mask=m, other=0.0).to(tl.float32)
    if ADD:
        out += tl.load(add_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)
    if MEANS:
        first = m & (offs < c_count * s_size) & (offs % s_size == 0)
        tl.store(means_ptr + c, mv, mask=first)
        tl.store(means_ptr + c_count + c, mxv, mask=first)


@triton.jit(do_not_specialize=["n", "m_size"])
def _bn_tangent_kernel(r_ptr, xhat_ptr, d_ptr, tot_ptr, means_ptr, k_ptr, k_stride, inv_ptr,
                       inv_stride, g_ptr, g_stride, out_ptr, s_out_ptr, tg_ptr, n, c_count,
                       s_size, m_size, BLOCK: tl.constexpr):
    """out = k P ṙ and s = coef (x̂ ⟨δ, Pṙ⟩/M + mean(x̂ ṙ) P δ + mean(x̂ δ) P ṙ), coef = −γ/σ²,
    from tot (3, C) = (Σ ṙ, Σ x̂ ṙ, Σ δ ṙ) and means (2, C) = (mean(δ), mean(x̂ δ));
    ⟨δ, P ṙ⟩ = Σ δ ṙ − mean(ṙ) Σ δ − mean(x̂ ṙ) Σ x̂ δ in float64. The program holding
    channel c's first element stores tg[c] = ⟨δ, P ṙ⟩ / σ."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = (offs // s_size) % c_count
    mr = tl.load(tot_ptr + c, mask=m, other=0.0) / m_size
    mxr = tl.load(tot_ptr + c_count + c, mask=m, other=0.0) / m_size
    sdr = tl.load(tot_ptr + 2 * c_count + c, mask=m, other=0.0)
    md = tl.load(means_ptr + c, mask=m, other=0.0)
    mxd = tl.load(means_ptr + c_count + c, mask=m, other=0.0)
    m64 = m_size.to(tl.float64)
    d_pr = (sdr.to(tl.float64) - mr.to(tl.float64) * m64 * md.to(tl.float64)
            - mxr.to(tl.float64) * m64 * mxd.to(tl.float64)).to(tl.float32)
    inv = tl.load(inv_ptr + c * inv_stride, mask=m, other=0.0).to(tl.float32)
    coef = -tl.load(g_ptr + c * g_stride, mask=m, other=0.0).to(tl.float32) * inv * inv
    r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xh = tl.load(xhat_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float32)
    pr = r - mr - xh * mxr
    pd = d - md - xh * mxd
    k = tl.load(k_ptr + c * k_stride, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (k * pr).to(out_ptr.dtype.element_ty), mask=m)
    sv = coef * (xh * (d_pr / m_size) + mxr * pd + mxd * pr)
    tl.store(s_out_ptr + offs, sv.to(s_out_ptr.dtype.element_ty), mask=m)
    first = m & (offs < c_count * s_size) & (offs % s_size == 0)
    tl.store(tg_ptr + c, d_pr * inv, mask=first)


@triton.jit(do_not_specialize=["n", "m_size"])
def _bn_second_kernel(xhat_ptr, pd_ptr, pr_ptr, tot_ptr, inv_ptr, inv_stride, g_ptr, g_stride,
                      mxr_ptr, mxr_stride, mxd_ptr, mxd_stride, out_ptr, n, c_count, s_size,
                      m_size, BLOCK: tl.constexpr):
    """out = −(γ/σ²) (x̂ mean(δ Pṙ) + mean(x̂ ṙ) P δ + mean(x̂ δ) P ṙ), tot (1, C) = Σ δ Pṙ."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = (offs // s_size) % c_count
    inv = tl.load(inv_ptr + c * inv_stride, mask=m, other=0.0).to(tl.float32)
    coef = -tl.load(g_ptr + c * g_stride, mask=m, other=0.0).to(tl.float32) * inv * inv
    dots = tl.load(tot_ptr + c, mask=m, other=0.0) / m_size
    mxr = tl.load(mxr_ptr + c * mxr_stride, mask=m, other=0.0).to(tl.float32)
    mxd = tl.load(mxd_ptr + c * mxd_stride, mask=m, other=0.0).to(tl.float32)
    xh = tl.load(xhat_ptr + offs, mask=m, other=0.0).to(tl.float32)
    pd = tl.load(pd_ptr + offs, mask=m, other=0.0).to(tl.float32)
    pr = tl.load(pr_ptr + offs, mask=m, other=0.0).to(tl.float32)
    out = coef * (xh * dots + mxr * pd + mxd * pr)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["c_count", "momentum", "keep", "bessel"])
def _bn_running_stats_kernel(mean_ptr, var_ptr, rm_ptr, rv_ptr, nbt_ptr, c_count, momentum,
                             keep, bessel, CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr):
    """One program: t = num_batches_tracked + 1 is written back; f = momentum (keep = 1 − f)
    or, with CUMULATIVE, f = 1/t (keep = 1 − 1/t, in float64); per channel
    running_mean ← keep · running_mean + f μ, running_var ← keep · running_var + f var·bessel
    (bessel = n/(n − 1): the unbiased variance)."""
    t = tl.load(nbt_ptr) + 1
    f = momentum
    k = keep
    if CUMULATIVE:
        f64 = 1.0 / t.to(tl.float64)
        f = f64.to(tl.float32)
        k = (1.0 - f64).to(tl.float32)
    for start in range(0, c_count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < c_count
        mu = tl.load(mean_ptr + offs, mask=m, other=0.0).to(tl.float32)
        var = tl.load(var_ptr + offs, mask=m, other=0.0).to(tl.float32)
        rm = tl.load(rm_ptr + offs, mask=m, other=0.0)
        rv = tl.load(rv_ptr + offs, mask=m, other=0.0)
        tl.store(rm_ptr + offs, rm * k + mu * f, mask=m)
        tl.store(rv_ptr + offs, rv * k + (var * bessel) * f, mask=m)
    tl.store(nbt_ptr, t)


def _geometry(t: Tensor) -> tuple[int, int, int]:
    """(N, C, S) of a (N, C, *spatial) tensor."""
    n, c = t.shape[0], t.shape[1]
    return n, c, t.numel() // max(1, n * c)


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index or 0).multi_processor_count


def _splits(m_size: int, c: int, device: torch.device) -> tuple[int, int]:
    """How many programs share one channel's reduction, and each one's chunk (≥ 1 block)."""
    target = 1 if device.type == "cpu" else max(1, (4 * _sm_count(device.index)) // max(1, c))
    splits = max(1, min(target, triton.cdiv(m_size, _SUM_BLOCK)))
    chunk = triton.cdiv(triton.cdiv(m_size, splits), _SUM_BLOCK) * _SUM_BLOCK
    return triton.cdiv(m_size, chunk), chunk


def channel_totals(x: Tensor, y: Tensor | None, z: Tensor | None, mode: int) -> Tensor:
    """The (NV, C) float32 sums of ``mode`` over contiguous (N, C, ...) operands: one
    reduction launch writing (NV, C, SPLITS) partial sums, then one sum over the splits."""
    n, c, s = _geometry(x)
    m_size = n * s
    splits, chunk = _splits(m_size, c, x.device)
    part = torch.empty((N_SUMS[mode], c, splits), dtype=torch.float32, device=x.device)
    _channel_sums_kernel[(c, splits)](x, x if y is None else y, x if z is None else z, part,
                                      c, s, m_size, chunk, MODE=mode, BLOCK=_SUM_BLOCK)
    return part.sum(-1)


def _chan(t: Tensor, c: int) -> tuple[Tensor, int]:
    """A per-channel operand (C values, or one for all channels; any broadcastable shape)
    as a flat tensor and the stride between channels."""
    t = t.reshape(-1)
    if t.numel() == 1:
        return t, 0
    if t.numel() != c:
        raise ValueError(f"expected {c} per-channel values, got {t.numel()}")
    return t, t.stride(0)


def _promote(*ts: Tensor | None) -> torch.dtype:
    dt = None
    for t in ts:
        if t is not None:
            dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    return dt


def bn_train_forward(a: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, x̂, 1/σ broadcastable, μ (C,), biased var (C,)) as TorchBackend.bn_train_forward;
    μ, var and 1/σ are the rows of one (3, C) tensor in a's dtype."""
    a = a.contiguous()
    n, c, s = _geometry(a)
    tot = channel_totals(a, None, None, MODE_SHIFTED)
    affine = gamma is not None
    y_dt = _promote(a, gamma, beta) if affine else a.dtype  # as γ x̂ + β promotes in torch
    xhat = torch.empty_like(a)
    y = torch.empty_like(a, dtype=y_dt) if affine else xhat  # one tensor, not two equal ones
    stats = torch.empty((3, c), dtype=torch.float32, device=a.device)
    g, g_stride = _chan(gamma, c) if affine else (a, 0)
    b, b_stride = _chan(beta, c) if affine else (a, 0)
    _bn_forward_kernel[flat_grid(a.numel())](a, tot, g, b, g_stride, b_stride, y, xhat, stats,
                                              a.numel(), c, s, n * s, eps, AFFINE=affine,
                                              BLOCK=ELEMENT_BLOCK)
    stats = stats.to(a.dtype)
    return y, xhat, stats[2].view(channel_shape(a)), stats[0], stats[1]


def bn_project(v: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
    """(P v, mean(x̂ v) broadcastable) as TorchBackend.bn_project, in their promoted dtype."""
    v, xhat = v.contiguous(), xhat.contiguous()
    n, c, s = _geometry(v)
    tot = channel_totals(v, xhat, None, MODE_PAIR)
    out = torch.empty_like(v, dtype=_promote(v, xhat))
    means = torch.empty((2, c), dtype=torch.float32, device=v.device)
    _bn_project_kernel[flat_grid(v.numel())](v, xhat, tot, tot, 0, v, out, means, v.numel(),
                                              c, s, n * s, HAS_K=False, ADD=False, MEANS=True,
                                              BLOCK=ELEMENT_BLOCK)
    return out, means[1].to(out.dtype).view(channel_shape(v))


def bn_second_order(xhat: Tensor, inv_std: Tensor, gamma_c: Tensor, delta: Tensor,
                    p_delta: Tensor, p_r: Tensor, mx_delta: Tensor, mx_r: Tensor) -> Tensor:
    """−(γ/σ²)[x̂ mean(δ Pṙ) + mean(x̂ṙ) Pδ + mean(x̂δ) Pṙ] as TorchBackend.bn_second_order."""
    xhat, delta = xhat.contiguous(), delta.contiguous()
    p_delta, p_r = p_delta.contiguous(), p_r.contiguous()
    n, c, s = _geometry(xhat)
    tot = channel_totals(delta, p_r, None, MODE_DOT)
    inv, inv_s = _chan(inv_std, c)
    g, g_s = _chan(gamma_c, c)
    mxr, mxr_s = _chan(mx_r, c)
    mxd, mxd_s = _chan(mx_delta, c)
    dt = _promote(xhat, inv_std, gamma_c, delta, p_delta, p_r, mx_delta, mx_r)
    out = torch.empty(xhat.shape, dtype=dt, device=xhat.device)
    _bn_second_kernel[flat_grid(xhat.numel())](
        xhat, p_delta, p_r, tot, inv, inv_s, g, g_s, mxr, mxr_s, mxd, mxd_s, out, xhat.numel(),
        c, s, n * s, BLOCK=ELEMENT_BLOCK)
    return out


@dataclass
class BnChainState:
    """What ``bn_chain`` keeps for ``bn_tangent``: δ and its float32 channel means,
    ``means`` (2, C) = (mean(δ), mean(x̂ δ))."""

    d: Tensor
    means: Tensor

    @property
    def md(self) -> Tensor:
        return self.means[0]

    @property
    def mxd(self) -> Tensor:
        return self.means[1]


def bn_chain(d: Tensor, xhat: Tensor, k: Tensor
             ) -> tuple[Tensor, BnChainState, tuple[Tensor, Tensor]]:
    """(k P δ, the state for bn_tangent, (mean(δ), mean(x̂ δ))) as TorchBackend.bn_chain."""
    d, xhat = d.contiguous(), xhat.contiguous()
    n, c, s = _geometry(d)
    tot = channel_totals(d, xhat, None, MODE_PAIR)
    out = torch.empty_like(d, dtype=_promote(d, xhat))
    means = torch.empty((2, c), dtype=torch.float32, device=d.device)
    kf, k_stride = _chan(k, c)
    _bn_project_kernel[flat_grid(d.numel())](d, xhat, tot, kf, k_stride, d, out, means,
                                              d.numel(), c, s, n * s, HAS_K=True, ADD=False,
                                              MEANS=True, BLOCK=ELEMENT_BLOCK)
    cast = means.to(out.dtype)
    return out, BnChainState(d, means), (cast[0], cast[1])


def bn_tangent(state: BnChainState, r: Tensor, xhat: Tensor, k: Tensor, inv_std: Tensor,
               gamma_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(k P ṙ, s, Σ δ P ṙ / σ) as TorchBackend.bn_tangent, from bn_chain's state: one
    reduction of (Σ ṙ, Σ x̂ ṙ, Σ δ ṙ), with
    ⟨δ, P ṙ⟩ = Σ δ ṙ − mean(ṙ) Σ δ − mean(x̂ ṙ) Σ x̂ δ per channel (in float64)."""
    r, xhat = r.contiguous(), xhat.contiguous()
    n, c, s = _geometry(r)
    tot = channel_totals(r, xhat, state.d, MODE_TRIPLE)
    dt = _promote(r, xhat, state.d)
    out, s_out = torch.empty_like(r, dtype=dt), torch.empty_like(r, dtype=dt)
    tan_gamma = torch.empty(c, dtype=torch.float32, device=r.device)
    kf, k_s = _chan(k, c)
    inv, inv_s = _chan(inv_std, c)
    g, g_s = _chan(gamma_c, c)
    _bn_tangent_kernel[flat_grid(r.numel())](r, xhat, state.d, tot, state.means, kf, k_s, inv,
                                              inv_s, g, g_s, out, s_out, tan_gamma, r.numel(),
                                              c, s, n * s, BLOCK=ELEMENT_BLOCK)
    return out, s_out, tan_gamma.to(dt)


def bn_backward(abar: Tensor, xhat: Tensor, k: Tensor, s_term: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(k P ā (+ s), Σ ā x̂, Σ ā) as TorchBackend.bn_backward; the two sums are the rows of
    the reduction's (2, C) totals."""
    abar, xhat = abar.contiguous(), xhat.contiguous()
    n, c, s = _geometry(abar)
    tot = channel_totals(abar, xhat, None, MODE_PAIR)
    if s_term is not None:
        s_term = s_term.contiguous()
    dt = _promote(abar, xhat, s_term)
    out = torch.empty_like(abar, dtype=dt)
    kf, k_stride = _chan(k, c)
    _bn_project_kernel[flat_grid(abar.numel())](
        abar, xhat, tot, kf, k_stride, abar if s_term is None else s_term, out, tot,
        abar.numel(), c, s, n * s, HAS_K=True, ADD=s_term is not None, MEANS=False,
        BLOCK=ELEMENT_BLOCK)
    tot = tot.to(dt)
    return out, tot[1], tot[0]


def running_stats_supported(m: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor
                            ) -> bool:
    """Whether ``update_running_stats`` takes these: float32 running statistics, an int64
    counter and contiguous (C,) batch statistics, all on one device the kernels run on."""
    rm, rv, nbt = m.running_mean, m.running_var, m.num_batches_tracked
    if rm is None or rv is None or nbt is None or not supported(mean, var):
        return False
    dev = rm.device
    return (dev.type == ("cpu" if INTERPRET else "cuda")
            and rm.dtype == rv.dtype == torch.float32 and nbt.dtype == torch.int64
            and nbt.numel() == 1 and all(t.device == dev for t in (rv, nbt, mean, var))
            and all(t.is_contiguous() and t.numel() == rm.numel() for t in (rv, mean, var))
            and rm.is_contiguous())


def update_running_stats(m: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor,
                         n: int) -> None:
    """m's running statistics after a batch of n values per channel with mean μ and biased
    variance var (C,), as nn.BatchNorm's forward updates them (num_batches_tracked + 1,
    momentum or the cumulative average 1/num_batches_tracked, the unbiased variance), in one
    launch that reads the counter on the device."""
    rm, rv, nbt = m.running_mean, m.running_var, m.num_batches_tracked
    cumulative = m.momentum is None
    f = 0.0 if cumulative else float(m.momentum)
    _bn_running_stats_kernel[(1,)](mean, var, rm, rv, nbt, rm.numel(), f, 1.0 - f,
                                   n / (n - 1), CUMULATIVE=cumulative, BLOCK=_STATS_BLOCK)
    torch.autograd.graph.increment_version((rm, rv, nbt))  # written in place, as add_ does
