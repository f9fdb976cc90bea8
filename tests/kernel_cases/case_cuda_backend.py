"""The CUDA C++ kernels (activation steps, softmax-CE head) vs the float64 reference.

Runs only on a CUDA device (the extension is built on first use, which takes minutes).
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_check import DEVICE, TOL, rel_err

from gradreg_kernels.activation_math import spec_by_name
from gradreg_kernels.backends.torch_ops import TorchBackend

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA kernels need a CUDA device")

ACTS = [("relu", ()), ("leaky_relu", (0.1,)), ("softplus", (1.5, 3.0)), ("tanh", ()),
        ("sigmoid", ()), ("gelu", ()), ("gelu_tanh", ()), ("elu", (0.7,)), ("silu", ()),
        ("mish", ()), ("hardswish", ())]
REF = TorchBackend()


@pytest.fixture(scope="module")
def kernels():
    from gradreg_kernels.backends.cuda import CudaBackend
    from gradreg_kernels.backends.gpu_entries import cuda_unavailable

    why = cuda_unavailable()
    if why is not None or os.environ.get("GRADREG_TEST_CUDA_BACKEND", "1") != "1":
        pytest.skip(f"CUDA C++ backend not built here: {why or 'GRADREG_TEST_CUDA_BACKEND=0'}")
    return CudaBackend()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,params", ACTS)
def test_cuda_activation_steps(kernels, name, params, dtype, device, poison):
    spec = spec_by_name(name, *params)
    g = torch.Generator().manual_seed(11)
    z = (2.5 * torch.randn(29, 37, generator=g)).t().to(device, dtype)
    d, r, u, s = (torch.randn(37, 29, generator=g).to(device, dtype) for _ in range(4))
    z64, d64, r64, u64, s64 = (t.double() for t in (z, d, r, u, s))
    tol = TOL[dtype]
    y, saved = kernels.act_forward(spec, z)
    y_ref, saved_ref = REF.act_forward(spec, z64)
    assert rel_err(y, y_ref) < tol
    assert rel_err(kernels.act_chain(spec, saved, d), REF.act_chain(spec, saved_ref, d64)) < tol
    t_out, t_s = kernels.act_tangent(spec, saved, r, u if spec.smooth else None)
    t_ref, s_ref = REF.act_tangent(spec, saved_ref, r64, u64 if spec.smooth else None)
    assert rel_err(t_out, t_ref) < tol
    if spec.smooth:
        assert rel_err(t_s, s_ref) < tol
    s_in, s_in64 = (s, s64) if spec.smooth else (None, None)
    assert rel_err(kernels.act_backward(spec, saved, d, s_in),
                   REF.act_backward(spec, saved_ref, d64, s_in64)) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 10), (129, 37), (70, 1000)])
def test_cuda_softmax_head(kernels, n, k, dtype, device, poison):
    g = torch.Generator().manual_seed(n + k)
    z = (4 * torch.randn(n, k, generator=g)).to(device, dtype)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    ce, p = kernels.softmax_ce(z, y)
    ce_ref, p_ref = REF.softmax_ce(z.double(), y)
    tol = max(TOL[dtype], 1e-6)
    assert rel_err(ce, ce_ref) < tol and rel_err(p, p_ref) < tol
    t = torch.randn(n, k, generator=g).to(device, dtype)
    assert rel_err(kernels.softmax_hvp(p, t), REF.softmax_hvp(p_ref, t.double())) < tol


def test_cuda_softmax_ce_out_of_range_label_gives_nan(kernels, device):
    z = torch.randn(3, 5, device=device)
    ce, _ = kernels.softmax_ce(z, torch.tensor([0, 5, -1], device=device))
    assert torch.isfinite(ce[0]) and torch.isnan(ce[1:]).all()
