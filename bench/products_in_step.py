"""The fused cpu step's library products as they run inside the step, against the same
products replayed back to back (cpu_table.py's "products alone"), under bf16 autocast.

    python bench/products_in_step.py [--models mlp_relu_b64,mlp_relu_b256] [--steps 40]

Inside the step a product's operands come from the sweeps before it, out of cache; the
replay runs the recorded calls one after another. The difference is part of what the step
costs beyond its products. Times per step (ms): the whole step, the torch profiler's self
time of aten::mm / aten::addmm inside it, and the replayed products (medians of rounds).
"""

from __future__ import annotations

import argparse

import cpu_workloads as cw
import torch
from product_replay import record_products, replay
from torch.profiler import ProfilerActivity, profile
from workloads import median_seconds

PRODUCTS = ("aten::mm", "aten::addmm")


def measure(w: cw.Workload, steps: int) -> tuple[float, float, float]:
    cw.AUTOCAST = torch.bfloat16
    try:
        step = cw.torch_steps(w)["fused_cpu"]
    finally:
        cw.AUTOCAST = None
    for _ in range(10):
        step()
    alone = replay(record_products(step))
    whole = median_seconds(step, steps) * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    inside = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCTS)
    return whole, inside / steps / 1e3, median_seconds(alone, steps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mlp_relu_b64,mlp_relu_b256")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    cw.set_threads()
    cw.malloc_mode(exact_rss=False)
    names = args.models.split(",")
    print("| model | whole step | products inside the step | products replayed |")
    print("|---|---|---|---|")
    for w in cw.workloads():
        if w.name in names:
            whole, inside, alone = measure(w, args.steps)
            print(f"| {w.name} | {whole:.2f} | {inside:.2f} | {alone:.2f} |")


if __name__ == "__main__":
    main()
