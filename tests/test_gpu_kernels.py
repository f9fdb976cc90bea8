"""On a CUDA device: every Triton and CUDA kernel and the whole fused step vs the oracle.

The same cases as the interpreter run (tests/kernel_cases), on CUDA tensors with TF32 off,
in a child pytest (clean of any TRITON_INTERPRET setting of this process).
"""

from __future__ import annotations

import pytest
import torch
from test_triton_interpret import run_kernel_cases

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_kernel_cases_on_cuda():
    res = run_kernel_cases({"TRITON_INTERPRET": "0", "GRADREG_KERNEL_DEVICE": "cuda"}, 1200)
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "failed" not in res.stdout
