"""The calls a bf16 product can go through on the CPU, side by side (interleaved rounds).

    python bench/bf16_product_calls.py [--rounds 200] [--threads 2]

For the shapes of the bench MLPs' layers and a small layer, a Wᵀ (+ b) in bf16 through
oneDNN's linear primitive (``torch.ops.mkldnn._linear_pointwise``), ``F.linear``,
``torch.mm`` and ``torch.addmm`` (both reach oneDNN's matmul for bf16, reading Wᵀ as a
strided view). The cpu backend's bf16 path (``CpuBackend._low_product``) uses mm / addmm.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from workloads import interleaved_times

SHAPES = [(2, 32, 24), (64, 64, 64), (64, 784, 512), (256, 784, 512), (256, 512, 512)]


def calls(b: int, k: int, n: int) -> dict:
    x = torch.randn(b, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    bias = torch.randn(n).bfloat16()
    lp = torch.ops.mkldnn._linear_pointwise
    return {
        "linear primitive": lambda: lp(x, w, bias, "none", [], ""),
        "F.linear": lambda: torch.nn.functional.linear(x, w, bias),
        "addmm": lambda: torch.addmm(bias, x, w.t()),
        "linear primitive, no bias": lambda: lp(x, w, None, "none", [], ""),
        "mm": lambda: torch.mm(x, w.t()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, µs per call (median)")
    names = list(calls(1, 1, 1))
    print("| a (B×K) by Wᵀ (K×N) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for shape in SHAPES:
        rounds = args.rounds if shape[0] * shape[1] * shape[2] < 1e7 else max(20, args.rounds // 5)
        times = interleaved_times(calls(*shape), rounds, warmup=10)
        cells = [f"{statistics.median(times[k]) * 1e6:.1f}" for k in names]
        print(f"| {shape[0]}×{shape[1]} by {shape[1]}×{shape[2]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
