"""The Triton penalty reduction Σ (M ⊙ g)² and its seed M² ⊙ g."""

from __future__ import annotations

import pytest
import torch
from kernel_check import TOL, rel_err

from gradreg_kernels.backends.torch_ops import TorchBackend

REF = TorchBackend()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("shape", [(1, 7), (129, 3, 5, 7)])
def test_penalty_terms(shape, with_mask, dtype, device, poison):
    from gradreg_kernels.backends.triton import TritonBackend

    g = torch.Generator().manual_seed(len(shape))
    grad = torch.randn(shape, generator=g).to(device, dtype)
    mask = (torch.rand(shape, generator=g) > 0.4).to(device, dtype) if with_mask else None
    s, seed = TritonBackend().penalty_terms(grad, mask)
    s_ref, seed_ref = REF.penalty_terms(grad.double(), None if mask is None else mask.double())
    assert s.dim() == 0 and s.dtype == dtype
    assert rel_err(s, s_ref) < TOL[dtype] and rel_err(seed, seed_ref) < TOL[dtype]
