"""Triton softmax heads (CE and probabilities; the one-launch head with both gradients), the
softmax Hessian-vector product and the target heads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kernel_check import INTERPRET, TOL, rel_err

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


def _bad_labels(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Labels in [0, K) with rows 1, 2, 3 set to −1, K and 10¹² (outside the range)."""
    y = torch.randint(0, k, (n,), generator=g)
    y[1], y[2], y[3] = -1, k, 10**12
    return y


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [3, 10, 129])
@pytest.mark.parametrize("bad", [False, True])
def test_softmax_head_fused(k, dtype, uniform, bad, device, poison):
    """The one-launch head against TorchBackend.softmax_head in float64: CE, p, ∇CE = p − e_y
    and ∇ℓ (p − 1/K with ``uniform``, else the ∇CE tensor itself); bad labels give NaN
    rows of CE and ∇CE exactly where the portable head gives them, never in p or p − 1/K."""
    kernels, n = _triton(), 5
    g = torch.Generator().manual_seed(k * 7 + uniform)
    wide = 4 * torch.randn(n, k + 3, generator=g)
    z = wide[:, 1:k + 1].to(device, dtype)  # row stride k + 3: not contiguous
    y = (_bad_labels(n, k, g) if bad else torch.randint(0, k, (n,), generator=g)).to(device)
    got = kernels.softmax_head(z, y, uniform)
    want = REF.softmax_head(z.double(), y, uniform)
    assert (got[3] is got[2]) == (not uniform) == (want[3] is want[2])
    tol = max(TOL[dtype], 1e-6)
    for out, ref in zip(got, want):
        assert out.dtype == torch.float32 and out.shape == ref.shape
        nan = torch.isnan(ref)
        assert torch.equal(torch.isnan(out).cpu(), nan.cpu())
        assert rel_err(out[~nan], ref[~nan]) < tol
    if bad:
        assert torch.isnan(got[0][1:4]).all() and torch.isnan(got[2][1:4]).all()
        assert torch.isfinite(got[0][[0, 4]]).all() and torch.isfinite(got[1]).all()


def test_softmax_head_int32_labels(device, poison):
    """Labels of another integer dtype read the same classes (and the same bad rows)."""
    kernels = _triton()
    z = torch.randn(4, 6, device=device)
    y = torch.tensor([5, -1, 6, 0], device=device)
    for got, want in zip(kernels.softmax_head(z, y.int(), False), REF.softmax_head(z, y, False)):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.skipif(not INTERPRET, reason="counts interpreted launches")
@pytest.mark.parametrize("uniform", [False, True])
def test_softmax_head_is_one_launch(uniform, device):
    """The whole head, CE to ∇ℓ, is one Triton launch and no ATen kernel."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from launch_count import count_step

    kernels = _triton()
    z, y = torch.randn(5, 10, device=device), torch.tensor([0, 9, -1, 10, 3], device=device)
    kernels.softmax_head(z, y, uniform)
    count = count_step(lambda: kernels.softmax_head(z, y, uniform))
    assert (count.triton, count.aten, count.syncs) == (1, 0, 0), count
    assert dict(count.kernels) == {"_softmax_head_kernel": 1}
