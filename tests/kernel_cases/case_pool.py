"""Triton max-pool gather / scatter at saved argmax indices (the atomic scatter-add, and
the one-launch scatter of disjoint windows), and the max-pool rule on them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_check import INTERPRET, TOL, rel_err
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.backends.torch_ops import TorchBackend
from gradreg_kernels.rules.pool import MaxPool2dRule, disjoint_windows
from gradreg_kernels.rules.pool1d import pool1d_rule

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


def _autograd_scatter(a: torch.Tensor, d: torch.Tensor, geom) -> torch.Tensor:
    """∂/∂a of Σ d ⊙ F.max_pool2d(a) in float64: torch's own max-pool backward."""
    k, st, pad, dil, ceil = geom
    a64 = a.detach().double().requires_grad_(True)
    F.max_pool2d(a64, k, st, pad, dil, ceil).backward(d.double())
    return a64.grad


#: kernel, stride, padding, dilation, ceil_mode, (H, W); the last two overlap (atomic path)
SCATTER_GEOMS = [(2, 2, 0, 1, False, (8, 8)), (2, 2, 0, 1, False, (7, 7)),
                 (3, 3, 0, 1, False, (7, 7)), (3, 3, 1, 1, True, (7, 8)),
                 (2, 3, 1, 1, True, (7, 7)), (2, 4, 0, 2, True, (9, 10)),
                 ((1, 3), (1, 3), (0, 1), 1, False, (1, 10)),
                 (3, 2, 1, 1, False, (7, 7)), (2, 2, 0, 2, False, (7, 7))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geom", SCATTER_GEOMS)
def test_pool_scatter_vs_max_pool_backward(geom, dtype, device, poison):
    """The scatter with the rule's ``disjoint`` geometry against autograd of F.max_pool2d:
    disjoint windows (one gather-style launch) give it exactly, remainders and all, in d's
    dtype; overlapping windows (disjoint None: zero fill and atomics) within tolerance."""
    kernels = _triton()
    k, st, pad, dil, ceil, (h, w) = geom
    g = torch.Generator().manual_seed(h * w + st if isinstance(st, int) else h * w)
    a = torch.randn(2, 3, h, w, generator=g).to(device)  # float32: no ties in a window
    y, idx = REF.max_pool2d(a, k, st, pad, dil, ceil)
    d = torch.randn(y.shape, generator=g).to(device, dtype)
    disjoint = disjoint_windows(k, st, pad, dil)
    assert (disjoint is None) == (geom in SCATTER_GEOMS[-2:])
    out = kernels.pool_scatter(d, idx, a.shape, disjoint=disjoint)
    ref = _autograd_scatter(a, d, (k, st, pad, dil, ceil))
    assert out.dtype == dtype and out.shape == a.shape
    if disjoint is not None:
        assert torch.equal(out.double().cpu(), ref.cpu())
    else:
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool1d(3)])
def test_max_pool_rule_passes(pool, device):
    """The max-pool rule on the Triton backend: chain and backward are torch's max-pool
    backward, tangent its forward at the saved argmax (1-D pools as height-1 2-D ones)."""
    kernels = _triton()
    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 9) if isinstance(pool, nn.MaxPool1d) else (2, 3, 7, 9)
    a = torch.randn(shape, generator=g).to(device)
    rule = pool1d_rule(pool, kernels) if isinstance(pool, nn.MaxPool1d) \
        else MaxPool2dRule(pool, kernels)
    y = rule.forward(a)
    torch.testing.assert_close(y, pool(a))
    d = torch.randn(y.shape, generator=g).to(device)
    a64 = a.double().requires_grad_(True)
    pool(a64).backward(d.double())
    for out in (rule.chain(d), rule.backward(d)):  # overlapping windows: float32 sums
        torch.testing.assert_close(out, a64.grad.float(), rtol=1e-6, atol=1e-6)
    r = torch.randn(shape, generator=g).to(device)
    torch.testing.assert_close(rule.tangent(r), torch.autograd.functional.jvp(pool, a, r)[1])


@pytest.mark.skipif(not INTERPRET, reason="counts interpreted launches")
def test_disjoint_pool_scatter_is_one_launch(device):
    """Disjoint windows: one Triton launch, no zero fill, no cast (bf16 too); overlapping
    windows keep the float32 zero fill and atomics; a fused step with MaxPool2d(2) and the
    CE head runs only the one-launch scatter and head."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from launch_count import count_step

    kernels = _triton()
    a = torch.randn(2, 3, 7, 7, device=device)
    for geom, want in [((2, 2, 0, 1), {"_pool_scatter_disjoint_kernel": 1}),
                       ((3, 2, 1, 1), {"_pool_scatter_kernel": 1})]:
        k, st, pad, dil = geom
        y, idx = REF.max_pool2d(a, k, st, pad, dil, False)
        for dtype in (torch.float32, torch.bfloat16):
            d = torch.randn(y.shape, device=device).to(dtype)
            disjoint = disjoint_windows(*geom)
            count = count_step(lambda d=d, idx=idx, disjoint=disjoint: kernels.pool_scatter(
                d, idx, a.shape, disjoint=disjoint))
            assert dict(count.kernels) == want, (geom, dtype, count)
            if disjoint is not None:
                assert (count.triton, count.aten) == (1, 0), count
            else:
                assert count.ops["zeros"] == 1, count

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).to(device)
    x, yl = torch.randn(3, 1, 7, 7, device=device), torch.tensor([0, 4, 2], device=device)

    def step():
        model.zero_grad(set_to_none=True)
        gradreg_loss(model, x, yl, 1.0, backend="triton").loss.backward()

    step()
    count = count_step(step)
    assert count.kernels["_pool_scatter_disjoint_kernel"] >= 1, count.kernels
    assert count.kernels["_pool_scatter_kernel"] == 0, count.kernels
    assert count.kernels["_softmax_head_kernel"] == 1, count.kernels
    assert count.ops["zeros"] == 0 and count.ops["index_put_"] == 0, count.ops
