"""The precision of the cpu backend's step under CPU autocast (docs/math.md, "Precision").

Outside autocast every tensor of the step is float32. Under ``torch.autocast("cpu", dtype)``:

- bf16 on a CPU where oneDNN multiplies it natively (AVX-512 BF16 or AMX): the products run
  in bf16 with float32 accumulation and the tensors they read and write are stored in bf16;
- anything else (bf16 where oneDNN would emulate it, or float16, for which the backend's
  kernels have no reduced-precision path): the step runs in float32 as if autocast were
  off, and says so once. An emulated product costs tens of times a float32 one (float16
  on an AVX-512 CPU without FP16: 78 ms against 1.2 ms for 256×784 by 784×512).
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


_any_autocast = torch._C._is_any_autocast_enabled  # one cheap call: the float32 steps' path


def autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype in force (bf16 / float16), or None outside CPU autocast."""
    if not _any_autocast() or not torch.is_autocast_enabled("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    return dtype if dtype in LOW_DTYPES else None


def product_dtype() -> torch.dtype | None:
    """bf16 where the step runs in it (bf16 autocast, native here), else None (float32)."""
    dtype = autocast_dtype()
    return dtype if dtype == torch.bfloat16 and native(dtype) else None


_SAID: set[torch.dtype] = set()


def float32_scope() -> contextlib.AbstractContextManager:
    """A context for the whole fused step: autocast turned off where its dtype is emulated
    here (said once per dtype), else nothing changed."""
    dtype = autocast_dtype()
    if dtype is None or product_dtype() is not None:
        return contextlib.nullcontext()
    if dtype not in _SAID:
        _SAID.add(dtype)
        why = (f"this CPU has no native {dtype} products (oneDNN would emulate them, tens "
               f"of times slower than float32)" if not native(dtype) else
               f"its reduced-precision kernels are bf16, not {dtype}")
        warnings.warn(f"gradreg_kernels: the cpu backend runs the fused step in float32 "
                      f"under this autocast: {why}", RuntimeWarning, stacklevel=3)
    return torch.autocast("cpu", enabled=False)
