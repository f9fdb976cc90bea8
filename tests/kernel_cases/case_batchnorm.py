"""Triton train-mode BatchNorm kernels vs the portable float64 reference."""

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
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (129, 11), (2, 5, 33, 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_forward_project_second_order(shape, affine, dtype, device, poison):
    bk = _triton()
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    a = (3 * torch.randn(shape, generator=g) + 5).to(device, dtype)  # offset mean
    gamma = torch.randn(c, generator=g).to(device, dtype) if affine else None
    beta = torch.randn(c, generator=g).to(device, dtype) if affine else None
    tol = TOL[dtype] * (3 if dtype == torch.float32 else 1)
    out = bk.bn_train_forward(a, gamma, beta, 1e-5)
    ref = REF.bn_train_forward(a.double(), None if gamma is None else gamma.double(),
                               None if beta is None else beta.double(), 1e-5)
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape and rel_err(o, r) < tol
    xhat64, inv64 = ref[1], ref[2]
    d, r_ = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    pd, mxd = bk.bn_project(d, out[1])
    pd_ref, mxd_ref = REF.bn_project(d.double(), xhat64)
    assert rel_err(pd, pd_ref) < tol * 5 and rel_err(mxd, mxd_ref) < tol * 5
    pr, mxr = bk.bn_project(r_, out[1])
    pr_ref, mxr_ref = REF.bn_project(r_.double(), xhat64)
    gamma_c = gamma.view([1, -1] + [1] * (a.dim() - 2)) if affine else a.new_ones(())
    s = bk.bn_second_order(out[1], out[2], gamma_c, d, r_, pd, pr, mxd, mxr)
    s_ref = REF.bn_second_order(xhat64, inv64, gamma_c.double(), d.double(), r_.double(),
                                pd_ref, pr_ref, mxd_ref, mxr_ref)
    assert rel_err(s, s_ref) < tol * 10
