"""The cost of the head at the logits, side by side: the MLP 784-512-512-10 (ReLU, B = 256,
2 threads, float32) with the fused step under the named head "mse", a callable MSE
(autograd on the logits) and the named "ce", against eager double backprop with the same
MSE. Interleaved rounds (side_by_side.measure); prints a markdown table and the callable
head's cost over the named one, as a share of the step.

    python bench/heads_bench.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import cpu_workloads as cw
import torch
import torch.nn.functional as F
from workloads import mlp

from gradreg_kernels import gradreg_loss

LAM = 0.5
B = 256


def mse(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-example MSE as a user writes it."""
    return F.mse_loss(z, y, reduction="none").mean(1)


def make() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(B, 784)
    labels = torch.randint(0, 10, (B,))
    return model, x, labels, F.one_hot(labels, 10).float()


def steps(model, x, labels, targets) -> dict[str, object]:
    def fused(head, y):
        def step():
            model.zero_grad(set_to_none=True)
            gradreg_loss(model, x, y, LAM, head=head, backend="cpu").loss.backward()
        return step

    def eager():
        model.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_(True)
        ell = mse(model(xg), targets)
        (g,) = torch.autograd.grad(ell.sum(), xg, create_graph=True)
        (ell.mean() + LAM * g.pow(2).flatten(1).sum(1).mean()).backward()

    return {"fused_named_mse": fused("mse", targets), "fused_callable_mse": fused(mse, targets),
            "fused_named_ce": fused("ce", labels), "eager_double_backprop_mse": eager}


def measure(rounds: int = 40, warmup: int = 3) -> dict[str, float]:
    """Median ms of each step, interleaved (each round rotates the order)."""
    fns = steps(*make())
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) * 1e3 for n, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    cw.set_threads()
    res = measure(args.rounds)
    eager = res["eager_double_backprop_mse"]
    print("| step | median ms | speed-up vs eager double backprop (MSE) |")
    print("|---|---:|---:|")
    for n, ms in sorted(res.items(), key=lambda kv: kv[1]):
        print(f"| {n} | {ms:.2f} | {eager / ms:.2f} |")
    extra = res["fused_callable_mse"] - res["fused_named_mse"]
    print(f"\ncallable head over the named one: {extra:+.3f} ms, "
          f"{100 * extra / res['fused_named_mse']:+.1f} % of the step")


if __name__ == "__main__":
    main()
