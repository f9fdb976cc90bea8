"""The GPU backends' registration: present by name, never imported or built eagerly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradreg_kernels import backend_names, get_backend

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_backends_are_registered():
    assert {"triton", "cuda", "torch"} <= set(backend_names())


def test_import_does_not_import_triton_or_build():
    code = ("import sys, gradreg_kernels; "
            "assert 'triton' not in sys.modules; "
            "assert 'torch.utils.cpp_extension' not in sys.modules; "
            "print('ok')")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter allows CPU")
def test_cpu_tensors_get_clear_errors_and_auto_is_portable():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend 'triton' runs on"):
        get_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend 'cuda' runs on"):
        get_backend("cuda", cpu)
    assert get_backend("auto", cpu).name != "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_backend_says_why_it_is_unavailable():
    from gradreg_kernels.backends.gpu_entries import cuda_unavailable

    assert "CUDA" in cuda_unavailable()
