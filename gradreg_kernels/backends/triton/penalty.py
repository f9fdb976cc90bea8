"""The penalty reduction and its gradient in one pass over g = ∇_X Σ ℓ.

    sum  = Σ (M ⊙ g)²          (float32 partial sums per program, summed after)
    seed = M² ⊙ g              (pass 3 starts from (2λ/B) · seed)
M is the annotation mask (same shape as g here) or 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import ELEMENT_BLOCK, flat_grid


@triton.jit(do_not_specialize=["n"])
def _penalty_kernel(g_ptr, m_ptr, seed_ptr, part_ptr, n, HAS_MASK: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_MASK:
        m = tl.load(m_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        gm = g * m
        tl.store(seed_ptr + offs, (gm * m).to(seed_ptr.dtype.element_ty), mask=valid)
    else:
        gm = g
    tl.store(part_ptr + pid, tl.sum(gm * gm, axis=0))


def penalty_terms(g: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Σ (M ⊙ g)² as a 0-dim tensor, M² ⊙ g) in the dtypes TorchBackend gives; mask has
    g's shape (a broadcast mask takes the portable path)."""
    g = g.contiguous()
    n = g.numel()
    grid = flat_grid(n)
    part = torch.empty(grid[0], dtype=torch.float32, device=g.device)
    if mask is None:
        seed, m_arg, out_dt = g, g, g.dtype
    else:
        mask = mask.contiguous()
        out_dt = torch.promote_types(g.dtype, mask.dtype)
        seed = torch.empty(g.shape, dtype=out_dt, device=g.device)
        m_arg = mask
    _penalty_kernel[grid](g, m_arg, seed, part, n, HAS_MASK=mask is not None,
                          BLOCK=ELEMENT_BLOCK)
    return part.sum().to(out_dt), seed
