"""Side-by-side step timing for the recipes (median milliseconds of interleaved rounds) and
the eager double-backprop step they are timed against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def side_by_side(steps: dict[str, Callable[[], object]], rounds: int = 7) -> dict[str, float]:
    """Median ms of each step, the steps interleaved round by round (load falls on all)."""
    for f in steps.values():  # warm-up (builds, plans, caches)
        f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def report(ms: dict[str, float], fused: str, eager: str) -> str:
    return (f"{fused}: {ms[fused]:.2f} ms, {eager}: {ms[eager]:.2f} ms per step "
            f"({ms[eager] / ms[fused]:.2f}x)")


def eager_ce_step(model, x, y, lam: float) -> None:
    """The step users write without the package: CE + λ mean ‖∇ₓ CE‖² by double backprop."""
    import torch
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    ce = F.cross_entropy(model(xg), y, reduction="none")
    (g,) = torch.autograd.grad(ce.sum(), xg, create_graph=True)
    (ce.mean() + lam * g.pow(2).flatten(1).sum(1).mean()).backward()
