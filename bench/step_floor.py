"""The per-step floor of the fused step: the bench MLPs' shape (3 Linear, 2 ReLU, a 10-way
head) at widths of 24 and B = 2, where products and sweeps cost next to nothing, so what is
timed is the schedule itself (Python, dispatch, calls) — what a larger step cannot go
below however fast its kernels are.

    python bench/step_floor.py [--rounds 300] [--threads 2]

Times, interleaved: the fused cpu step under bf16 autocast (with and without the parameter
check, and on the Python schedule instead of the native Linear chain), in float32, and eager
double backprop under bf16 autocast (µs per step, median).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from torch import nn
from workloads import interleaved_times

from gradreg_kernels import gradreg_loss


def steps() -> dict:
    """The four steps on one tiny model and batch, by name."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                      nn.Linear(24, 10))
    x, y = torch.randn(2, 32), torch.randint(0, 10, (2,))

    def fused(bf16: bool, check: bool, native: bool = True):
        def step() -> None:
            m.zero_grad(set_to_none=True)
            os.environ["GRADREG_KERNELS_NATIVE_CHAIN"] = "1" if native else "0"
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    gradreg_loss(m, x, y, 0.1, backend="cpu", check_finite=check).loss.backward()
            finally:
                del os.environ["GRADREG_KERNELS_NATIVE_CHAIN"]
        return step

    def eager() -> None:
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(m(xx), y)
            (g,) = torch.autograd.grad(loss, xx, create_graph=True)
            (loss + 0.1 * g.pow(2).sum()).backward()

    return {"fused cpu, bf16 autocast": fused(True, True),
            "fused cpu, bf16, check_finite=False": fused(True, False),
            "fused cpu, bf16, Python schedule": fused(True, True, native=False),
            "fused cpu, float32": fused(False, True), "eager double, bf16 autocast": eager}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    times = interleaved_times(steps(), args.rounds, warmup=30)
    for k, v in times.items():
        print(f"{k}: {statistics.median(v) * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
