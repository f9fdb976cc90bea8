"""Compile recorded Triton launches for a CUDA GPU that is not here (ahead of time).

    python tests/compile_launches.py LAUNCHES.json [--arch 90] [--jobs 2] [--package PKG]

LAUNCHES.json comes from the interpreted kernel cases (tests/kernel_cases/launch_recorder.py).
Each launch is compiled by Triton's full pipeline (TTIR → TTGIR → LLVM IR → PTX → cubin
through the bundled ptxas) for compute capability ``arch`` (90: H100/H200), with no driver and
no device. An autotuned kernel is compiled once per GPU config of its autotuner (imported
without the interpreter, so these are the configs a GPU run benchmarks). The interpreter
runs Python semantics; this catches what only the compiler checks: loop-carried values that
change type, non-power-of-two block shapes, dtype mismatches in tl.where / tl.dot,
constexpr misuse, shared memory beyond the device's.

With --package, every kernel (a JIT function named *_kernel) of the package's modules must
be among the launches: one never launched is reported and fails the run.

Prints one line per launch and exits 1 if any failed. Run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _kernel(module: str, name: str):
    """The JITFunction and, for an autotuned kernel, its configs."""
    sys.path.insert(0, str(HERE / "kernel_cases"))
    obj = getattr(importlib.import_module(module), name)
    configs = getattr(obj, "configs", None)
    while not hasattr(obj, "arg_names") or hasattr(obj, "configs"):
        obj = obj.fn  # unwrap Autotuner / Heuristics down to the JITFunction
    return obj, configs


def expand(records: list[dict]) -> list[dict]:
    """One compile job per (launch, GPU config), duplicates removed."""
    jobs: dict[str, dict] = {}
    for rec in records:
        _, configs = _kernel(rec["module"], rec["name"])
        variants = [rec]
        if configs:
            variants = []
            for cfg in configs:
                opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                variants.append({**rec, "constexprs": {**rec["constexprs"], **cfg.kwargs},
                                 "options": opts})
        for v in variants:
            jobs.setdefault(json.dumps(v, sort_keys=True), v)
    return list(jobs.values())


def package_kernels(package: str) -> set[tuple[str, str]]:
    """(module, name) of every JIT function named *_kernel in the package's modules."""
    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(package)
    found = set()
    for info in pkgutil.iter_modules(pkg.__path__, package + "."):
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
                obj = obj.fn
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found.add((obj.__module__, name))
    return found


def compile_one(job: dict, arch: int) -> tuple[str, str | None, int]:
    """(label, error or None, cubin bytes) of compiling one launch for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, _ = _kernel(job["module"], job["name"])
    consts = {k: v for k, v in job["constexprs"].items()}
    label = (f"{job['module'].rsplit('.', 1)[-1]}.{job['name']} "
             f"{','.join(t for t in job['signature'].values() if t.startswith('*'))} "
             f"{consts} {job['options']}")
    try:
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=consts)
        out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                             options=dict(job["options"]))
        return label, None, len(out.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - every compiler error is a finding
        return label, f"{type(e).__name__}: {e}".strip()[:2000], 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("launches")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--package", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the compile needs the real JIT", file=sys.stderr)
        return 2
    records = json.loads(Path(args.launches).read_text())
    missing = []
    if args.package:
        launched = {(r["module"], r["name"]) for r in records}
        missing = sorted(package_kernels(args.package) - launched)
    jobs = expand(records)
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_one, jobs, [args.arch] * len(jobs)))
    failed = [(label, err) for label, err, _ in results if err]
    for label, err, size in results:
        print(("FAIL " if err else "ok   ") + label + ("" if err else f" ({size} B cubin)"))
    for label, err in failed:
        print(f"\n--- {label}\n{err}")
    for module, name in missing:
        print(f"NOT LAUNCHED by any case: {module}.{name}")
    print(f"\n{len(results) - len(failed)} of {len(results)} launches compiled for sm_{args.arch}")
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
