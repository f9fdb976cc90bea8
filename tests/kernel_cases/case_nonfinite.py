"""The Triton activation kernels map NaN, ±inf, ±0, denormals and ±1e30 as torch's forward
does, and their σ' and σ'' at huge finite values (±1e10 … ±1e30) are torch autograd's (and,
on a CUDA device, the CUDA C++ kernels' too)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from kernel_check import DEVICE

from gradreg_kernels.activation_math import autograd_derivatives, spec_by_name
from gradreg_kernels.backends.triton.elementwise import ACT_CODES

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


HUGE = [1e30, -1e30, 1e25, -1e25, 1e10, -1e10, 100.0, -100.0, 30.0, -30.0, 20.5, -20.5, 15.0,
        -15.0, 88.0, -88.0, 3.5, -2.25]


def _same(y: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), (what, y, ref)
    fin = torch.isfinite(ref)
    torch.testing.assert_close(y[fin], ref[fin], rtol=tol, atol=tol / 10)


def _check_derivatives(bk_name: str, name: str, device) -> None:
    from gradreg_kernels import get_backend

    spec = spec_by_name(name, *PARAMS.get(name, ()))
    z = torch.tensor(HUGE * 9, dtype=torch.float32)
    d1, d2 = autograd_derivatives(spec, z)
    kernels = get_backend(bk_name, torch.device(device))
    zd = z.to(device)
    _, saved = kernels.act_forward(spec, zd.clone())
    ones = torch.ones_like(zd)
    _same(kernels.act_chain(spec, saved, ones.clone()).cpu(), d1, f"{name} σ'")
    if spec.smooth:
        _, s = kernels.act_tangent(spec, saved, ones.clone(), ones.clone())
        s = s.cpu()
        if name == "mish":  # torch's own double backward is NaN above z = 100: its limit 0
            broken = torch.isnan(d2) & (z >= 100)
            assert (s[broken] == 0).all()
            s, d2 = s[~broken], d2[~broken]
        _same(s, d2, f"{name} σ''", tol=1e-3)


@pytest.mark.parametrize("name", sorted(ACT_CODES))
def test_triton_activation_derivatives_at_huge_values_are_torch_autograds(name, device):
    _check_derivatives("triton", name, device)


@pytest.mark.skipif(DEVICE != "cuda" or os.environ.get("GRADREG_TEST_CUDA_BACKEND", "1") != "1",
                    reason="the CUDA C++ backend runs on a CUDA device")
@pytest.mark.parametrize("name", ["softplus", "tanh", "sigmoid", "gelu", "elu", "silu", "mish",
                                  "hardswish"])
def test_cuda_activation_derivatives_at_huge_values_are_torch_autograds(name, device):
    _check_derivatives("cuda", name, device)


@pytest.mark.parametrize("name", sorted(set(ACT_CODES) - {"relu", "leaky_relu"}))
def test_triton_activation_derivative_at_nan_is_torch_autograds(name, device):
    """σ' ⊙ d at a NaN pre-activation: NaN where torch's vectorized backward gives NaN."""
    from gradreg_kernels import get_backend

    spec = spec_by_name(name, *PARAMS.get(name, ()))
    z = torch.tensor([math.nan, 0.5, -1.5, math.nan] * 16, dtype=torch.float32)
    d1, _ = autograd_derivatives(spec, z)
    kernels = get_backend("triton", torch.device(device))
    _, saved = kernels.act_forward(spec, z.to(device))
    got = kernels.act_chain(spec, saved, torch.ones_like(z).to(device)).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(d1)), (name, got[:4], d1[:4])
