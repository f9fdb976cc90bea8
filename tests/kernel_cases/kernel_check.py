"""Shared constants and the error measure of the kernel cases (imported by name, so the
cases never depend on which conftest module Python last saw)."""

from __future__ import annotations

import os

import torch

DEVICE = os.environ.get("GRADREG_KERNEL_DEVICE", "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: relative tolerance of one kernel step against its float64 reference, per operand dtype
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def step_backends() -> list[str]:
    """The backends whole steps are checked on: "triton", and "cuda" on a CUDA device where
    that extension builds (GRADREG_TEST_CUDA_BACKEND=0 leaves it out)."""
    if DEVICE != "cuda" or os.environ.get("GRADREG_TEST_CUDA_BACKEND", "1") != "1":
        return ["triton"]
    from gradreg_kernels.backends.gpu_entries import cuda_unavailable

    return ["triton"] + (["cuda"] if cuda_unavailable() is None else [])
