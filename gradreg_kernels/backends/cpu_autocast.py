"""The precision of the cpu backend's step under CPU autocast (docs/math.md, "Precision").

Outside autocast every tensor of the step is float32. Under ``torch.autocast("cpu", dtype)``:

- where oneDNN has native products in ``dtype`` (bf16 on CPUs with AVX-512 BF16 or AMX;
  float16 on CPUs with AVX-512 FP16 or AMX-FP16), the products run in it with float32
  accumulation and the tensors they read and write are stored in it;
- where it has not, a product in ``dtype`` is emulated and costs tens of times a float32
  one (float16 on an AVX-512 CPU without FP16: 78 ms against 1.2 ms for 256×784 by 784×512),
  so the step runs in float32 as if autocast were off, and says so once.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

LOW_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def native(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs products in ``dtype`` natively on this CPU."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype in force (bf16 / float16), or None outside CPU autocast."""
    if not torch.is_autocast_enabled("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    return dtype if dtype in LOW_DTYPES else None


def product_dtype() -> torch.dtype | None:
    """The dtype the products run in: the autocast dtype where it is native here, else None
    (float32: outside autocast, or under an autocast dtype this CPU only emulates)."""
    dtype = autocast_dtype()
    return dtype if dtype is not None and native(dtype) else None


_SAID: set[torch.dtype] = set()


def float32_scope() -> contextlib.AbstractContextManager:
    """A context for the whole fused step: autocast turned off where its dtype is emulated
    here (said once per dtype), else nothing changed."""
    dtype = autocast_dtype()
    if dtype is None or native(dtype):
        return contextlib.nullcontext()
    if dtype not in _SAID:
        _SAID.add(dtype)
        warnings.warn(f"gradreg_kernels: this CPU has no native {dtype} products (oneDNN "
                      f"would emulate them, tens of times slower than float32); the cpu "
                      f"backend runs the fused step in float32 under this autocast",
                      RuntimeWarning, stacklevel=3)
    return torch.autocast("cpu", enabled=False)
