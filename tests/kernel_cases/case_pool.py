"""Triton max-pool gather / scatter-add at saved argmax indices."""

from __future__ import annotations

import pytest
import torch
from kernel_check import TOL, rel_err

from gradreg_kernels.backends.torch_ops import TorchBackend

REF = TorchBackend()


def _triton():
    from gradreg_kernels.backends.triton import TritonBackend

    return TritonBackend()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geom", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])  # kernel, stride, pad
def test_pool_gather_scatter(geom, dtype, device, poison):
    kernels = _triton()
    k, st, pad = geom
    g = torch.Generator().manual_seed(k * 10 + st)
    a = torch.randn(3, 5, 11, 9, generator=g).to(device, dtype)
    y, idx = REF.max_pool2d(a, k, st, pad, 1, False)
    r = torch.randn(a.shape, generator=g).to(device, dtype)
    assert rel_err(kernels.pool_gather(r, idx), REF.pool_gather(r.double(), idx)) < TOL[dtype]
    d = torch.randn(y.shape, generator=g).to(device, dtype)
    out = kernels.pool_scatter(d, idx, a.shape)
    assert out.dtype == dtype
    assert rel_err(out, REF.pool_scatter(d.double(), idx, a.shape)) < TOL[dtype]
