"""Max-pool index gather and its transpose, the scatter-add, for saved argmax indices.

gather:  out[n, c, i] = r[n, c, idx[n, c, i]]          (tangent pass)
scatter: out[n, c, j] = Σ_{i : idx[n, c, i] = j} d[n, c, i]   (chain and backward passes)
idx holds flat per-plane positions into the unpadded (H, W) input, each inside its own
window (torch's max_pool2d_with_indices). Where windows may overlap the scatter zero-fills
a float32 buffer and accumulates with atomics (_pool_scatter_kernel). Where no two windows
share an input position (stride ≥ dilation·(kernel − 1) + 1 along both dims), input (h, w)
can only lie in window (oh, ow) = ((h + pad_h) // stride_h, (w + pad_w) // stride_w), so one
program per input element reads that window and writes
    out[n, c, h, w] = d[n, c, oh, ow] if (oh, ow) is a window and idx[n, c, oh, ow] = h·W + w,
                      else 0
once, in d's dtype, without a zero fill or atomics (_pool_scatter_disjoint_kernel).
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


@triton.jit(do_not_specialize=["n"])
def _pool_scatter_disjoint_kernel(d_ptr, idx_ptr, out_ptr, n, in_w, in_plane, out_h, out_w,
                                  stride_h, stride_w, pad_h, pad_w, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    plane = offs // in_plane
    pos = offs - plane * in_plane  # h·W + w
    oh = (pos // in_w + pad_h) // stride_h
    ow = (pos % in_w + pad_w) // stride_w
    win = m & (oh < out_h) & (ow < out_w)  # the bottom / right remainder lies in no window
    o = plane.to(tl.int64) * (out_h * out_w) + oh * out_w + ow
    j = tl.load(idx_ptr + o, mask=win, other=-1)
    v = tl.load(d_ptr + o, mask=win, other=0.0)
    out = tl.where(win & (j == pos), v, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


def pool_gather(r: Tensor, idx: Tensor) -> Tensor:
    """r (N, C, H, W) read at the flat per-plane indices idx (N, C, H', W')."""
    r, idx = r.contiguous(), idx.contiguous()
    out = torch.empty(idx.shape, dtype=r.dtype, device=r.device)
    n = idx.numel()
    _pool_gather_kernel[flat_grid(n)](r, idx, out, n, idx.shape[2] * idx.shape[3],
                                      r.shape[2] * r.shape[3], BLOCK=ELEMENT_BLOCK)
    return out


def pool_scatter(d: Tensor, idx: Tensor, input_shape: Sequence[int],
                 disjoint: tuple[int, int, int, int] | None = None) -> Tensor:
    """The transpose of ``pool_gather``: d (N, C, H', W') → input_shape (N, C, H, W), in d's
    dtype. ``disjoint`` = (stride_h, stride_w, pad_h, pad_w) of pooling windows that share no
    input position: one launch writes every input element once; None: zero fill and
    float32 atomics."""
    d, idx = d.contiguous(), idx.contiguous()
    if disjoint is not None:
        out = torch.empty(tuple(input_shape), dtype=d.dtype, device=d.device)
        n = out.numel()
        sh, sw, ph, pw = (int(v) for v in disjoint)
        _pool_scatter_disjoint_kernel[flat_grid(n)](
            d, idx, out, n, input_shape[3], input_shape[2] * input_shape[3], idx.shape[2],
            idx.shape[3], sh, sw, ph, pw, BLOCK=ELEMENT_BLOCK)
        return out
    acc = torch.zeros(tuple(input_shape), dtype=torch.float32, device=d.device)
    n = idx.numel()
    _pool_scatter_kernel[flat_grid(n)](d, idx, acc, n, idx.shape[2] * idx.shape[3],
                                       input_shape[2] * input_shape[3], BLOCK=ELEMENT_BLOCK)
    return acc if d.dtype == torch.float32 else acc.to(d.dtype)
