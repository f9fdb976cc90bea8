"""Shared fixtures of the kernel cases (files case_*.py, run by test_triton_interpret.py on
the CPU under TRITON_INTERPRET=1 and by test_gpu_kernels.py on a CUDA device).

GRADREG_KERNEL_DEVICE picks the device ("cpu" by default); on the CPU the cases need the
interpreter, so without TRITON_INTERPRET=1 they skip instead of importing triton.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DEVICE = os.environ.get("GRADREG_KERNEL_DEVICE", "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    """Skip the cases (only those in this folder) where they cannot run."""
    reason = None
    if DEVICE == "cpu" and not INTERPRET:
        reason = "CPU kernel cases need TRITON_INTERPRET=1"
    elif DEVICE == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device"
    if reason is None:
        return
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.path)).resolve().parent == here:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def device() -> torch.device:
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(DEVICE)


@pytest.fixture
def poison(monkeypatch):
    """Fresh torch.empty / empty_like results are filled with NaN (floats) or 123 (ints),
    so an element a kernel forgets to write shows up in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(123)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
