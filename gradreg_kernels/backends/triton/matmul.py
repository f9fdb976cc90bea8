"""A product with a fused epilogue: y = σ(a wᵀ + b), optionally saving the ReLU mask.

a: (M, K), w: (N, K) (nn.Linear's layout, read transposed through strides, never copied),
b: (N,) or None. ACT = −1 (none) or 0 (ReLU, also storing mask = (z > 0) as uint8).
Tiles accumulate in float32; float32 operands multiply in IEEE float32 unless
torch.backends.cuda.matmul.allow_tf32 is set. Block shapes are autotuned per (M, N, K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4),
              (32, 64, 32, 4, 5)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": kernels}, num_warps=w,
                          num_stages=s) for bm, bn, kernels, w, s in shapes]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "PRECISION"])
@triton.jit
def _linear_act_kernel(a_ptr, w_ptr, b_ptr, y_ptr, mask_ptr, M, N, K,
                       stride_am, stride_ak, stride_wn, stride_wk,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                     mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    if ACT == 0:
        tl.store(mask_ptr + offs, (acc > 0).to(tl.uint8), mask=out_mask)
        acc = tl.where(acc > 0, acc, 0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _precision(dt: torch.dtype) -> str:
    if dt == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def linear_act(a: Tensor, w: Tensor, b: Tensor | None, relu: bool = False
               ) -> tuple[Tensor, Tensor | None]:
    """(σ(a wᵀ + b), ReLU mask or None): (M, K) × (N, K)ᵀ → (M, N) in a's dtype."""
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"linear_act needs a (M, K) and w (N, K), got {tuple(a.shape)} and "
                         f"{tuple(w.shape)}")
    m, k = a.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=a.dtype, device=a.device)
    mask = torch.empty((m, n), dtype=torch.uint8, device=a.device) if relu else None
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _linear_act_kernel[grid](a, w, b if b is not None else y, y, mask if relu else y, m, n, k,
                             a.stride(0), a.stride(1), w.stride(0), w.stride(1),
                             HAS_BIAS=b is not None, ACT=0 if relu else -1,
                             PRECISION=_precision(a.dtype))
    return y, mask
