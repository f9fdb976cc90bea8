"""The CPU benchmark's models and the training steps compared on them.

Models (float32): MLP 784-512-512-10 (ReLU) at B = 64 and 256, the paper's MNIST CNN
(conv 5×5×32 → BN → ReLU → pool → conv 5×5×64 → BN → ReLU → pool → FC 1024 → BN → ReLU →
dropout 0.5 → FC 10) at B = 64, and MLPs 784-512-512-10 with Softplus and with SiLU at
B = 256, and a CNN with GroupNorm / LayerNorm / GELU at B = 64 (``norms_cnn``); the last two
go beyond the CPU issue's four models (SiLU and GELU keep z and recompute σ', σ'').
Models with their own forward (tests/graph_models.py, traced by the plan): a torchvision-
style ResNet-18 for 32×32 inputs at B = 32 and a small UNet (width 16, nearest upsampling,
a transposed convolution, skip concatenations) at B = 16, both in train mode (batch norm
with batch statistics), 3×32×32 inputs, 10 classes.

Steps: each computes every parameter gradient of one training step.
- ``fused_cpu`` / ``fused_torch``: gradreg_loss(...).loss.backward() on that backend;
- ``eager_double``: plain autograd double backprop (create_graph=True);
- ``ordinary``: the first-order step (batch-mean CE), the yardstick;
- ``jax_gradreg`` / ``jax_ordinary``: jax.jit(jax.grad(...)) of the same losses on the
  same weights (bench/jax_port.py; its dropout draws from one fixed key every step).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from workloads import eager_double_backprop, fused_step, mlp, ordinary_step, paper_cnn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import graph_models  # noqa: E402  (the user-style models of the tests)

THREADS = 2
LAM = 0.25


def set_threads() -> None:
    torch.set_num_threads(THREADS)
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                                       f"intra_op_parallelism_threads={THREADS}")


@dataclass
class Workload:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor


def norms_cnn() -> nn.Sequential:
    """A CNN with the per-sample norms: conv 5×5×32 → GroupNorm(8) → ReLU → pool → conv
    5×5×64 → GroupNorm(8) → ReLU → pool → FC 256 → LayerNorm → GELU → FC 10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.LayerNorm(256), nn.GELU(),
        nn.Linear(256, 10))


def workloads() -> list[Workload]:
    g = torch.Generator().manual_seed(0)

    def data(b: int, shape: tuple[int, ...]):
        return torch.rand((b, *shape), generator=g), torch.randint(0, 10, (b,), generator=g)

    torch.manual_seed(0)
    out = []
    for name, model, b, shape in [
        ("mlp_relu_b64", mlp(act=nn.ReLU), 64, (784,)),
        ("mlp_relu_b256", mlp(act=nn.ReLU), 256, (784,)),
        ("cnn_paper_b64", paper_cnn(), 64, (1, 28, 28)),
        ("mlp_softplus_b256", mlp(act=nn.Softplus), 256, (784,)),
        ("mlp_silu_b256", mlp(act=nn.SiLU), 256, (784,)),
        ("cnn_norms_b64", norms_cnn(), 64, (1, 28, 28)),
        ("resnet18_b32", graph_models.resnet18(num_classes=10), 32, (3, 32, 32)),
        ("unet_b16", graph_models.UNet(num_classes=10, width=16), 16, (3, 32, 32)),
    ]:
        x, y = data(b, shape)
        out.append(Workload(name, model.train(), x, y))
    return out


#: the dtype of ``torch.autocast("cpu", ...)`` every torch step runs under (None: float32)
AUTOCAST: torch.dtype | None = None


def torch_steps(w: Workload) -> dict[str, Callable[[], None]]:
    """The torch steps of workloads.py on this workload, at this table's λ, each under CPU
    autocast to ``AUTOCAST`` when it is set (forward and backward inside the context)."""
    model, x, y = w.model, w.x, w.y
    dtype = AUTOCAST

    def bound(step) -> Callable[[], None]:
        if dtype is None:
            return lambda: step(model, x, y)

        def mixed() -> None:
            with torch.autocast("cpu", dtype=dtype):
                step(model, x, y)

        return mixed

    return {"fused_cpu": bound(fused_step("cpu", LAM)),
            "fused_torch": bound(fused_step("torch", LAM)),
            "eager_double": bound(partial(eager_double_backprop, lam=LAM)),
            "ordinary": bound(ordinary_step)}


def jax_steps(w: Workload) -> dict[str, Callable[[], None]] | str:
    """The JAX steps, or why they cannot run (JAX not installed, or a mixed-precision table:
    the JAX port is float32)."""
    if AUTOCAST is not None:
        return "the JAX port runs float32 only"
    try:
        import jax
    except ImportError:
        return "jax is not installed (pip install 'gradreg-kernels[bench]')"
    from jax_graph_port import port_any
    from jax_port import make_steps, to_jax

    params, apply = port_any(w.model)
    x, y = to_jax(w.x), to_jax(w.y)
    key = jax.random.PRNGKey(0)  # one dropout draw, the same every step
    _, g1, g2 = make_steps(apply, LAM)

    def run(f):
        return lambda: jax.block_until_ready(f(params, x, y, key))

    return {"jax_gradreg": run(g1), "jax_ordinary": run(g2)}


def malloc_mode(exact_rss: bool) -> None:
    """glibc's allocation policy for this process (no-op off glibc).

    exact_rss: every block ≥ 64 KiB is mapped on allocation and unmapped on free, so the
    resident set follows live tensors (for ``peak_bytes``); else blocks up to 32 MiB are
    kept in the heap and reused, as a long-running training process sees them (for timing:
    no page faults on fresh mappings in every step).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    size = 64 * 1024 if exact_rss else 32 * 1024 * 1024
    libc.mallopt(m_mmap_threshold, size)
    libc.mallopt(m_trim_threshold, size if exact_rss else 1024 * 1024 * 1024)
    if exact_rss:
        libc.malloc_trim(0)


def status_kib(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(step: Callable[[], None], model: nn.Module) -> int:
    """Peak resident memory of one ``step`` above the resident memory before it (bytes).

    Linux only: the high-water mark VmHWM is reset through /proc/self/clear_refs before the
    step and read after it. Call it under ``malloc_mode(exact_rss=True)`` from a fresh heap
    (before any timing), where every tensor-sized block is mapped and unmapped as it is
    allocated and freed. Everything the step touches counts alike for every method
    (tensors, oneDNN scratch space, caches it fills on the way).
    """
    import gc

    step()  # warm-up: one-time caches (e.g. oneDNN primitives) are not a step's memory
    model.zero_grad(set_to_none=True)  # the step starts without gradients, ends holding them
    gc.collect()
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return max(0, status_kib("VmHWM") - base) * 1024
