"""The Triton activation kernels map NaN, ±inf, ±0, denormals and ±1e30 as torch's forward
does (and, on a CUDA device, the CUDA C++ kernels too)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from kernel_check import DEVICE

from gradreg_kernels.backends.triton.elementwise import ACT_CODES
from gradreg_kernels.rules.activation_math import spec_by_name

SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30, 3.5, -2.25,
            20.5, -20.5, 88.0, -88.0, 1e-3, -1e-3]
PARAMS = {"leaky_relu": (0.1,), "softplus": (2.0, 5.0), "elu": (0.5,), "hardtanh": (0.0, 6.0),
          "celu": (0.5,)}


def _check(bk_name: str, name: str, device) -> None:
    from gradreg_kernels import get_backend

    spec = spec_by_name(name, *PARAMS.get(name, ()))
    z = torch.tensor(SPECIALS * 9, dtype=torch.float32, device=device)
    with torch.no_grad():
        ref = spec.value(z.clone())
    y, _ = get_backend(bk_name, z.device).act_forward(spec, z.clone())
    y, ref = y.cpu(), ref.cpu()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), (name, y[:17], ref[:17])
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref)), (name, y[:17], ref[:17])
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref)), (name, y[:17], ref[:17])
    fin = torch.isfinite(ref)
    torch.testing.assert_close(y[fin], ref[fin], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ACT_CODES))
def test_triton_activation_forward_maps_special_values_as_torch(name, device):
    _check("triton", name, device)


@pytest.mark.skipif(DEVICE != "cuda" or os.environ.get("GRADREG_TEST_CUDA_BACKEND", "1") != "1",
                    reason="the CUDA C++ backend runs on a CUDA device")
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "softplus", "tanh", "sigmoid", "gelu",
                                  "elu", "silu", "mish", "hardswish"])
def test_cuda_activation_forward_maps_special_values_as_torch(name, device):
    _check("cuda", name, device)
