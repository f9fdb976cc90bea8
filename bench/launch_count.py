"""Kernel launches and host synchronizations of one training step, counted on this CPU.

    python bench/launch_count.py [--models mnist_cnn,mlp] [--batch 8] [--json FILE]

On a GPU every ATen operator that computes something launches (at least) one kernel, and
every Triton call launches one; the host pays ~25 µs for the first and ~100 µs for the
second whether the kernel is big or tiny. Here the same step runs on CPU tensors with the
Triton kernels interpreted (TRITON_INTERPRET=1), and ``count_step`` records:

- ``aten``: ATen operators dispatched that would launch a kernel on a GPU. Views, aliases,
  metadata and bare allocations (``empty*``) launch nothing and are counted apart
  (``free``);
- ``triton``: Triton kernel launches (each one launch on a GPU);
- ``syncs``: operators and methods that read a device value back to the host
  (``.item()``, ``bool(t)``, ``nonzero``, ``equal``, ``tolist``, ``cpu``, ``numpy``), each a
  host synchronization on a GPU.

ATen operators run inside an interpreted Triton launch (the interpreter's own copies) are
not counted: on a GPU the launch is one kernel. A library call that launches several
kernels (cuDNN's convolution backward) counts as one on both sides, so ratios against
eager are what the counts show. The CUDA C++ backend's kernels cannot run here and are not
counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

if __name__ == "__main__" and not os.environ.get("TRITON_INTERPRET"):
    # run as a script: the Triton kernels on the CPU (set before triton is imported); an
    # importer (the tests) keeps its own environment, which its child processes inherit
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: operators that read a value back to the host (a synchronization on a GPU)
SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "equal",
                      "_assert_async"})
#: operators that allocate or change metadata only (no kernel)
FREE_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty",
                      "new_empty_strided", "_unsafe_view", "resize_", "set_",
                      "lift_fresh", "detach", "alias", "_reshape_alias", "view",
                      "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
                      "is_same_size", "_has_compatible_shallow_copy_type"})


def _name(func) -> str:
    return func._schema.name.split("::", 1)[-1]


def _returns_tensor(func) -> bool:
    """Whether the operator returns a tensor (``promote_types`` and the size queries do not)."""
    return any("Tensor" in str(r.type) for r in func._schema.returns)


def _is_view(func) -> bool:
    """Whether the operator returns an alias of an input without writing it (a view)."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write
                              for r in rets)


@dataclass
class LaunchCount:
    """What one step dispatched; ``ops`` counts the launching ATen operators by name."""

    aten: int = 0
    triton: int = 0
    syncs: int = 0
    free: int = 0
    ops: Counter = field(default_factory=Counter)
    kernels: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)

    @property
    def launches(self) -> int:
        """Kernel launches a GPU would make: launching ATen operators plus Triton calls."""
        return self.aten + self.triton


