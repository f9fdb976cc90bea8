"""Record every interpreted Triton launch of the kernel cases: which kernel, with which
argument types and compile-time constants (for tests/test_triton_compile.py, which compiles
each recorded launch for an H100/H200 without one).

Installed by conftest.py when GRADREG_RECORD_LAUNCHES names a file (interpreter only); the
records are written there as JSON when the run ends. One record per distinct launch:
    {"module": ..., "name": ..., "signature": {arg: "*fp32" | "i32" | ... | "constexpr"},
     "constexprs": {arg: value}, "options": {"num_warps": ..., ...}}
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch

_PTR = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
        torch.float64: "fp64", torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16",
        torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
#: launch options the interpreter receives as keywords but that are not kernel arguments
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

_records: dict[str, dict] = {}


def _constexpr_names(fn) -> set[str]:
    """Parameters annotated tl.constexpr (the annotation may be a string)."""
    names = set()
    for p in inspect.signature(fn).parameters.values():
        if "constexpr" in str(p.annotation):
            names.add(p.name)
    return names


def _arg_type(value) -> str:
    """Triton's signature type of one runtime argument, as the JIT would derive it."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _PTR:
            raise TypeError(f"no Triton pointer type recorded for {value.dtype}")
        return "*" + _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unrecorded argument type {type(value).__name__}")


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constexpr value {value!r} cannot be recorded")


def record(fn, arg_names: list[str], args: tuple, kwargs: dict) -> None:
    """Add one launch of the kernel function ``fn`` (positional ``args``, keyword ``kwargs``)."""
    consts = _constexpr_names(fn)
    bound = dict(zip(arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in arg_names})
    sig, cvals = {}, {}
    for name in arg_names:
        value = bound.get(name)
        if name in consts or value is None:
            sig[name], cvals[name] = "constexpr", _jsonable(value)
        else:
            sig[name] = _arg_type(value)
    opts = {k: kwargs[k] for k in _OPTIONS if kwargs.get(k) is not None}
    rec = {"module": fn.__module__, "name": fn.__name__, "signature": sig,
           "constexprs": cvals, "options": opts}
    _records.setdefault(json.dumps(rec, sort_keys=True), rec)


def install() -> None:
    """Wrap the interpreter's launch so that every launch is recorded before it runs."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        record(self.fn, self.arg_names, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def dump(path: str | os.PathLike) -> None:
    """Write the distinct launches recorded so far (atomically: a temporary file, renamed)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(list(_records.values()), indent=1, sort_keys=True))
    tmp.replace(path)
