"""CudaBackend's Python side (dispatch, saved state, dtype rules, fallbacks) on the CPU.

The compiled extension is replaced by a torch-ops stand-in that honours the binding's
contract (same arguments, same dtype checks), so the whole fused step runs through the
backend's code paths here; the kernels themselves are checked on a GPU
(tests/kernel_cases/case_cuda_backend.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.activation_math import spec_by_name
from gradreg_kernels.backends import cuda as cuda_mod
from gradreg_kernels.backends.torch_ops import TorchBackend
from reference import oracle_grads

NAMES = {v: k for k, v in cuda_mod.ACT_CODES.items()}
PARAMS = {"leaky_relu": 1, "softplus": 2, "elu": 1}


class StandInExtension:
    """The binding's functions, in torch ops, with its dtype checks."""

    calls: dict[str, int]

    def __init__(self) -> None:
        self.calls = {}

    def _spec(self, act, p0, p1):
        name = NAMES[act]
        return spec_by_name(name, *((p0, p1)[:PARAMS.get(name, 0)]))

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def act_forward(self, z, act, p0, p1, v_pos, v_neg, save_mask, stream):
        self._count("act_forward")
        spec = self._spec(act, p0, p1)
        y = spec.value(z)
        torch.testing.assert_close(  # torch's own σ(±inf) is passed to the kernel
            torch.tensor([v_pos, v_neg]),
            spec.value(torch.tensor([float("inf"), -float("inf")])), equal_nan=True)
        return [y, (z > 0).to(torch.uint8) if save_mask else None]

    def act_chain(self, saved, d, s, act, p0, p1, stream):
        self._count("act_chain")
        if saved.dtype == torch.uint8:
            g = torch.where(saved.bool(), 1.0, p0 if act == 1 else 0.0)
        else:
            assert saved.dtype == d.dtype, "binding rejects z of another dtype"
            g = self._spec(act, p0, p1).d1(saved.float())
        out = g * d.float() + (0 if s is None else s.float())
        return out.to(d.dtype)

    def act_tangent(self, z, r, u, act, p0, p1, stream):
        self._count("act_tangent")
        assert z.dtype == r.dtype == u.dtype
        spec = self._spec(act, p0, p1)
        zf = z.float()
        return [(spec.d1(zf) * r.float()).to(r.dtype),
                (spec.d2(zf) * u.float() * r.float()).to(r.dtype)]

    def softmax_ce(self, z, y, stream):
        self._count("softmax_ce")
        ce, p = TorchBackend().softmax_ce(z.float(), y)
        return [ce, p]

    def softmax_hvp(self, p, t, stream):
        self._count("softmax_hvp")
        assert p.dtype == torch.float32
        return TorchBackend().softmax_hvp(p, t.float())


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setattr(cuda_mod, "_stream", lambda t: 0)
    monkeypatch.setattr(cuda_mod, "_ok", lambda *ts: _ok_cpu(*ts))
    kernels = cuda_mod.CudaBackend.__new__(cuda_mod.CudaBackend)
    kernels.ext = StandInExtension()
    return kernels


def _ok_cpu(*ts):
    real = [t for t in ts if t is not None]
    return all(t.dtype in cuda_mod.KERNEL_DTYPES for t in real) and \
        all(t.dtype == real[0].dtype and t.shape == real[0].shape for t in real)


def test_fused_step_through_the_cuda_backend_glue(backend, monkeypatch):
    import gradreg_kernels.loss as loss_mod

    monkeypatch.setattr(loss_mod, "get_backend", lambda name, dev: backend)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(11, 13), nn.Tanh(), nn.Linear(13, 17), nn.ReLU(),
                          nn.Linear(17, 19), nn.LeakyReLU(0.1), nn.Linear(19, 5))
    x, y = torch.rand(9, 11), torch.randint(0, 5, (9,))
    ref, _, _, _ = oracle_grads(copy.deepcopy(model).double(), x.double(), y, 0.8)
    out = gradreg_loss(model, x, y, 0.8, backend="cuda")
    out.loss.backward()
    for n, p in model.named_parameters():
        assert ((p.grad.double() - ref[n]).norm() / ref[n].norm()).item() < 1e-5, n
    for op in ("act_forward", "act_chain", "act_tangent", "softmax_ce", "softmax_hvp"):
        assert backend.ext.calls.get(op, 0) > 0, op


def test_mixed_dtypes_follow_torch_promotion(backend):
    spec = spec_by_name("leaky_relu", 0.1)
    z = torch.randn(4, 6)                      # float32 pre-activation
    _, saved = backend.act_forward(spec, z)
    d = torch.randn(4, 6, dtype=torch.bfloat16)
    out = backend.act_chain(spec, saved, d)    # torch promotes to float32: portable path
    assert out.dtype == torch.float32
    ref = TorchBackend().act_chain(spec, z, d)
    assert torch.allclose(out, ref)


def test_float64_is_left_to_the_portable_path(backend):
    spec = spec_by_name("tanh")
    z = torch.randn(3, 4, dtype=torch.float64)
    y, saved = backend.act_forward(spec, z)
    assert saved is z and torch.equal(y, torch.tanh(z))
    assert backend.ext.calls == {}
