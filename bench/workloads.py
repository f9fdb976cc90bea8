"""Benchmark workloads: the models, batches and the training steps compared side by side.

Every step function takes (model, x, y) and leaves the parameter gradients filled:
- ``ordinary_step``: mean CE, first-order backward (the yardstick, cost ~3L − 1 products);
- ``eager_double_backprop``: the same gradreg loss through autograd with create_graph=True;
- ``fused_step(backend)``: gradreg_loss on the given backend (6L − 1 products).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.models import make_model

LAM = 10 ** 4.75 / (2 * 256)  # the paper's MNIST λ in this package's convention


def mlp(widths=(784, 512, 512, 10), act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), act()]
    return nn.Sequential(*layers[:-1])


def paper_cnn() -> nn.Sequential:
    """The paper's MNIST CNN (gradreg_kernels.models): conv-BN-ReLU-pool ×2, FC 1024 with BN
    and dropout."""
    return make_model("paper-cnn", (1, 28, 28), 10)


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "mlp784-512-512-10-relu-B64": (mlp, 64),
    "mlp784-512-512-10-relu-B256": (mlp, 256),
    "mlp784-512-512-10-softplus-B256": (lambda: mlp(act=nn.Softplus), 256),
    "paper-cnn-B64": (paper_cnn, 64),
}


def make_workload(name: str, seed: int = 0, device: str = "cpu"):
    """(model in train mode, x (B,1,28,28) in [0,1], y (B,)) for a workload name."""
    make, batch = WORKLOADS[name]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make().to(device).train()
    x = torch.rand(batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, x, y


def ordinary_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def eager_double_backprop(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          lam: float = LAM) -> None:
    model.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_(True)
    ce = F.cross_entropy(model(xg), y, reduction="sum")
    (g,) = torch.autograd.grad(ce, xg, create_graph=True)
    loss = ce / x.shape[0] + lam * g.pow(2).sum() / x.shape[0]
    loss.backward()


def fused_step(backend: str, lam: float = LAM
               ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], None]:
    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        gradreg_loss(model, x, y, lam, backend=backend).loss.backward()

    step.__name__ = f"fused_{backend}"
    return step


def call_times(fn: Callable[[], object], n: int) -> list[float]:
    """The wall times of n calls of fn, in seconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn: Callable[[], object], n: int) -> float:
    """The median wall time of n calls of fn, in seconds."""
    return statistics.median(call_times(fn, n))


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, warmup: int,
                      reps: int = 1) -> dict[str, list[float]]:
    """Each fn called ``warmup`` times, then ``rounds`` rounds in which each in turn runs
    ``reps`` calls (load from other processes then hits all of them alike): the calls'
    wall times in seconds, by name."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k] += call_times(fn, reps)
    return times
