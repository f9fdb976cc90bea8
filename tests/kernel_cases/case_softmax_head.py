"""Triton softmax-CE head (value, probabilities) and its Hessian-vector product."""

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
@pytest.mark.parametrize("n,k", [(1, 10), (3, 37), (129, 10), (70, 1000)])
def test_softmax_ce_and_hvp(n, k, dtype, device, poison):
    kernels = _triton()
    g = torch.Generator().manual_seed(n * k)
    wide = 4 * torch.randn(n, k + 5, generator=g)
    z = wide[:, 2:k + 2].to(device, dtype)  # row stride k + 5: not contiguous
    y = torch.randint(0, k, (n,), generator=g).to(device)
    ce, p = kernels.softmax_ce(z, y)
    ce_ref, p_ref = REF.softmax_ce(z.double(), y)
    assert ce.dtype == torch.float32 and p.dtype == torch.float32
    tol = max(TOL[dtype], 1e-6)
    assert rel_err(ce, ce_ref) < tol and rel_err(p, p_ref) < tol
    t = torch.randn(n, k, generator=g).to(device, dtype)
    hv = kernels.softmax_hvp(p, t)
    assert rel_err(hv, REF.softmax_hvp(p_ref, t.double())) < tol


def test_softmax_ce_extreme_logits_stay_finite(device):
    kernels = _triton()
    z = torch.tensor([[1e4, -1e4, 0.0], [-50.0, -60.0, -70.0]], device=device)
    y = torch.tensor([1, 0], device=device)
    ce, p = kernels.softmax_ce(z, y)
    ce_ref, p_ref = REF.softmax_ce(z.double(), y)
    assert torch.isfinite(ce).all() and rel_err(ce, ce_ref) < 1e-6
    assert rel_err(p, p_ref) < 1e-6


def test_softmax_ce_out_of_range_label_gives_nan(device):
    z = torch.randn(3, 5, device=device)
    ce, _ = _triton().softmax_ce(z, torch.tensor([0, 5, -1], device=device))
    assert torch.isfinite(ce[0]) and torch.isnan(ce[1:]).all()


@pytest.mark.parametrize("kind", ["mse", "bce"])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 37), (129, 10), (70, 1000)])
def test_target_heads(kind, n, k, device):
    """mse / bce: ℓ, ∇ℓ and the Hessian's diagonal against the portable float64 forms."""
    kernels = _triton()
    g = torch.Generator().manual_seed(n * k + 1)
    z = (4 * torch.randn(n, k, generator=g)).to(device)
    y = (torch.rand(n, k, generator=g) if kind == "bce" else torch.randn(n, k, generator=g))
    y = y.to(device)
    data, grad, d2 = kernels.target_head(kind, z, y)
    ref = REF.target_head(kind, z.double(), y.double())
    assert rel_err(data, ref[0]) < TOL[torch.float32]
    assert rel_err(grad, ref[1]) < TOL[torch.float32]
    if kind == "mse":
        assert d2 is None and ref[2] is None
    else:
        assert rel_err(d2, ref[2]) < TOL[torch.float32]
