"""Shared helpers of the Triton kernels: interpreter detection, launch sizes, dtypes."""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: dtypes the kernels take; each computes in float32 and stores in the operand's dtype.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: elements per program of the flat elementwise kernels.
ELEMENT_BLOCK = 1024


def flat_grid(n: int, block: int = ELEMENT_BLOCK) -> tuple[int]:
    """Programs covering n elements in blocks of ``block``."""
    return (max(1, (n + block - 1) // block),)


def supported(*ts: torch.Tensor | None) -> bool:
    """Whether every given tensor has a dtype the Triton kernels take (None is ignored)."""
    return all(t is None or t.dtype in KERNEL_DTYPES for t in ts)
