#!/usr/bin/env python3
"""Side-by-side speed, memory and accuracy of one gradient-regularized training step.

For each model of gpu_models.MODELS at its goal batch sizes: eager PyTorch double backprop
(create_graph=True), the fused step on "auto" (measured: backend_choice) and on the torch /
triton / cuda backends, the fused step captured (GraphedStep on triton and torch, and
AutoCapture on "auto"), the ordinary training step, and JAX jit of the same loss and of the
ordinary step when JAX is installed. float32 with TF32 off.

    PYTHONPATH=$PWD python3 bench/gpu_bench.py --out $OUT            # on a GPU
    PYTHONPATH=$PWD python3 bench/gpu_bench.py --device cpu --quick  # dry run

Times are medians: torch methods by triton.testing.do_bench (CUDA events, L2 flushed
between runs) when on a GPU, and for every method (JAX included) by amortised wall clock
(a burst of calls, one sync, divided; median over bursts). Peak memory is
torch.cuda.max_memory_allocated above what was allocated before the step; for a captured
step, at steady state (its graph's pool and the replays, after construction). Accuracy is the
relative error of all parameter gradients (one vector) against the float64 autograd oracle.
Prints a markdown table and writes gpu_bench.md and gpu_bench.json under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from gpu_models import MODELS  # noqa: E402

from gradreg_kernels import gradreg_loss  # noqa: E402
from gradreg_kernels.backends import get_backend  # noqa: E402
from reference import oracle_grads  # noqa: E402

LAM = 110.0 / 2  # λ_paper = 10^4.75 at B = 256 in the package's convention, halved


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny batches, few repetitions")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="stop starting new measurements after this many seconds")
    p.add_argument("--no-jax", action="store_true")
    p.add_argument("--no-numerics", action="store_true")
    p.add_argument("--skip-backends", default="",
                   help="comma-separated backends not to run (e.g. cuda when it cannot build)")
    return p.parse_args(argv)


# ---- timing and memory ----------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device, bursts: int, calls: int, block=None) -> float:
    """Median over bursts of (time of `calls` back-to-back calls, then one sync) / calls."""
    out = []
    for _ in range(bursts):
        sync(device)
        t0 = time.perf_counter()
        r = None
        for _ in range(calls):
            r = fn()
        if block is not None:
            block(r)
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(out)


def events_ms(fn, device) -> float | None:
    """Median ms by triton.testing.do_bench (CUDA events), or None off the GPU."""
    if device.type != "cuda":
        return None
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def peak_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ---- the steps ---------------------------------------------------------------------------
def eager_step(model, x, y, lam):
    def step():
        model.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_(True)
        ce = F.cross_entropy(model(xx), y, reduction="none")
        (g,) = torch.autograd.grad(ce.sum(), xx, create_graph=True)
        loss = ce.mean() + lam * g.pow(2).sum() / x.shape[0]
        loss.backward()
        return loss
    return step


def fused_step(model, x, y, lam, backend):
    def step():
        model.zero_grad(set_to_none=True)
        out = gradreg_loss(model, x, y, lam, backend=backend, check_finite=False)
        out.loss.backward()
        return out.loss
    return step


def ordinary_step(model, x, y):
    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return step


def graphed_step(model, x, y, lam, backend):
    from gradreg_kernels.graphs import GraphedStep

    g = GraphedStep(model, x, y, lam, backend=backend)
    return lambda: g(x, y)


def auto_captured_step(model, x, y, lam, backend):
    """gradreg_kernels.AutoCapture: captured on its first call, replayed after."""
    from gradreg_kernels import AutoCapture, GradRegLoss

    step = AutoCapture(GradRegLoss(model, lam, backend=backend))

    def run():
        return step(x, y)
    return run


def steady_peak_mb(make, device) -> float | None:
    """Peak memory of a captured step's replays above what was allocated before it was
    made: its graph's pool (held for good) and what the replays allocate, not the
    construction's warm-up transients (freed before the replays)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    fn = make()
    for _ in range(2):
        fn()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del fn
    return peak / 2**20


def backend_ready(name: str, device: torch.device) -> str | None:
    """None if the backend runs on device, else why not (builds the CUDA one: minutes)."""
    try:
        get_backend(name, device)
        return None
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"{type(e).__name__}: {e}"


