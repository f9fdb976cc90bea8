"""Train-mode BatchNorm per channel: statistics, projection and second-order term.

A tensor (N, C, *spatial) is viewed as (N, C, S); channel c holds M = N·S values.
Reductions run on a (C, SPLITS) grid writing float32 partial sums (``_channel_sums_kernel``);
the C-sized finishing arithmetic is a few tiny torch ops; the per-element results come
from one flat kernel each:
    forward:   x̂ = (a − μ) / σ,  y = γ x̂ + β                    (_bn_normalize_kernel)
    project:   P v = v − mean(v) − x̂ mean(x̂ v)          (_bn_scaled_project_kernel, k = 1)
    2nd order: s = −(γ/σ²) [x̂ mean(δ Pṙ) + mean(x̂ ṙ) Pδ + mean(x̂ δ) Pṙ]  (_bn_second_kernel)
and, fused per pass of the schedule (one reduction launch or two, then one flat kernel):
    chain:     k P δ (k = γ/σ) with the channel means of δ and x̂ δ   (_bn_scaled_project_kernel)
    tangent:   k P ṙ and s, P δ recomputed from δ                    (_bn_tangent_kernel)
    backward:  k P ā + s, Σ ā x̂, Σ ā                                 (_bn_scaled_project_kernel)
The variance is summed about a per-channel shift (the channel's first value) to keep
float32 cancellation small.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...tensor_ops import channel_shape
from ._common import ELEMENT_BLOCK, flat_grid

_SUM_BLOCK = 1024

MODE_SHIFTED = 0  # (Σ (x − x₀), Σ (x − x₀)²)
MODE_PAIR = 1     # (Σ x, Σ x·y)
MODE_DOT = 2      # (Σ x·y, 0)


@triton.jit(do_not_specialize=["m_size", "chunk"])
def _channel_sums_kernel(x_ptr, y_ptr, out_ptr, c_count, s_size, m_size, chunk,
                         MODE: tl.constexpr, BLOCK: tl.constexpr):
    """out[c, split, :] = two sums over the split's share of channel c's M values."""
    c = tl.program_id(0)
    sp = tl.program_id(1)
    lo = sp * chunk
    base = tl.arange(0, BLOCK)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
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
        else:
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
            acc1 += x * y
    n_splits = tl.num_programs(1)
    tl.store(out_ptr + (c * n_splits + sp) * 2, tl.sum(acc1, axis=0))
    tl.store(out_ptr + (c * n_splits + sp) * 2 + 1, tl.sum(acc2, axis=0))


@triton.jit(do_not_specialize=["n"])
def _bn_normalize_kernel(a_ptr, mean_ptr, inv_ptr, g_ptr, b_ptr, y_ptr, xhat_ptr, n,
                         c_count, s_size, AFFINE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = (offs // s_size) % c_count
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xh = (a - tl.load(mean_ptr + c, mask=m, other=0.0)) * tl.load(inv_ptr + c, mask=m, other=0.0)
    tl.store(xhat_ptr + offs, xh.to(xhat_ptr.dtype.element_ty), mask=m)
    if AFFINE:  # without an affine, y is x̂ itself
        xh = xh * tl.load(g_ptr + c, mask=m, other=0.0) + tl.load(b_ptr + c, mask=m, other=0.0)
        tl.store(y_ptr + offs, xh.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n"])
def _bn_second_kernel(xhat_ptr, pd_ptr, pr_ptr, coef_ptr, dots_ptr, mxr_ptr, mxd_ptr, out_ptr,
                      n, c_count, s_size, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = (offs // s_size) % c_count
    xh = tl.load(xhat_ptr + offs, mask=m, other=0.0).to(tl.float32)
    pd = tl.load(pd_ptr + offs, mask=m, other=0.0).to(tl.float32)
    pr = tl.load(pr_ptr + offs, mask=m, other=0.0).to(tl.float32)
    out = (xh * tl.load(dots_ptr + c, mask=m, other=0.0)
           + tl.load(mxr_ptr + c, mask=m, other=0.0) * pd
           + tl.load(mxd_ptr + c, mask=m, other=0.0) * pr) * tl.load(coef_ptr + c, mask=m,
                                                                      other=0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n"])
def _bn_scaled_project_kernel(v_ptr, xhat_ptr, mean_ptr, mx_ptr, k_ptr, add_ptr, out_ptr, n,
                              c_count, s_size, ADD: tl.constexpr, BLOCK: tl.constexpr):
    """out = k (v − mean(v) − x̂ mean(x̂ v)) (+ add), per channel constants from the sums."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = (offs // s_size) % c_count
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xh = tl.load(xhat_ptr + offs, mask=m, other=0.0).to(tl.float32)
    out = (v - tl.load(mean_ptr + c, mask=m, other=0.0)
           - xh * tl.load(mx_ptr + c, mask=m, other=0.0)) * tl.load(k_ptr + c, mask=m, other=0.0)
    if ADD:
        out += tl.load(add_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n"])
def _bn_tangent_kernel(r_ptr, xhat_ptr, d_ptr, k_ptr, mr_ptr, mxr_ptr, md_ptr, mxd_ptr,
                       coef_ptr, dots_ptr, out_ptr, s_out_ptr, n, c_count, s_size,
                       BLOCK: tl.constexpr):
    """out = k P r and s = coef (x̂ dots + mean(x̂ r) P δ + mean(x̂ δ) P r)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = (offs // s_size) % c_count
    r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xh = tl.load(xhat_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mxr = tl.load(mxr_ptr + c, mask=m, other=0.0)
    mxd = tl.load(mxd_ptr + c, mask=m, other=0.0)
    pr = r - tl.load(mr_ptr + c, mask=m, other=0.0) - xh * mxr
    pd = d - tl.load(md_ptr + c, mask=m, other=0.0) - xh * mxd
    tl.store(out_ptr + offs, (tl.load(k_ptr + c, mask=m, other=0.0) * pr).to(
        out_ptr.dtype.element_ty), mask=m)
    sv = tl.load(coef_ptr + c, mask=m, other=0.0) * (
        xh * tl.load(dots_ptr + c, mask=m, other=0.0) + mxr * pd + mxd * pr)
    tl.store(s_out_ptr + offs, sv.to(s_out_ptr.dtype.element_ty), mask=m)


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


def channel_sums(x: Tensor, y: Tensor | None, mode: int) -> tuple[Tensor, Tensor]:
    """The two per-channel float32 sums of ``mode`` over a contiguous (N, C, ...) x."""
    n, c, s = _geometry(x)
    m_size = n * s
    splits, chunk = _splits(m_size, c, x.device)
    part = torch.empty((c, splits, 2), dtype=torch.float32, device=x.device)
    _channel_sums_kernel[(c, splits)](x, x if y is None else y, part, c, s, m_size, chunk,
                                      MODE=mode, BLOCK=_SUM_BLOCK)
    tot = part.sum(1)
    return tot[:, 0], tot[:, 1]




def bn_train_forward(a: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, x̂, 1/σ broadcastable, μ (C,), biased var (C,)) as TorchBackend.bn_train_forward."""
    a = a.contiguous()
    n, c, s = _geometry(a)
    m_size = n * s
    s1, s2 = channel_sums(a, None, MODE_SHIFTED)
    shift = a.view(n, c, s)[0, :, 0].float()
    dm = s1 / m_size
    mean = shift + dm
    var = (s2 / m_size - dm * dm).clamp_min(0.0)
    inv = torch.rsqrt(var + eps)
    affine = gamma is not None
    y_dt = torch.promote_types(torch.promote_types(a.dtype, gamma.dtype), beta.dtype) \
        if affine else a.dtype  # as γ x̂ + β promotes in torch
    xhat = torch.empty_like(a)
    y = torch.empty_like(a, dtype=y_dt) if affine else xhat  # one tensor, not two equal ones
    g = gamma.float().contiguous() if affine else inv
    b = beta.float().contiguous() if affine else inv
    _bn_normalize_kernel[flat_grid(a.numel())](a, mean, inv, g, b, y, xhat, a.numel(), c, s,
                                                AFFINE=affine, BLOCK=ELEMENT_BLOCK)
    dt = a.dtype
    return y, xhat, inv.to(dt).view(channel_shape(a)), mean.to(dt), var.to(dt)


def bn_project(v: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
    """(P v, mean(x̂ v) broadcastable) as TorchBackend.bn_project, in their promoted dtype."""
    v, xhat = v.contiguous(), xhat.contiguous()
    n, c, s = _geometry(v)
    sv, sxv = channel_sums(v, xhat, MODE_PAIR)
    mean, mx = sv / (n * s), sxv / (n * s)
    out = torch.empty_like(v, dtype=torch.promote_types(v.dtype, xhat.dtype))
    ones = torch.ones(c, dtype=torch.float32, device=v.device)
    _bn_scaled_project_kernel[flat_grid(v.numel())](v, xhat, mean, mx, ones, v, out, v.numel(),
                                                     c, s, ADD=False, BLOCK=ELEMENT_BLOCK)
    return out, mx.to(out.dtype).view(channel_shape(v))


def bn_second_order(xhat: Tensor, inv_std: Tensor, gamma_c: Tensor, delta: Tensor,
                    p_delta: Tensor, p_r: Tensor, mx_delta: Tensor, mx_r: Tensor) -> Tensor:
    """−(γ/σ²)[x̂ mean(δ Pṙ) + mean(x̂ṙ) Pδ + mean(x̂δ) Pṙ] as TorchBackend.bn_second_order."""
    xhat, delta = xhat.contiguous(), delta.contiguous()
    p_delta, p_r = p_delta.contiguous(), p_r.contiguous()
    n, c, s = _geometry(xhat)
    dots, _ = channel_sums(delta, p_r, MODE_DOT)
    dots = dots / (n * s)
    inv = inv_std.float().reshape(-1).expand(c)
    coef = (-gamma_c.float().reshape(-1).expand(c) * inv * inv).contiguous()
    dt = xhat.dtype
    for t in (inv_std, gamma_c, delta, p_delta, p_r, mx_delta, mx_r):
        dt = torch.promote_types(dt, t.dtype)
    out = torch.empty(xhat.shape, dtype=dt, device=xhat.device)
    _bn_second_kernel[flat_grid(xhat.numel())](
        xhat, p_delta, p_r, coef, dots, mx_r.float().reshape(-1).expand(c).contiguous(),
        mx_delta.float().reshape(-1).expand(c).contiguous(), out, xhat.numel(), c, s,
        BLOCK=ELEMENT_BLOCK)
    return out


@dataclass
class BnChainState:
    """What ``bn_chain`` keeps for ``bn_tangent``: δ and its float32 channel means."""

    d: Tensor
    md: Tensor
    mxd: Tensor


def _chan_f32(t: Tensor, c: int) -> Tensor:
    return t.float().reshape(-1).expand(c).contiguous()


def bn_chain(d: Tensor, xhat: Tensor, k: Tensor
             ) -> tuple[Tensor, BnChainState, tuple[Tensor, Tensor]]:
    """(k P δ, the state for bn_tangent, (mean(δ), mean(x̂ δ))) as TorchBackend.bn_chain."""
    d, xhat = d.contiguous(), xhat.contiguous()
    n, c, s = _geometry(d)
    sd, sxd = channel_sums(d, xhat, MODE_PAIR)
    md, mxd = sd / (n * s), sxd / (n * s)
    out = torch.empty_like(d, dtype=torch.promote_types(d.dtype, xhat.dtype))
    _bn_scaled_project_kernel[flat_grid(d.numel())](d, xhat, md, mxd, _chan_f32(k, c), d, out,
                                                     d.numel(), c, s, ADD=False,
                                                     BLOCK=ELEMENT_BLOCK)
    return out, BnChainState(d, md, mxd), (md.to(out.dtype), mxd.to(out.dtype))


def bn_tangent(state: BnChainState, r: Tensor, xhat: Tensor, k: Tensor, inv_std: Tensor,
               gamma_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(k P ṙ, s, Σ δ P ṙ / σ) as TorchBackend.bn_tangent, from bn_chain's state.

    ⟨δ, P ṙ⟩ = Σ δ ṙ − mean(ṙ) Σ δ − mean(x̂ ṙ) Σ x̂ δ per channel (sums in float64).
    """
    r, xhat = r.contiguous(), xhat.contiguous()
    n, c, s = _geometry(r)
    m_size = n * s
    sr, sxr = channel_sums(r, xhat, MODE_PAIR)
    sdr, _ = channel_sums(state.d, r, MODE_DOT)
    mr, mxr = sr / m_size, sxr / m_size
    d_pr = (sdr.double() - mr.double() * m_size * state.md.double()
            - mxr.double() * m_size * state.mxd.double()).float()
    inv = _chan_f32(inv_std, c)
    coef = (-_chan_f32(gamma_c, c) * inv * inv).contiguous()
    dt = torch.promote_types(torch.promote_types(r.dtype, xhat.dtype), state.d.dtype)
    out, s_out = torch.empty_like(r, dtype=dt), torch.empty_like(r, dtype=dt)
    _bn_tangent_kernel[flat_grid(r.numel())](r, xhat, state.d, _chan_f32(k, c), mr, mxr,
                                              state.md, state.mxd, coef, d_pr / m_size, out,
                                              s_out, r.numel(), c, s, BLOCK=ELEMENT_BLOCK)
    return out, s_out, (d_pr * inv).to(dt)


def bn_backward(abar: Tensor, xhat: Tensor, k: Tensor, s_term: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(k P ā (+ s), Σ ā x̂, Σ ā) as TorchBackend.bn_backward."""
    abar, xhat = abar.contiguous(), xhat.contiguous()
    n, c, s = _geometry(abar)
    sa, sxa = channel_sums(abar, xhat, MODE_PAIR)
    dt = torch.promote_types(abar.dtype, xhat.dtype)
    if s_term is not None:
        s_term = s_term.contiguous()
        dt = torch.promote_types(dt, s_term.dtype)
    out = torch.empty_like(abar, dtype=dt)
    _bn_scaled_project_kernel[flat_grid(abar.numel())](
        abar, xhat, sa / (n * s), sxa / (n * s), _chan_f32(k, c),
        abar if s_term is None else s_term, out, abar.numel(), c, s, ADD=s_term is not None,
        BLOCK=ELEMENT_BLOCK)
    return out, sxa.to(dt), sa.to(dt)