class _Counting(TorchDispatchMode):
    def __init__(self, count: LaunchCount) -> None:
        super().__init__()
        self.count = count
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_triton:
            name = _name(func)
            if name in SYNC_OPS:
                self.count.syncs += 1
                self.count.sync_ops[name] += 1
                if name == "nonzero":  # computes on the device, then reads the size back
                    self.count.aten += 1
                    self.count.ops[name] += 1
            elif name in FREE_OPS or _is_view(func) or not _returns_tensor(func):
                self.count.free += 1
            else:
                self.count.aten += 1
                self.count.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _triton_hook(mode: _Counting):
    """Count interpreted Triton launches (and hide the interpreter's own ATen calls)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # no triton: nothing of it can launch
        yield
        return
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        mode.count.triton += 1
        mode.count.kernels[self.fn.__name__] += 1
        mode.inside_triton += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.inside_triton -= 1

    InterpretedFunction.run = counting_run
    try:
        yield
    finally:
        InterpretedFunction.run = run


#: Tensor methods that read a device tensor back without dispatching an operator on a CPU
#: tensor (on a GPU each is a synchronization)
READ_BACK_METHODS = ("tolist", "cpu", "numpy")


@contextmanager
def _read_back_hook(mode: _Counting):
    saved = {m: getattr(torch.Tensor, m) for m in READ_BACK_METHODS}

    def counting(method: str):
        orig = saved[method]

        def read_back(self, *args, **kwargs):
            if not mode.inside_triton:
                mode.count.syncs += 1
                mode.count.sync_ops[method] += 1
            return orig(self, *args, **kwargs)
        return read_back

    for m in READ_BACK_METHODS:
        setattr(torch.Tensor, m, counting(m))
    try:
        yield
    finally:
        for m, f in saved.items():
            setattr(torch.Tensor, m, f)


def count_step(step: Callable[[], object]) -> LaunchCount:
    """Launches and host syncs of one call of ``step`` (run it once before, to warm up)."""
    count = LaunchCount()
    mode = _Counting(count)
    with _triton_hook(mode), _read_back_hook(mode), mode:
        step()
    return count


# ---- the steps ---------------------------------------------------------------------------
def steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float,
          backends: list[str]) -> dict[str, Callable[[], object]]:
    """The steps compared: eager double backprop, the ordinary step, the fused step per
    backend (with its default finite checks)."""
    import torch.nn.functional as F

    from gradreg_kernels import gradreg_loss

    def eager() -> None:
        model.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_(True)
        ce = F.cross_entropy(model(xx), y, reduction="sum")
        (g,) = torch.autograd.grad(ce, xx, create_graph=True)
        (ce / x.shape[0] + lam * g.pow(2).sum() / x.shape[0]).backward()

    def ordinary() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def fused(backend: str) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            gradreg_loss(model, x, y, lam, backend=backend).loss.backward()
        return step

    out: dict[str, Callable[[], object]] = {"eager double backprop": eager,
                                            "ordinary step": ordinary}
    out.update({f"fused {b}": fused(b) for b in backends})
    return out


def count_model(name: str, batch: int, backends: list[str], seed: int = 0
                ) -> dict[str, LaunchCount]:
    """Counts of every step on one bench model (bench/gpu_models.py) at ``batch``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_models import MODELS

    torch.manual_seed(seed)
    make, shape, _ = MODELS[name]
    model = make().train()
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    counts = {}
    for label, step in steps(model, x, y, 1.0, backends).items():
        step()  # warm-up: plans, builds and caches are made here, not counted
        counts[label] = count_step(step)
    return counts


def table(results: dict[str, dict[str, LaunchCount]]) -> str:
    lines = []
    for model, counts in results.items():
        eager = counts["eager double backprop"].launches
        lines += [f"### {model}", "",
                  "| step | launches | ATen | Triton | ÷ eager | host syncs |",
                  "|---|---|---|---|---|---|"]
        for label, c in counts.items():
            lines.append(f"| {label} | {c.launches} | {c.aten} | {c.triton} | "
                         f"{c.launches / eager:.2f} | {c.syncs} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mnist_cnn,mlp,cifar_cnn")
    ap.add_argument("--batch", type=int, default=8,
                    help="batch size (launch counts do not depend on it)")
    ap.add_argument("--backends", default="torch,triton")
    ap.add_argument("--ops", action="store_true", help="print the operators of each step")
    ap.add_argument("--json", help="write the counts there as JSON")
    args = ap.parse_args(argv)
    backends = args.backends.split(",")
    results = {m: count_model(m, args.batch, backends) for m in args.models.split(",")}
    print(table(results))
    if args.ops:
        for model, counts in results.items():
            for label, c in counts.items():
                print(f"{model} / {label}: {dict(c.ops.most_common())}")
                if c.kernels:
                    print(f"    Triton: {dict(c.kernels.most_common())}")
                if c.sync_ops:
                    print(f"    syncs: {dict(c.sync_ops)}")
    if args.json:
        data = {m: {k: {"launches": c.launches, "aten": c.aten, "triton": c.triton,
                        "syncs": c.syncs, "ops": dict(c.ops), "kernels": dict(c.kernels)}
                    for k, c in counts.items()} for m, counts in results.items()}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
