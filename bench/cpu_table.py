"""Side-by-side CPU table: every step of bench/cpu_workloads.py on every model, interleaved.

    python bench/cpu_table.py [--rounds 5] [--reps 10] [--models mlp_relu_b256,...]
                              [--threads 2] [--profile] [--ceiling] [--autocast bf16]

Each round times ``reps`` calls of every method in turn (after warm-up), so load from other
processes hits all methods alike; the table gives the median over rounds × reps, the ratios
the goals are stated in, and the peak resident memory of each torch step above its start.
``--profile`` adds, per model, where the fused "cpu" step spends its time (torch.profiler
self time): matrix products (oneDNN / MKL linear and convolution), the rest of the ATen
ops, and the time outside ATen ops (the C++ extension's kernels and Python).
``--ceiling`` also times, in the same rounds, the library products of the fused cpu, eager
and ordinary steps replayed alone (bench/product_replay.py), and prints the bounds they
set on this machine: eager step ÷ fused products (the most the fused step can gain on
eager) and fused products ÷ fastest ordinary step (the least it can cost against it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import cpu_workloads as cw
import torch
from product_replay import record_products, replay
from workloads import interleaved_times

TORCH_METHODS = ("fused_cpu", "fused_torch", "eager_double", "ordinary")


#: the steps whose library products --ceiling replays alone
REPLAYED = ("fused_cpu", "eager_double", "ordinary")


def measure(w: cw.Workload, rounds: int, reps: int, ceiling: bool = False
            ) -> tuple[dict, str | None]:
    steps = cw.torch_steps(w)
    if ceiling:
        steps.update({f"products:{k}": replay(record_products(steps[k])) for k in REPLAYED})
    jax_s = cw.jax_steps(w)
    note = jax_s if isinstance(jax_s, str) else None
    if note is None:
        steps.update(jax_s)
    # 3 warm-up calls each: JIT compile, oneDNN primitive caches, the build
    times = interleaved_times(steps, rounds, warmup=3, reps=reps)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return med, note


def memory(w: cw.Workload) -> dict[str, float]:
    """Peak MiB of each torch step (call under malloc_mode(exact_rss=True), before timing)."""
    steps = cw.torch_steps(w)
    return {k: cw.peak_bytes(steps[k], w.model) / 2**20 for k in TORCH_METHODS}


PRODUCT_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::addmm_",
               "aten::mkldnn_convolution", "aten::convolution_backward",
               "aten::mkldnn_convolution_backward", "aten::_convolution", "aten::bmm")


def profile_split(w: cw.Workload, steps_n: int = 10) -> str:
    """Self-time shares of the fused cpu step: products / other ATen ops / outside ATen."""
    from torch.profiler import ProfilerActivity, profile

    step = cw.torch_steps(w)["fused_cpu"]
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps_n):
            step()
    prod = other = outside = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total
        if e.key in PRODUCT_OPS:
            prod += t
        elif e.key.startswith("aten::"):
            other += t
        else:  # the autograd Function bodies: extension kernels, Python, oneDNN dispatch
            outside += t
    total = prod + other + outside
    return (f"{w.name}: {total / steps_n / 1e3:.2f} ms/step profiled; products "
            f"{prod / total:.0%}, other ATen ops {other / total:.0%}, C++ kernels + Python "
            f"{outside / total:.0%}")


def cpu_model() -> str:
    """The CPU's model name and its flags that matter to the products' dtypes."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), "x86_64"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    kept = [f for f in ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
            if f in flags]
    return f"{name} ({' '.join(kept) or 'no AVX-512'})"


def _fastest_ordinary(med: dict) -> float:
    """The faster ordinary step's median: eager PyTorch or JAX jit (when it ran)."""
    return min(med["ordinary"], med.get("jax_ordinary", float("inf")))


def row(name: str, med: dict, mem: dict) -> str:
    ordinary = _fastest_ordinary(med)
    jg = med.get("jax_gradreg")
    cols = [name] + [f"{med[k]:.2f}" if k in med else "–" for k in
                     ("fused_cpu", "fused_torch", "eager_double", "jax_gradreg", "ordinary",
                      "jax_ordinary")]
    cols += [f"{med['eager_double'] / med['fused_cpu']:.2f}×",
             f"{jg / med['fused_cpu']:.2f}×" if jg else "–",
             f"{med['fused_cpu'] / ordinary:.2f}×",
             f"{mem['fused_cpu']:.1f} / {mem['eager_double']:.1f} = "
             f"{mem['fused_cpu'] / mem['eager_double']:.2f}"]
    return "| " + " | ".join(cols) + " |"


def ceiling_row(name: str, med: dict) -> str:
    """The products-alone times and the bounds they set (see --ceiling)."""
    ordinary = _fastest_ordinary(med)
    fp = med["products:fused_cpu"]

    def share(k: str) -> str:
        return f"{med['products:' + k]:.2f} ({med['products:' + k] / med[k]:.0%})"

    cols = [name] + [share(k) for k in REPLAYED]
    cols += [f"≤ {med['eager_double'] / fp:.2f}×", f"≥ {fp / ordinary:.2f}×"]
    return "| " + " | ".join(cols) + " |"


CEILING_HEADER = ("| model | fused cpu products (share of step) | eager products (share) | "
                  "ordinary products (share) | bound on speed-up vs eager | "
                  "bound on ÷ fastest ordinary |\n|" + "---|" * 6)

HEADER = ("| model | fused cpu | fused torch | eager double | JAX gradreg | ordinary | "
          "JAX ordinary | speed-up vs eager | speed-up vs JAX | ÷ fastest ordinary | "
          "peak MiB cpu / eager |\n|" + "---|" * 11)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--models", default="")
    ap.add_argument("--threads", type=int, default=cw.THREADS)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ceiling", action="store_true",
                    help="also time each step's library products replayed alone")
    ap.add_argument("--memory-only", action="store_true", help="print peak MiB as JSON")
    ap.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                    help="run every torch step under CPU autocast to this dtype")
    args = ap.parse_args()
    cw.AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast]
    cw.THREADS = args.threads
    cw.set_threads()
    # memory first, with every block of 64 KiB or more mapped on allocation and unmapped on
    # free from the very start, so that no step can reuse resident memory freed by anything
    # before it (built models left out, warm-up steps, other methods)
    cw.malloc_mode(exact_rss=True)
    wanted = set(filter(None, args.models.split(",")))
    chosen = [w for w in cw.workloads() if not wanted or w.name in wanted]
    mems = {w.name: memory(w) for w in chosen}
    if args.memory_only:
        print(json.dumps(mems))
        return
    cw.malloc_mode(exact_rss=False)
    precision = "float32" if args.autocast is None else f"CPU autocast to {args.autocast}"
    print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{precision}, ms per step (median)")
    print(HEADER)
    meds = {}
    for w in chosen:
        med, note = measure(w, args.rounds, args.reps, args.ceiling)
        meds[w.name] = med
        print(row(w.name, med, mems[w.name]), flush=True)
        if note:
            print(f"<!-- {w.name}: JAX skipped: {note} -->")
    if args.ceiling:
        print("\nLibrary products alone (ms, median; their share of the whole step), and the "
              "bounds they set on this machine:\n")
        print(CEILING_HEADER)
        for w in chosen:
            print(ceiling_row(w.name, meds[w.name]))
    if args.profile:
        print()
        for w in chosen:
            print("- " + profile_split(w), flush=True)


if __name__ == "__main__":
    main()
