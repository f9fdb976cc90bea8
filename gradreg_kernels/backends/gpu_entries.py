"""Registry entries of the GPU backends, "triton" and "cuda".

Nothing here imports triton or compiles anything: each entry checks availability cheaply
and builds its backend on first use, so ``import gradreg_kernels`` never needs either.
Under TRITON_INTERPRET=1 the Triton backend also accepts CPU tensors (kernels interpreted).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil

import torch

from .torch_ops import TorchBackend


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device_types() -> tuple[str, ...]:
    return ("cuda", "cpu") if triton_interpreting() else ("cuda",)


@functools.cache  # checked on every "auto" call: once per process is enough
def triton_unavailable() -> str | None:
    """None when the Triton backend can run, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not triton_interpreting() and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to interpret the kernels on CPU)"
    return None


def make_triton() -> TorchBackend:
    from .triton import TritonBackend

    return TritonBackend()


@functools.cache
def cuda_unavailable() -> str | None:
    """None when the CUDA C++ backend can be built and run, else why not."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "no CUDA device or torch was built without CUDA"
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        return "ninja is not installed (needed to build the CUDA extension)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "CUDA_HOME not found (nvcc is needed to build the CUDA extension)"
    return None


def make_cuda() -> TorchBackend:
    from .cuda import CudaBackend

    return CudaBackend()