# ---- JAX ---------------------------------------------------------------------------------
def jax_methods(model, x, y, lam, device):
    """{name: (fn, block)} for JAX jit of the gradreg loss and of the ordinary step."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as TF32 off
    from jax_graph_port import port_any
    from jax_port import make_steps, to_jax

    platform = "gpu" if device.type == "cuda" else "cpu"
    dev = jax.devices(platform)[0]
    params, apply = port_any(model)
    params = jax.device_put(params, dev)
    xj, yj = jax.device_put(to_jax(x), dev), jax.device_put(to_jax(y), dev)
    key = jax.random.PRNGKey(0)
    _, g_reg, g_plain = make_steps(apply, lam)

    def block(r):
        jax.block_until_ready(r)

    return {"jax jit gradreg": (lambda: g_reg(params, xj, yj, key), block),
            "jax jit ordinary": (lambda: g_plain(params, xj, yj, key), block)}


def jax_loss_check(model, x, y, lam) -> float:
    """|JAX loss − oracle loss| / |oracle loss| on CPU in float64 semantics of float32 data
    (dropout off in both): shows the JAX peer computes the same loss."""
    import jax
    from jax_graph_port import port_any
    from jax_port import make_steps, to_jax

    m = copy.deepcopy(model).cpu().float()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.eval()
    xs, ys = x[:64].cpu(), y[:64].cpu()
    _, ref_loss, _, _ = oracle_grads(copy.deepcopy(m).double(), xs.double(), ys, lam)
    with jax.default_device(jax.devices("cpu")[0]):
        params, apply = port_any(m)
        loss, _, _ = make_steps(apply, lam, train_dropout=False)
        val = float(loss(params, to_jax(xs), to_jax(ys), jax.random.PRNGKey(0)))
    return abs(val - ref_loss.item()) / abs(ref_loss.item())


# ---- accuracy ----------------------------------------------------------------------------
def eval_copy(model):
    """A copy with dropout off (so the oracle and a step see one network); BN stays train."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.eval()
    return m


def oracle_reference(model, x, y, lam) -> dict:
    """{parameter name: float64 oracle gradient} of the dropout-off network."""
    return oracle_grads(eval_copy(model).double(), x.double(), y, lam)[0]


def grad_error(model, x, y, lam, device, step_fn, ref, bf16=False) -> float:
    """Relative error of all parameter gradients of step_fn together, ‖Δ‖ / ‖ref‖, against
    the float64 oracle. One vector, because a bias feeding a train-mode BatchNorm has a
    true gradient of exactly 0, where a per-parameter ratio measures only rounding noise."""
    m = eval_copy(model)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        step_fn(m, x, y, lam)()
    diff = tot = 0.0
    for n, p in m.named_parameters():
        r = ref[n]
        diff += (p.grad.double() - r).pow(2).sum().item()
        tot += r.pow(2).sum().item()
    return (diff / max(tot, 1e-300)) ** 0.5


