"""The two libraries a float32 linear product can run on, side by side (interleaved rounds).

    python bench/float32_product_libraries.py [--rounds 40] [--threads 2]

For the bench MLPs' and the paper CNN's FC shapes, the three products of a Linear layer —
a Wᵀ (forward), d W (input gradient, W read as the view of Wᵀ) and dᵀ a (weight gradient) —
through oneDNN's linear primitive (``torch.ops.mkldnn._linear_pointwise``, the cpu backend's
call where ``cpu.ONEDNN_PRODUCTS``) and through MKL (``torch.mm``, its call elsewhere and
eager torch's). Prints the CPU capability torch dispatches, which decides the default.
Then a two-pair weight product d₁ᵀa₁ + d₂ᵀa₂ (B = 256, 784 → 512) on MKL three ways: an mm
and an addmm_ into it (the cpu backend's MKL path), and one doubled-batch mm over stacked
operands made by a cat or by the extension's transposed copy (oneDNN's path).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from workloads import interleaved_times

SHAPES = [(64, 784, 512), (256, 784, 512), (256, 512, 512), (64, 3136, 1024)]  # B, in, out


def calls(b: int, k: int, n: int) -> dict:
    a, w, d = torch.randn(b, k), torch.randn(n, k), torch.randn(b, n)
    lp = torch.ops.mkldnn._linear_pointwise
    return {
        "a Wᵀ oneDNN": lambda: lp(a, w, None, "none", [], ""),
        "a Wᵀ MKL": lambda: torch.mm(a, w.t()),
        "d W oneDNN": lambda: lp(d, w.t(), None, "none", [], ""),
        "d W MKL": lambda: torch.mm(d, w),
        "dᵀ a oneDNN": lambda: lp(d.t(), a.t(), None, "none", [], ""),
        "dᵀ a MKL": lambda: torch.mm(d.t(), a),
    }


def two_pair_calls(b: int = 256, k: int = 784, n: int = 512) -> dict:
    from gradreg_kernels.backends.cpu import extension

    ext = extension()
    d, d2, ar = torch.randn(b, n), torch.randn(b, n), torch.randn(2 * b, k)
    a, a2 = ar[:b], ar[b:]  # [a; r] as the Linear rule keeps them: one (2B, in) buffer
    return {
        "mm + addmm_": lambda: torch.mm(d.t(), a).addmm_(d2.t(), a2),
        "cat, one mm": lambda: torch.mm(torch.cat([d, d2]).t(), ar),
        "transposed copy, one mm": lambda: torch.mm(ext.transpose_cat([d, d2]), ar),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, "
          f"ms per call (median)")
    names = list(calls(1, 1, 1))
    print("| B, in, out | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for shape in SHAPES:
        times = interleaved_times(calls(*shape), args.rounds, warmup=3)
        cells = [f"{statistics.median(times[k]) * 1e3:.3f}" for k in names]
        print(f"| {shape[0]}, {shape[1]}, {shape[2]} | " + " | ".join(cells) + " |")
    times = interleaved_times(two_pair_calls(), args.rounds, warmup=3)
    print("\ntwo-pair weight product on MKL (256, 784, 512), ms: " + ", ".join(
        f"{k} {statistics.median(v) * 1e3:.3f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
