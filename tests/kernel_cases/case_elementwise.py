"""Triton activation steps vs the portable float64 reference, every activation and dtype."""

from __future__ import annotations

import pytest
import torch
from kernel_check import TOL, rel_err

from gradreg_kernels.activation_math import spec_by_name
from gradreg_kernels.backends.torch_ops import TorchBackend

ACTS = [("relu", ()), ("leaky_relu", (0.1,)), ("softplus", (1.5, 3.0)),
        ("softplus", (1.0, 20.0)), ("softplus", (0.5, 15.0)), ("tanh", ()), ("sigmoid", ()),
        ("gelu", ()), ("gelu_tanh", ()), ("elu", (0.7,)), ("silu", ()), ("mish", ()),
        ("hardswish", ())]
#: float32 states that are the output y (σ', σ'' recomputed from it)
FROM_Y = {("softplus", (1.0, 20.0)), ("softplus", (0.5, 15.0)), ("tanh", ()), ("sigmoid", ()),
          ("elu", (0.7,))}
REF = TorchBackend()


def _triton():
    from gradreg_kernels.backends.triton import TritonBackend

    return TritonBackend()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,params", ACTS)
def test_activation_steps_match_reference(name, params, dtype, device, poison):
    kernels, spec = _triton(), spec_by_name(name, *params)
    g = torch.Generator().manual_seed(7)
    # non-contiguous z (a transpose) with odd sizes; values across the kinks
    z = 2.5 * torch.randn(29, 37, generator=g)
    # both sides of softplus' linear region, and where 1 − e^{−βy} cancels
    z[0, :10] = torch.tensor([19.99, 20.01, 29.99, 30.01, -12.0, -4.0, -2.2, -1.9, 0.0, 1e-6])
    z = z.t().to(device, dtype)
    d, r, u, s = (torch.randn(37, 29, generator=g).to(device, dtype) for _ in range(4))
    z64, d64, r64, u64, s64 = (t.double() for t in (z, d, r, u, s))
    tol = TOL[dtype]

    y, saved = kernels.act_forward(spec, z)
    y_ref, saved_ref = REF.act_forward(spec, z64)
    assert y.dtype == dtype and rel_err(y, y_ref) < tol
    from_y = dtype == torch.float32 and (name, params) in FROM_Y
    assert saved.from_y == from_y and (saved.tensor is y) == from_y
    assert rel_err(kernels.act_chain(spec, saved, d), REF.act_chain(spec, saved_ref, d64)) < tol
    t_out, t_s = kernels.act_tangent(spec, saved, r, u if spec.smooth else None)
    t_ref, s_ref = REF.act_tangent(spec, saved_ref, r64, u64 if spec.smooth else None)
    assert rel_err(t_out, t_ref) < tol
    if spec.smooth:
        assert rel_err(t_s, s_ref) < tol
    else:
        assert t_s is None
    s_in = s if spec.smooth else None
    s_in64 = s64 if spec.smooth else None
    back = kernels.act_backward(spec, saved, d, s_in)
    assert rel_err(back, REF.act_backward(spec, saved_ref, d64, s_in64)) < tol


@pytest.mark.parametrize("n", [1, 8, 13, 1024, 1031, 3000])
def test_relu_keeps_a_one_bit_mask(n, device):
    """(n + 7) // 8 bytes, bit i % 8 of byte i // 8 set where z_i > 0 (across program
    blocks and a ragged tail), and the portable path unpacks it."""
    from gradreg_kernels.backends.triton.elementwise import unpack_mask

    kernels, spec = _triton(), spec_by_name("relu")
    z = torch.randn(n, device=device)
    _, saved = kernels.act_forward(spec, z)
    assert saved.tensor.dtype == torch.uint8 and saved.tensor.numel() == (n + 7) // 8
    bits = ((saved.tensor[:, None].long() >> torch.arange(8, device=device)) & 1).flatten()
    assert torch.equal(bits[:n].bool(), z > 0) and not bits[n:].any()
    assert torch.equal(unpack_mask(saved.tensor, z.shape), z > 0)
    d = torch.randn(n, device=device, dtype=torch.float64)  # the portable path
    assert torch.equal(kernels.act_chain(spec, saved, d), d * (z > 0))


def test_float64_takes_the_portable_path(device):
    kernels, spec = _triton(), spec_by_name("tanh")
    z = torch.randn(4, 3, device=device, dtype=torch.float64)
    y, saved = kernels.act_forward(spec, z)
    assert torch.equal(y, torch.tanh(z)) and saved is z


@pytest.mark.parametrize("name,params", sorted(FROM_Y))
def test_output_state_on_the_portable_path(name, params, device):
    """A float32 state kept as y, met by float64 operands (the portable path): σ', σ''
    recomputed from y in torch ops agree with the float64 reference."""
    kernels, spec = _triton(), spec_by_name(name, *params)
    g = torch.Generator().manual_seed(3)
    z = (2.5 * torch.randn(7, 11, generator=g)).to(device)
    d, r, u, s = (torch.randn(7, 11, generator=g, dtype=torch.float64).to(device)
                  for _ in range(4))
    _, saved = kernels.act_forward(spec, z)
    assert saved.from_y
    _, ref = REF.act_forward(spec, z.double())
    tol = 1e-5
    assert rel_err(kernels.act_chain(spec, saved, d), REF.act_chain(spec, ref, d)) < tol
    out, s_out = kernels.act_tangent(spec, saved, r, u)
    out_ref, s_ref = REF.act_tangent(spec, ref, r, u)
    assert rel_err(out, out_ref) < tol and rel_err(s_out, s_ref) < tol
    assert rel_err(kernels.act_backward(spec, saved, d, s), REF.act_backward(spec, ref, d, s)) < tol
