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
    kernels = _triton()
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    a = (3 * torch.randn(shape, generator=g) + 5).to(device, dtype)  # offset mean
    gamma = torch.randn(c, generator=g).to(device, dtype) if affine else None
    beta = torch.randn(c, generator=g).to(device, dtype) if affine else None
    tol = TOL[dtype] * (3 if dtype == torch.float32 else 1)
    out = kernels.bn_train_forward(a, gamma, beta, 1e-5)
    ref = REF.bn_train_forward(a.double(), None if gamma is None else gamma.double(),
                               None if beta is None else beta.double(), 1e-5)
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape and rel_err(o, r) < tol
    xhat64, inv64 = ref[1], ref[2]
    d, r_ = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    pd, mxd = kernels.bn_project(d, out[1])
    pd_ref, mxd_ref = REF.bn_project(d.double(), xhat64)
    assert rel_err(pd, pd_ref) < tol * 5 and rel_err(mxd, mxd_ref) < tol * 5
    pr, mxr = kernels.bn_project(r_, out[1])
    pr_ref, mxr_ref = REF.bn_project(r_.double(), xhat64)
    gamma_c = gamma.view([1, -1] + [1] * (a.dim() - 2)) if affine else a.new_ones(())
    s = kernels.bn_second_order(out[1], out[2], gamma_c, d, r_, pd, pr, mxd, mxr)
    s_ref = REF.bn_second_order(xhat64, inv64, gamma_c.double(), d.double(), r_.double(),
                                pd_ref, pr_ref, mxd_ref, mxr_ref)
    assert rel_err(s, s_ref) < tol * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (129, 11), (2, 5, 33, 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_fused_chain_tangent_backward(shape, affine, dtype, device, poison):
    """The per-pass fused kernels against the float64 composition of the portable steps."""
    kernels = _triton()
    g = torch.Generator().manual_seed(3 + sum(shape))
    c = shape[1]
    a = (2 * torch.randn(shape, generator=g) + 1).to(device, dtype)
    gamma = torch.randn(c, generator=g).to(device, dtype) if affine else None
    _, xhat64, inv64, _, _ = REF.bn_train_forward(a.double(), None, None, 1e-5)
    xhat = xhat64.to(dtype)
    gamma_c = gamma.view([1, -1] + [1] * (a.dim() - 2)) if affine else a.new_ones(())
    k = (gamma_c.double() * inv64).reshape(-1).expand(c).contiguous()
    d, r_, abar = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    tol = TOL[dtype] * (10 if dtype == torch.float32 else 3)
    out, state, means = kernels.bn_chain(d, xhat, k.to(dtype))
    from gradreg_kernels.backends.triton.batchnorm import BnChainState

    assert isinstance(state, BnChainState)  # the fused Triton path, not the fallback
    out_ref, state_ref, means_ref = REF.bn_chain(d.double(), xhat64, k)
    assert rel_err(out, out_ref) < tol
    for m, m_ref in zip(means, means_ref, strict=True):
        assert rel_err(m, m_ref) < tol
    got = kernels.bn_tangent(state, r_, xhat, k.to(dtype), inv64.to(dtype), gamma_c)
    want = REF.bn_tangent(state_ref, r_.double(), xhat64, k, inv64, gamma_c.double())
    for o, w in zip(got, want, strict=True):
        assert o.shape == w.shape and rel_err(o, w) < tol * 3
    for extra, extra64 in ((None, None), (got[1], want[1])):
        for o, w in zip(kernels.bn_backward(abar, xhat, k.to(dtype), extra),
                        REF.bn_backward(abar.double(), xhat64, k, extra64), strict=True):
            assert o.shape == w.shape and rel_err(o, w) < tol * 3
