"""The heads' kernels: softmax cross-entropy (value, probabilities and both gradients in one
pass, and its HVP) and the target heads mse / bce.

For logits z (N, K) and labels y (N,):
    CE_n = logsumexp(z_n) − z_{n, y_n},   p = softmax(z)
    ∇CE = p − e_y,   ∇ℓ = p − 1/K (uniform) or ∇CE                (_softmax_head_kernel)
    H t  = p ⊙ t − p (pᵀ t) row by row                          (_softmax_hvp_kernel)
A label outside [0, K) gives its row CE_n = NaN and ∇CE_n = NaN (no other class is read);
the uniform ∇ℓ = p − 1/K does not depend on the label.
For targets y (N, K): ℓ_n = (1/K) Σ_k e, ∇ℓ = e′/K and the Hessian's diagonal e″/K with
    mse: e = (z − y)²,  e′ = 2 (z − y)     bce: e = BCE with logits, e′ = σ − y, e″ = σ(1 − σ)
                                                                 (_target_head_kernel)
Each program holds BLOCK_M whole rows (BLOCK_K ≥ K) in registers; float32 math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: widest row the one-block kernels take; wider heads use the portable path.
MAX_K = 8192


def _block_m(k: int) -> int:
    return max(1, min(64, 4096 // triton.next_power_of_2(k)))


@triton.jit(do_not_specialize=["n"])
def _softmax_head_kernel(z_ptr, y_ptr, ce_ptr, p_ptr, dg_ptr, pg_ptr, n, k, stride_z, inv_k,
                         GRADS: tl.constexpr, UNIFORM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    rm = rows < n
    m2 = rm[:, None] & (cols[None, :] < k)
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=m2,
                other=-float("inf")).to(tl.float32)
    zmax = tl.where(rm, tl.max(z, axis=1), 0.0)  # rows past n: keep the math finite
    e = tl.where(m2, tl.exp(z - zmax[:, None]), 0.0)
    tot = tl.where(rm, tl.sum(e, axis=1), 1.0)
    lse = zmax + tl.log(tot)
    y = tl.load(y_ptr + rows, mask=rm, other=0)
    ok = (y >= 0) & (y < k)  # a bad label matches no column and makes its row NaN
    hit = cols[None, :] == y[:, None]
    zy = tl.sum(tl.where(hit, z, 0.0), axis=1)
    ce = tl.where(ok, lse - zy, float("nan"))
    tl.store(ce_ptr + rows, ce.to(ce_ptr.dtype.element_ty), mask=rm)
    p = e / tot[:, None]
    offs = rows[:, None] * k + cols[None, :]
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=m2)
    if GRADS:
        dg = tl.where(ok[:, None], p - tl.where(hit, 1.0, 0.0), float("nan"))
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=m2)
        if UNIFORM:
            tl.store(pg_ptr + offs, (p - inv_k).to(pg_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["n"])
def _softmax_hvp_kernel(p_ptr, t_ptr, out_ptr, n, k, stride_t,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    m2 = (rows[:, None] < n) & (cols[None, :] < k)
    p = tl.load(p_ptr + rows[:, None] * k + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=m2,
                other=0.0).to(tl.float32)
    pt = tl.sum(p * t, axis=1)
    out = p * (t - pt[:, None])
    tl.store(out_ptr + rows[:, None] * k + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m2)


def _rows(z: Tensor) -> Tensor:
    return z if z.stride(1) == 1 else z.contiguous()


def _head_dtype(z: Tensor) -> torch.dtype:
    """float32 for 16-bit logits (as autocast's log_softmax), else z's dtype."""
    return torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype


def _launch_head(z: Tensor, y: Tensor, grads: bool, uniform: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    z = _rows(z)
    n, k = z.shape
    out_dt = _head_dtype(z)
    ce = torch.empty(n, dtype=out_dt, device=z.device)
    p = torch.empty((n, k), dtype=out_dt, device=z.device)
    dg = torch.empty_like(p) if grads else p
    pg = torch.empty_like(p) if grads and uniform else dg
    block_k, bm = triton.next_power_of_2(k), _block_m(k)
    _softmax_head_kernel[(triton.cdiv(n, bm),)](z, y.contiguous(), ce, p, dg, pg, n, k,
                                                z.stride(0), 1.0 / k, GRADS=grads,
                                                UNIFORM=grads and uniform,
                                                BLOCK_M=bm, BLOCK_K=block_k)
    return ce, p, dg, pg


def softmax_ce(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(CE (N,), p (N, K)) for logits z (N, K) and labels y (N,), in ``_head_dtype(z)``."""
    ce, p, _, _ = _launch_head(z, y, grads=False, uniform=False)
    return ce, p


def softmax_head(z: Tensor, y: Tensor, uniform: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(CE (N,), p (N, K), ∇CE = p − e_y (N, K), ∇ℓ (N, K)) in one launch, in
    ``_head_dtype(z)``; ∇ℓ = p − 1/K if ``uniform``, else the ∇CE tensor itself. A label
    outside [0, K) makes its row of CE and ∇CE NaN (TorchBackend.softmax_head)."""
    return _launch_head(z, y, grads=True, uniform=uniform)


def softmax_hvp(p: Tensor, t: Tensor) -> Tensor:
    """p ⊙ t − p (pᵀt) row by row, (N, K), in the promoted dtype of p and t."""
    p, t = p.contiguous(), _rows(t)
    n, k = p.shape
    out = torch.empty((n, k), dtype=torch.promote_types(p.dtype, t.dtype), device=p.device)
    block_k, bm = triton.next_power_of_2(k), _block_m(k)
    _softmax_hvp_kernel[(triton.cdiv(n, bm),)](p, t, out, n, k, t.stride(0),
                                               BLOCK_M=bm, BLOCK_K=block_k)
    return out


@triton.jit(do_not_specialize=["n"])
def _target_head_kernel(z_ptr, y_ptr, data_ptr, grad_ptr, d2_ptr, n, k,
                        BCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    m2 = (rows[:, None] < n) & (cols[None, :] < k)
    offs = rows[:, None] * k + cols[None, :]
    z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    inv_k = 1.0 / k
    if BCE:
        ez = tl.exp(-tl.abs(z))
        sig = tl.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez))
        e = tl.maximum(z, 0.0) - z * y + tl.log(1.0 + ez)
        grad = (sig - y) * inv_k
        tl.store(d2_ptr + offs, sig * (1.0 - sig) * inv_k, mask=m2)
    else:
        diff = z - y
        e = diff * diff
        grad = 2.0 * diff * inv_k
    tl.store(grad_ptr + offs, grad, mask=m2)
    tl.store(data_ptr + rows, tl.sum(tl.where(m2, e, 0.0), axis=1) * inv_k, mask=rows < n)


def target_head(kind: str, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(ℓ (N,), ∇ℓ (N, K), e″/K (N, K) for bce, None for mse) in float32."""
    z, y = z.contiguous(), y.contiguous()
    n, k = z.shape
    data = torch.empty(n, dtype=torch.float32, device=z.device)
    grad = torch.empty((n, k), dtype=torch.float32, device=z.device)
    d2 = torch.empty_like(grad) if kind == "bce" else grad  # mse stores no d2
    block_k, bm = triton.next_power_of_2(k), _block_m(k)
    _target_head_kernel[(triton.cdiv(n, bm),)](z, y, data, grad, d2, n, k, BCE=kind == "bce",
                                               BLOCK_M=bm, BLOCK_K=block_k)
    return data, grad, (d2 if kind == "bce" else None)
