"""Shared fixtures of the kernel cases (files case_*.py, run by test_triton_interpret.py on
the CPU under TRITON_INTERPRET=1 and by test_gpu_kernels.py on a CUDA device).

GRADREG_KERNEL_DEVICE picks the device ("cpu" by default); on the CPU the cases need the
interpreter, so without TRITON_INTERPRET=1 they skip instead of importing triton.
GRADREG_RECORD_LAUNCHES=file (interpreter only) records every kernel launch there
(launch_recorder.py), for the sm_90 compile test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from kernel_check import DEVICE, INTERPRET


def pytest_configure(config):
    if INTERPRET and os.environ.get("GRADREG_RECORD_LAUNCHES"):
        import launch_recorder

        launch_recorder.install()


def pytest_unconfigure(config):
    if INTERPRET and os.environ.get("GRADREG_RECORD_LAUNCHES"):
        import launch_recorder

        launch_recorder.dump(os.environ["GRADREG_RECORD_LAUNCHES"])


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
