"""Max-pool index gather and its transpose, the scatter-add, for saved argmax indices.

gather:  out[n, c, i] = r[n, c, idx[n, c, i]]          (tangent pass)
scatter: out[n, c, j] = Σ_{i : idx[n, c, i] = j} d[n, c, i]   (chain and backward passes)
The scatter accumulates with float32 atomics (overlapping windows may share an input).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import ELEMENT_BLOCK, flat_grid


@triton.jit(do_not_specialize=["n"])
def _pool_gather_kernel(r_ptr, idx_ptr, out_ptr, n, out_plane, in_plane, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    plane = offs // out_plane
    j = tl.load(idx_ptr + offs, mask=m, other=0)
    v = tl.load(r_ptr + plane.to(tl.int64) * in_plane + j, mask=m, other=0.0)
    tl.store(out_ptr + offs, v, mask=m)


@triton.jit(do_not_specialize=["n"])
def _pool_scatter_kernel(d_ptr, idx_ptr, acc_ptr, n, out_plane, in_plane, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    plane = offs // out_plane
    j = tl.load(idx_ptr + offs, mask=m, other=0)
    v = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(acc_ptr + plane.to(tl.int64) * in_plane + j, v, mask=m)


def pool_gather(r: Tensor, idx: Tensor) -> Tensor:
    """r (N, C, H, W) read at the flat per-plane indices idx (N, C, H', W')."""
    r, idx = r.contiguous(), idx.contiguous()
    out = torch.empty(idx.shape, dtype=r.dtype, device=r.device)
    n = idx.numel()
    _pool_gather_kernel[flat_grid(n)](r, idx, out, n, idx.shape[2] * idx.shape[3],
                                      r.shape[2] * r.shape[3], BLOCK=ELEMENT_BLOCK)
    return out


def pool_scatter(d: Tensor, idx: Tensor, input_shape: Sequence[int]) -> Tensor:
    """The transpose of ``pool_gather``: (N, C, H', W') → input_shape, in d's dtype."""
    d, idx = d.contiguous(), idx.contiguous()
    acc = torch.zeros(tuple(input_shape), dtype=torch.float32, device=d.device)
    n = idx.numel()
    _pool_scatter_kernel[flat_grid(n)](d, idx, acc, n, idx.shape[2] * idx.shape[3],
                                       input_shape[2] * input_shape[3], BLOCK=ELEMENT_BLOCK)
    return acc if d.dtype == torch.float32 else acc.to(d.dtype)
