"""A training step with gradreg_loss under torch.compile: first-call (compile) time and
steady step time, against the same step uncompiled, for the MLP 784-512-512-10 (ReLU,
B = 256, 2 threads) and a three-layer tanh MLP 20-32-32-5 (B = 16). gradreg_loss and the
fused backward are excluded from dynamo (torch.compiler.disable, applied at the first
call): the step compiles around
one opaque call. ``--traced`` also lets dynamo trace into the package (what it did before
the exclusion), on the small MLP only: on the large one that did not finish 20 steps in
10 minutes.

    python bench/compile_bench.py [--rounds 30] [--traced]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import cpu_workloads as cw
import torch
from torch import nn

import gradreg_kernels.loss as loss_mod


def _model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp784":
        from workloads import mlp

        return mlp(), torch.randn(256, 784), torch.randint(0, 10, (256,))
    return (nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 5)), torch.randn(16, 20), torch.randint(0, 5, (16,)))


def measure(name: str, compiled: bool, rounds: int) -> tuple[float, float, int]:
    """(first call s, median step ms, warnings on the first call)."""
    model, x, y = _model(name)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        out = loss_mod.gradreg_loss(model, x, y, 0.5)
        out.loss.backward()
        opt.step()

    run = torch.compile(step) if compiled else step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times) * 1e3, len(caught)


def _one(name: str, compiled: bool, traced: bool, rounds: int, queue) -> None:
    """One configuration in a fresh process (no dynamo cache or state shared)."""
    cw.set_threads()
    if traced:
        loss_mod.gradreg_loss = loss_mod.gradreg_loss.__wrapped__
        loss_mod._Runner.backward = loss_mod._Runner.backward.__wrapped__
    queue.put(measure(name, compiled, rounds))


def main(argv: list[str] | None = None) -> None:
    import multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--traced", action="store_true",
                   help="also let dynamo trace into gradreg_loss (the exclusion undone)")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    print("| model | step | first call s | median step ms | warnings |")
    print("|---|---|---:|---:|---:|")
    configs = [(False, False), (True, False)] + ([(True, True)] if args.traced else [])
    for name in ("mlp20", "mlp784"):
        for compiled, traced in configs:
            if traced and name == "mlp784":  # did not finish 20 steps in 10 minutes
                continue
            queue = ctx.Queue()
            proc = ctx.Process(target=_one, args=(name, compiled, traced, args.rounds, queue))
            proc.start()
            first, ms, n = queue.get()
            proc.join()
            label = ("compiled, traced into" if traced else "compiled") if compiled \
                else "uncompiled"
            print(f"| {name} | {label} | {first:.2f} | {ms:.2f} | {n} |")


if __name__ == "__main__":
    main()