# ---- one model -----------------------------------------------------------------------------
def bench_model(name, batch, args, device, t_start, log) -> dict:
    build, in_shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().to(device)
    x = torch.rand(batch, *in_shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    lam = LAM
    bursts, calls = (3, 2) if args.quick else (7, 10)
    rows: list[dict] = []

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    def fused(kernels):
        return lambda: _checked(kernels, device) or fused_step(model, x, y, lam, kernels)

    methods = [("eager double backprop", lambda: eager_step(model, x, y, lam)),
               ("fused auto", fused("auto")),
               ("fused triton", fused("triton")), ("fused torch", fused("torch"))]
    if device.type == "cuda":
        methods.append(("fused triton + CUDA graph", lambda: _checked("triton", device) or
                        graphed_step(model, x, y, lam, "triton")))
        methods.append(("fused torch + CUDA graph", lambda: graphed_step(model, x, y, lam,
                                                                        "torch")))
        methods.append(("AutoCapture (auto)", lambda: auto_captured_step(model, x, y, lam,
                                                                         "auto")))
    methods.append(("ordinary step (eager)", lambda: ordinary_step(model, x, y)))
    # last: a fault in the separately compiled extension cannot spoil the other rows
    methods.append(("fused cuda", fused("cuda")))

    for label, make in methods:
        row = {"model": name, "batch": batch, "method": label}
        rows.append(row)
        if over_budget():
            row["error"] = "skipped (time budget)"
            continue
        try:
            fn = make()
            if isinstance(fn, str):
                row["error"] = f"unavailable: {fn}"
                log(f"  {name} B={batch} {label}: {row['error']}")
                continue
            for _ in range(2):  # compile / autotune / warm caches
                fn()
            sync(device)
            row["wall_ms"] = wall_ms(fn, device, bursts, calls)
            row["events_ms"] = events_ms(fn, device)
            if "graph" in label or "Capture" in label:  # steady state: the pool, replays
                del fn
                row["peak_mb"] = steady_peak_mb(make, device)
            else:
                row["peak_mb"] = peak_mb(fn, device)
        except Exception as e:  # noqa: BLE001 - one failure must not stop the others
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            log(traceback.format_exc())
        log(f"  {name} B={batch} {label}: {_fmt_row(row)}")

    if not args.no_jax:
        try:
            jm = jax_methods(model, x, y, lam, device)
        except Exception as e:  # noqa: BLE001
            jm = {}
            rows.append({"model": name, "batch": batch, "method": "jax jit gradreg",
                         "error": f"{type(e).__name__}: {str(e)[:200]}"})
        for label, (fn, block) in jm.items():
            row = {"model": name, "batch": batch, "method": label}
            rows.append(row)
            if over_budget():
                row["error"] = "skipped (time budget)"
                continue
            try:
                for _ in range(2):
                    block(fn())
                row["wall_ms"] = wall_ms(fn, device, bursts, calls, block)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            log(f"  {name} B={batch} {label}: {_fmt_row(row)}")

    numerics = {}
    if not args.no_numerics and not over_budget():
        ref = oracle_reference(model, x, y, lam)
        for label, kernels in (("eager", None), ("torch", "torch"), ("triton", "triton"),
                          ("cuda", "cuda")):
            if kernels is not None and _checked(kernels, device):
                continue
            fn = (lambda m, xx, yy, lm: eager_step(m, xx, yy, lm)) if kernels is None else \
                (lambda m, xx, yy, lm, kernels=kernels: fused_step(m, xx, yy, lm, kernels))
            for prec, bf16 in (("float32", False), ("bf16", True)):
                try:
                    numerics[f"{label} {prec}"] = grad_error(model, x, y, lam, device, fn,
                                                             ref, bf16)
                except Exception as e:  # noqa: BLE001
                    numerics[f"{label} {prec}"] = f"{type(e).__name__}: {str(e)[:120]}"
        if not args.no_jax:
            try:
                numerics["jax loss vs oracle"] = jax_loss_check(model, x, y, lam)
            except Exception as e:  # noqa: BLE001
                numerics["jax loss vs oracle"] = f"{type(e).__name__}: {str(e)[:120]}"
        log(f"  {name} B={batch} rel. gradient error vs float64 oracle: {numerics}")
    return {"model": name, "batch": batch, "rows": rows, "numerics": numerics}


_READY: dict[tuple[str, str], str | None] = {}


_SKIP: set[str] = set()


def _checked(kernels: str, device: torch.device) -> str | None:
    if kernels in _SKIP:
        return "skipped by --skip-backends"
    key = (kernels, device.type)
    if key not in _READY:
        _READY[key] = backend_ready(kernels, device)
    return _READY[key]


# ---- report --------------------------------------------------------------------------------
def _ms(row) -> float | None:
    return row.get("events_ms") or row.get("wall_ms")


def _fmt_row(row) -> str:
    if "error" in row:
        return row["error"]
    ev = row.get("events_ms")
    pk = row.get("peak_mb")
    return (f"{row['wall_ms']:.3f} ms wall" + (f", {ev:.3f} ms events" if ev else "")
            + (f", peak {pk:.1f} MiB" if pk is not None else ""))


def report(results: list[dict], header: str) -> str:
    lines = [header, ""]
    for res in results:
        rows = {r["method"]: r for r in res["rows"]}
        eager, ordinary = rows.get("eager double backprop"), rows.get("ordinary step (eager)")
        lines += [f"### {res['model']}, B = {res['batch']}", "",
                  "| method | ms (events) | ms (wall) | eager ÷ this | this ÷ ordinary | "
                  "peak MiB | peak ÷ eager |", "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['error']} | | | | | |")
                continue
            ev = f"{r['events_ms']:.3f}" if r.get("events_ms") else "–"
            sp = _ratio(eager, r, "wall_ms")
            vs_ord = _ratio(r, ordinary, "wall_ms")
            pk = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "–"
            pr = _ratio(r, eager, "peak_mb") if r.get("peak_mb") is not None else "–"
            lines.append(f"| {r['method']} | {ev} | {r['wall_ms']:.3f} | {sp} | {vs_ord} | "
                         f"{pk} | {pr} |")
        if res["numerics"]:
            nums = ", ".join(f"{k}: {_num(v)}" for k, v in res["numerics"].items())
            lines += ["", "Relative error of all parameter gradients (one vector) vs the "
                      f"float64 oracle: {nums}"]
        lines += ["", goals(rows), ""]
    return "\n".join(lines)


def _num(v) -> str:
    return f"{v:.2e}" if isinstance(v, float) else str(v)


def _ratio(a, b, key) -> str:
    if not a or not b or a.get(key) is None or b.get(key) in (None, 0) or "error" in a \
            or "error" in b:
        return "–"
    return f"{a[key] / b[key]:.2f}"


def _captured(key: str) -> bool:
    return "graph" in key or "Capture" in key


def goals(rows: dict) -> str:
    """The GPU goals: the uncaptured default ("fused auto") ≥ 1.5× eager; the fastest
    captured variant ≥ 3× eager, at least JAX jit's speed, steady-state peak ≤ 0.6× eager."""
    eager, ordinary = rows.get("eager double backprop", {}), rows.get("ordinary step (eager)", {})
    out = ["Goals"]
    auto = rows.get("fused auto", {})
    if "wall_ms" in auto and "wall_ms" in eager:
        s = eager["wall_ms"] / auto["wall_ms"]
        out.append(f"uncaptured default ≥1.5× eager: {s:.2f}× {'PASS' if s >= 1.5 else 'FAIL'}")
    fused = [r for k, r in rows.items() if _captured(k) and "wall_ms" in r]
    if not fused:
        return out[0] + ": " + ("; ".join(out[1:]) or "no fused measurement.")
    best = min(fused, key=lambda r: r["wall_ms"])
    out[0] = f"Goals (best captured: {best['method']})"
    jax_reg = rows.get("jax jit gradreg", {})
    if "wall_ms" in eager:
        s = eager["wall_ms"] / best["wall_ms"]
        out.append(f"captured ≥3× eager: {s:.2f}× {'PASS' if s >= 3 else 'FAIL'}")
    if "wall_ms" in jax_reg:
        s = jax_reg["wall_ms"] / best["wall_ms"]
        out.append(f"at least JAX jit's speed: {s:.2f}× {'PASS' if s >= 1 else 'FAIL'}")
    if "wall_ms" in ordinary:
        s = best["wall_ms"] / ordinary["wall_ms"]
        out.append(f"≤2.3× ordinary: {s:.2f}× {'PASS' if s <= 2.3 else 'FAIL'}")
    if best.get("peak_mb") is not None and eager.get("peak_mb"):
        s = best["peak_mb"] / eager["peak_mb"]
        out.append(f"peak ≤0.6× eager: {s:.2f}× {'PASS' if s <= 0.6 else 'FAIL'}")
    return out[0] + ": " + "; ".join(out[1:])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def device_header(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    else:
        dev = f"CPU ({os.cpu_count()} cores)"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "absent"
    return (f"## GPU benchmark: {dev}\n\ntorch {torch.__version__}, triton {tv}, "
            f"float32, TF32 off, λ = {LAM}")


def main(argv=None) -> int:
    args = parse_args(argv)
    _SKIP.update(b for b in args.skip_backends.split(",") if b)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    out_dir = Path(args.out)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    t_start = time.perf_counter()
    header = device_header(device)
    log(header)
    results = []
    for name in [m for m in args.models.split(",") if m]:
        if name not in MODELS:
            log(f"unknown model {name!r}; known: {list(MODELS)}")
            continue
        batches = (8,) if args.quick else MODELS[name][2]
        for b in batches:
            log(f"== {name} B={b} ({time.perf_counter() - t_start:.0f} s elapsed)")
            try:
                results.append(bench_model(name, b, args, device, t_start, log))
            except Exception:  # noqa: BLE001
                log(traceback.format_exc())
            md = report(results, header)
            write_atomic(out_dir / "gpu_bench.md", md + "\n")
            write_atomic(out_dir / "gpu_bench.json", json.dumps(results, indent=1) + "\n")
    md = report(results, header)
    print("\n" + md, flush=True)
    write_atomic(out_dir / "gpu_bench.log", "\n".join(log_lines) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
