"""Where the fused cpu step's memory peaks: resident memory around every kernel call.

    python bench/memory_trace.py [--model mlp_relu_b256] [--backend cpu]

Runs one fused step (on the "cpu" backend, or another CPU backend) of a
bench/cpu_workloads.py model with every block of 64 KiB or
more mapped on allocation and unmapped on free (cpu_workloads.malloc_mode), so that the
resident set follows the live tensors, and prints it (MiB above the start of the step)
before and after each extension kernel and oneDNN product, in call order, then the
step's high-water mark, the number ``cpu_table.py`` reports as its peak. Backend methods
(a rule's step: ``conv2d``, ``bn_chain``, ...) are listed with the kernels they call
indented below them. Linux only.
"""

from __future__ import annotations

import argparse

import cpu_workloads as cw
import torch


def _shape(a: object) -> str:
    if isinstance(a, torch.Tensor):
        return str(tuple(a.shape))
    if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
        return "[" + ", ".join(str(tuple(t.shape)) for t in a) + "]"
    return ""


class _Traced:
    """Calls ``fn``, recording (RSS before, RSS after, name) in ``events`` at the position
    of the call, nested calls after it and indented."""

    depth = 0

    def __init__(self, fn, name: str, events: list) -> None:
        self.fn, self.name, self.events = fn, name, events

    def __call__(self, *args, **kwargs):
        shapes = " × ".join(_shape(a) for a in args[:2] if _shape(a))
        slot = len(self.events)
        self.events.append(None)
        before = cw.status_kib("VmRSS")
        _Traced.depth += 1
        try:
            out = self.fn(*args, **kwargs)
        finally:
            _Traced.depth -= 1
        after = cw.status_kib("VmRSS")
        self.events[slot] = (before, after, "  " * _Traced.depth + f"{self.name} {shapes}")
        return out


class _TracedExtension:
    def __init__(self, ext, events: list) -> None:
        self.ext, self.events = ext, events

    def __getattr__(self, name: str):
        return _Traced(getattr(self.ext, name), name, self.events)


def trace(model_name: str, backend: str = "cpu") -> tuple[list[tuple[int, int, str]], int, int]:
    """(events, RSS at the start of the step, its high-water mark), in KiB: one step measured
    as ``cpu_workloads.peak_bytes`` measures it, with every call traced."""
    from gradreg_kernels.backends import get_backend

    cw.set_threads()
    cw.malloc_mode(exact_rss=True)
    w = next(w for w in cw.workloads() if w.name == model_name)
    step = cw.torch_steps(w)[f"fused_{backend}"]
    step()  # warm-up: the build, oneDNN's primitive caches
    events: list[tuple[int, int, str]] = []
    start = [0]

    def traced_step() -> None:  # peak_bytes runs it twice: the second call's events stay
        events.clear()
        start[0] = cw.status_kib("VmRSS")
        step()

    kernels = get_backend(backend, w.x.device)
    ext, mm = getattr(kernels, "ext", None), getattr(kernels, "_mm", None)
    if ext is not None:  # the cpu backend: its kernels and products too
        kernels.ext = _TracedExtension(ext, events)
        kernels._mm = _Traced(mm, "oneDNN product", events)
    methods = [n for n in dir(type(kernels)) if not n.startswith("_") and n != "name"
               and callable(getattr(type(kernels), n))]
    for n in methods:
        setattr(kernels, n, _Traced(getattr(kernels, n), n, events))
    try:
        peak = cw.peak_bytes(traced_step, w.model) // 1024
    finally:
        if ext is not None:
            kernels.ext, kernels._mm = ext, mm
        for n in methods:
            delattr(kernels, n)
    return events, start[0], start[0] + peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mlp_relu_b256")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "torch"])
    args = ap.parse_args()
    events, base, hwm = trace(args.model, args.backend)
    print(f"# {args.model}: fused {args.backend} step, resident MiB above its start")
    for before, after, name in events:
        print(f"{(before - base) / 1024:6.2f} → {(after - base) / 1024:6.2f}  {name}")
    print(f"peak (VmHWM) {(hwm - base) / 1024:.2f} MiB")


if __name__ == "__main__":
    main()
