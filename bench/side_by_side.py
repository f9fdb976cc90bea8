"""Interleaved timing of several steps on one workload: ratios that survive a noisy machine.

Each round runs every step once, in an order rotated from round to round, so load from
other processes falls on all steps alike; the median over rounds is reported per step.

    python bench/side_by_side.py [--rounds 30] [--workload NAME ...] [--steps a,b,...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from workloads import (
    WORKLOADS,
    eager_double_backprop,
    fused_step,
    make_workload,
    ordinary_step,
)

Step = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], None]


def default_steps() -> dict[str, Step]:
    from gradreg_kernels.backends import _REGISTRY

    steps: dict[str, Step] = {"ordinary_step": ordinary_step,
                              "eager_double_backprop": eager_double_backprop}
    for name, entry in sorted(_REGISTRY.items()):
        if "cpu" in entry.device_types and entry.available() is None and entry.priority >= 0:
            steps[f"fused_{name}"] = fused_step(name)
    return steps


def measure(workload: str, steps: dict[str, Step], rounds: int = 30, warmup: int = 3
            ) -> dict[str, float]:
    """Median milliseconds of each step on ``workload``, interleaved over ``rounds``."""
    model, x, y = make_workload(workload)
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n](model, x, y)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            steps[n](model, x, y)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) * 1e3 for n, ts in times.items()}


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: per workload and step, median ms, speed-up over eager, × ordinary step."""
    lines = ["| workload | step | median ms | speed-up vs eager double backprop "
             "| × ordinary step |", "|---|---|---:|---:|---:|"]
    for wl, res in results.items():
        eager, ordinary = res.get("eager_double_backprop"), res.get("ordinary_step")
        for step, ms in sorted(res.items(), key=lambda kv: kv[1]):
            sp = f"{eager / ms:.2f}" if eager else "-"
            od = f"{ms / ordinary:.2f}" if ordinary else "-"
            lines.append(f"| {wl} | {step} | {ms:.2f} | {sp} | {od} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workload", nargs="*", default=sorted(WORKLOADS))
    ap.add_argument("--steps", default="", help="comma-separated subset of the step names")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = default_steps()
    if args.steps:
        steps = {k: v for k, v in steps.items() if k in args.steps.split(",")}
    results = {wl: measure(wl, steps, args.rounds) for wl in args.workload}
    print(table(results))


if __name__ == "__main__":
    main()
