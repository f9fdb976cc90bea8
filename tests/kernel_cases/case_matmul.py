"""The autotuned Triton product with fused bias + ReLU epilogue."""

from __future__ import annotations

import pytest
import torch
from kernel_check import rel_err


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("m,n,k", [(1, 7, 5), (33, 19, 40), (129, 10, 17)])
def test_linear_act(m, n, k, bias, relu, device, poison):
    from gradreg_kernels.backends.triton.matmul import linear_act

    g = torch.Generator().manual_seed(m + n + k)
    a = torch.randn(m, k, generator=g).to(device)
    w = torch.randn(k, n, generator=g).to(device).t()  # nn.Linear layout, not contiguous
    b = torch.randn(n, generator=g).to(device) if bias else None
    y, mask = linear_act(a, w, b, relu=relu)
    z = a.double() @ w.double().t() + (b.double() if bias else 0)
    assert rel_err(y, torch.relu(z) if relu else z) < 1e-5
    if relu:
        assert torch.equal(mask.bool(), z > 0) or (z.abs() < 1e-5).any()
    else:
        assert mask is None


def test_linear_act_rejects_mismatched_shapes(device):
    from gradreg_kernels.backends.triton.matmul import linear_act

    with pytest.raises(ValueError, match="linear_act needs"):
        linear_act(torch.randn(3, 4, device=device), torch.randn(5, 6, device=device), None)
