"""Triton train-mode BatchNorm kernels vs the portable float64 reference."""

from __future__ import annotations

import pytest
import torch
from kernel_check import INTERPRET, TOL, rel_err
from torch import nn

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


def _rand(shape, g, device, dtype=torch.float32, scale=1.0, offset=0.0):
    return (scale * torch.randn(shape, generator=g) + offset).to(device, dtype)


@pytest.mark.parametrize("shape", [(3, 3, 5), (2, 3, 1, 5), (7, 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_passes_match_torch_backend_on_odd_sizes(shape, affine, device, poison):
    """Every pass and its per-channel results against the portable TorchBackend in float32,
    on odd sizes (C = 3 with S = 5 or 1 × 5, one channel of 7 values); γ absent is the
    rules' 0-dim ones."""
    kernels = _triton()
    g = torch.Generator().manual_seed(11 + sum(shape))
    c = shape[1]
    a = _rand(shape, g, device, scale=2.0, offset=-3.0)
    gamma = _rand(c, g, device) if affine else None
    beta = _rand(c, g, device) if affine else None
    tol = 5 * TOL[torch.float32]
    got_fwd = kernels.bn_train_forward(a, gamma, beta, 1e-3)
    ref_fwd = REF.bn_train_forward(a, gamma, beta, 1e-3)
    for o, w in zip(got_fwd, ref_fwd, strict=True):
        assert o.shape == w.shape and o.dtype == w.dtype and rel_err(o, w) < tol
    xhat, inv_std = ref_fwd[1], ref_fwd[2]
    gamma_c = gamma.view([1, -1] + [1] * (a.dim() - 2)) if affine else a.new_ones(())
    k = (gamma_c * inv_std).flatten()
    d, r_, abar = (_rand(shape, g, device) for _ in range(3))
    out, state, means = kernels.bn_chain(d, xhat, k)
    out_ref, state_ref, means_ref = REF.bn_chain(d, xhat, k)
    assert rel_err(out, out_ref) < tol
    for m, w in zip(means, means_ref, strict=True):
        assert m.shape == w.shape and m.dtype == w.dtype and rel_err(m, w) < tol
    got = kernels.bn_tangent(state, r_, xhat, k, inv_std, gamma_c)
    want = REF.bn_tangent(state_ref, r_, xhat, k, inv_std, gamma_c)
    for o, w in zip(got, want, strict=True):
        assert o.shape == w.shape and o.dtype == w.dtype and rel_err(o, w) < tol
    for extra in (None, want[1]):
        for o, w in zip(kernels.bn_backward(abar, xhat, k, extra),
                        REF.bn_backward(abar, xhat, k, extra), strict=True):
            assert o.shape == w.shape and o.dtype == w.dtype and rel_err(o, w) < tol


@pytest.mark.parametrize("affine", [True, False])
def test_bn_passes_with_several_splits_per_channel(affine, device, poison, monkeypatch):
    """The partial sums of several programs per channel (as on a GPU; one on the CPU),
    including a last split shorter than the others, against the float64 reference."""
    import triton

    from gradreg_kernels.backends.triton import batchnorm

    monkeypatch.setattr(batchnorm, "_splits", lambda m, c, dev: (3, triton.cdiv(m, 3)))
    kernels = _triton()
    shape = (41, 3, 7, 11)  # M = 3157 = 3 splits of 1053, the last one of 1051
    g = torch.Generator().manual_seed(5)
    a = _rand(shape, g, device, scale=3.0, offset=5.0)
    gamma = _rand(3, g, device) if affine else None
    beta = _rand(3, g, device) if affine else None
    tol = 10 * TOL[torch.float32]
    fwd = kernels.bn_train_forward(a, gamma, beta, 1e-5)
    fwd64 = REF.bn_train_forward(a.double(), None if gamma is None else gamma.double(),
                                 None if beta is None else beta.double(), 1e-5)
    for o, w in zip(fwd, fwd64, strict=True):
        assert rel_err(o, w) < tol
    xhat64, inv64 = fwd64[1], fwd64[2]
    gamma_c = gamma.view(1, -1, 1, 1) if affine else a.new_ones(())
    k64 = (gamma_c.double() * inv64).flatten()
    d, r_, abar = (_rand(shape, g, device) for _ in range(3))
    xhat, k = xhat64.float(), k64.float()
    out, state, means = kernels.bn_chain(d, xhat, k)
    out_ref, state_ref, means_ref = REF.bn_chain(d.double(), xhat64, k64)
    for o, w in zip((out, *means), (out_ref, *means_ref), strict=True):
        assert rel_err(o, w) < tol
    got = kernels.bn_tangent(state, r_, xhat, k, inv64.float(), gamma_c)
    want = REF.bn_tangent(state_ref, r_.double(), xhat64, k64, inv64, gamma_c.double())
    for o, w in zip(got, want, strict=True):
        assert rel_err(o, w) < tol
    for o, w in zip(kernels.bn_backward(abar, xhat, k, got[1]),
                    REF.bn_backward(abar.double(), xhat64, k64, want[1]), strict=True):
        assert rel_err(o, w) < tol


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (9, 1030)])
def test_bn_running_stats_kernel_matches_nn_batchnorm(momentum, shape, device):
    """Three steps of the one-launch update (momentum, or the cumulative average for None;
    1030 channels: two blocks of the channel loop) against nn.BatchNorm's forward, from the
    Triton forward's statistics (the portable ones for the wide case, to keep it quick)."""
    from gradreg_kernels.backends.triton import batchnorm

    kernels = _triton()
    c = shape[1]
    bn = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    ours, ref = bn(c, momentum=momentum).to(device), bn(c, momentum=momentum).to(device)
    ours.train(), ref.train()
    g = torch.Generator().manual_seed(c)
    for step in range(3):
        a = _rand(shape, g, device, scale=1.0 + step, offset=2.0 - step)
        stats_of = kernels if c < 64 else REF
        _, _, _, mean, var = stats_of.bn_train_forward(a, None, None, ours.eps)
        assert batchnorm.running_stats_supported(ours, mean, var)  # the kernel, not the fallback
        kernels.bn_update_running_stats(ours, mean, var, a.numel() // c)
        ref(a)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


def test_bn_running_stats_fallback_keeps_torch_semantics(device):
    """float64 running statistics take the portable update, with the same result."""
    from gradreg_kernels.backends.triton import batchnorm

    kernels = _triton()
    ours = nn.BatchNorm1d(4, momentum=None).to(device, torch.float64).train()
    ref = nn.BatchNorm1d(4, momentum=None).to(device, torch.float64).train()
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        a = _rand((5, 4), g, device, torch.float64)
        _, _, _, mean, var = kernels.bn_train_forward(a, None, None, ours.eps)
        assert not batchnorm.running_stats_supported(ours, mean, var)
        kernels.bn_update_running_stats(ours, mean, var, 5)
        ref(a)
    for a_, b_ in zip(ours.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a_, b_)


def _count_step():
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[2] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from launch_count import count_step

    return count_step


def _pass_counts(count_step, kernels, bn, a, d, r_, abar) -> dict:
    """The launches of each backend step of one BatchNorm layer's training step."""
    out = {}
    fwd = []
    out["forward"] = count_step(
        lambda: fwd.extend(kernels.bn_train_forward(a, bn.weight, bn.bias, bn.eps)))
    _, xhat, inv_std, mean, var = fwd
    affine = bn.weight is not None
    gamma_c = bn.weight.detach().view(1, -1, 1, 1) if affine else a.new_ones(())
    k = (gamma_c * inv_std).flatten()
    chain, tangent = [], []
    out["chain"] = count_step(lambda: chain.extend(kernels.bn_chain(d, xhat, k)))
    out["tangent"] = count_step(lambda: tangent.extend(
        kernels.bn_tangent(chain[1], r_, xhat, k, inv_std, gamma_c)))
    out["backward"] = count_step(lambda: kernels.bn_backward(abar, xhat, k, tangent[1]))
    out["running stats"] = count_step(
        lambda: kernels.bn_update_running_stats(bn, mean, var, a.numel() // a.shape[1]))
    return out


@pytest.mark.skipif(not INTERPRET, reason="counts interpreted Triton launches")
@pytest.mark.parametrize("affine", [True, False])
def test_bn_layer_launches_per_pass(affine, device):
    """One train-mode BatchNorm layer on the Triton backend: each of the four passes makes
    at most 3 launches (the sums, their total over the splits, one flat kernel), the running
    statistics' update one, and BatchNormTrainRule's whole step at most 15; no host reads."""
    from gradreg_kernels.rules.norm import BatchNormTrainRule

    count_step = _count_step()
    bn = nn.BatchNorm2d(3, affine=affine).to(device).train()
    kernels = _triton()
    g = torch.Generator().manual_seed(0)
    a, d, r_, abar = (_rand((4, 3, 5, 5), g, device) for _ in range(4))
    _pass_counts(count_step, kernels, bn, a, d, r_, abar)  # warm-up
    counts = _pass_counts(count_step, kernels, bn, a, d, r_, abar)
    for name, cnt in counts.items():
        limit = 1 if name == "running stats" else 3
        assert cnt.launches <= limit and cnt.syncs == 0, (name, dict(cnt.ops), cnt.kernels)
    assert counts["running stats"].triton == 1
    rule = BatchNormTrainRule(bn, kernels)
    rule.keep_saved = False
    steps = (lambda: rule.forward(a), lambda: rule.chain(d), lambda: rule.tangent(r_),
             lambda: rule.backward(abar), rule.commit)
    rule_counts = [count_step(f) for f in steps]
    # beyond the backend's steps the rule computes k = γ/σ and sums Δγ's two terms
    assert sum(c.launches for c in rule_counts) <= 15, [dict(c.ops) for c in rule_counts]
    assert sum(c.syncs for c in rule_counts) == 0
