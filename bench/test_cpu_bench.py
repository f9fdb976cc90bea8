"""CPU benchmark, side by side (pytest-benchmark): ``pytest bench/test_cpu_bench.py``.

One group per model; in each, the fused step on the "cpu" and "torch" backends, eager
double backprop, the ordinary first-order step and, when JAX is installed, jax.jit of the
gradient of the same regularized loss and of the ordinary loss (2 threads, float32).
``extra_info`` holds each torch step's peak resident memory above the pre-step level,
measured in a fresh process (see cpu_workloads.peak_bytes). The groups ``<model>-bf16``
run the fused cpu step (also with its native Linear chain turned off, on the Python
schedule) and eager double backprop under ``torch.autocast("cpu",
dtype=torch.bfloat16)``, and their library products alone. The group
``float32-products-256x784x512`` runs a Linear layer's three products on oneDNN and on MKL
(bench/float32_product_libraries.py: which one the cpu backend picks on this CPU). For the
goal table with interleaved rounds use ``python bench/cpu_table.py`` (``--autocast bf16``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bf16_accuracy
import cpu_workloads as cw
import float32_product_libraries
import pytest
import step_floor
import torch
from cpu_table import REPLAYED
from product_replay import record_products, replay

cw.set_threads()
cw.malloc_mode(exact_rss=False)  # timing: glibc keeps freed blocks (memory: fresh processes)
WORKLOADS = {w.name: w for w in cw.workloads()}
TORCH_METHODS = ("fused_cpu", "fused_torch", "eager_double", "ordinary")
JAX_METHODS = ("jax_gradreg", "jax_ordinary")
ROUNDS = {"cnn_paper_b64": 8, "resnet18_b32": 3, "unet_b16": 10}
_MEMORY: dict[str, dict[str, float]] = {}


def _memory(model: str) -> dict[str, float]:
    """Peak MiB per torch step, measured in a fresh process (see cpu_table.memory)."""
    if model not in _MEMORY:
        script = Path(__file__).with_name("cpu_table.py")
        res = subprocess.run([sys.executable, str(script), "--memory-only", "--models", model],
                             capture_output=True, text=True, check=True)
        _MEMORY[model] = json.loads(res.stdout.strip().splitlines()[-1])[model]
    return _MEMORY[model]


@pytest.mark.parametrize("method", TORCH_METHODS + JAX_METHODS)
@pytest.mark.parametrize("model", list(WORKLOADS))
def test_step(benchmark, model, method):
    w = WORKLOADS[model]
    if method in JAX_METHODS:
        steps = cw.jax_steps(w)
        if isinstance(steps, str):
            pytest.skip(steps)
    else:
        if method == "fused_cpu":
            from gradreg_kernels.backends.cpu import available

            why = available()
            if why is not None:
                pytest.skip(f"cpu backend unavailable: {why}")
        steps = cw.torch_steps(w)
        benchmark.extra_info["peak_mib"] = round(_memory(model)[method], 2)
    benchmark.group = model
    benchmark.pedantic(steps[method], rounds=ROUNDS.get(model, 30), iterations=1,
                       warmup_rounds=3)


@pytest.mark.parametrize("method", REPLAYED)
@pytest.mark.parametrize("model", list(WORKLOADS))
def test_products_alone(benchmark, model, method):
    """The step's library products replayed alone (cpu_table.py --ceiling's columns)."""
    w = WORKLOADS[model]
    if method == "fused_cpu":
        from gradreg_kernels.backends.cpu import available

        why = available()
        if why is not None:
            pytest.skip(f"cpu backend unavailable: {why}")
    run = replay(record_products(cw.torch_steps(w)[method]))
    benchmark.group = model
    benchmark.name = f"products_alone_{method}"
    benchmark.pedantic(run, rounds=ROUNDS.get(model, 30), iterations=1, warmup_rounds=3)


@pytest.mark.parametrize("library", ["onednn", "mkl"])
def test_recorder_counts_the_mlp_products(monkeypatch, library):
    """MLP 784-512-512-10: eager double backprop makes 3 forward, 3 chain, 6 weight and
    input-gradient and 6 double-backward products (18); the fused cpu step makes the two
    wide layers' 11 product-sized units as 9 oneDNN calls (the weight products over the
    doubled batch) or, on MKL, as 11 calls (each two-pair weight product an mm and an
    addmm_ into it), the 10-output layer running in the extension's own kernels."""
    from gradreg_kernels.backends import cpu

    monkeypatch.setattr(cpu, "ONEDNN_PRODUCTS", library == "onednn")
    w = WORKLOADS["mlp_relu_b64"]
    steps = cw.torch_steps(w)
    eager = record_products(steps["eager_double"])
    assert len(eager) == 18
    fused = record_products(steps["fused_cpu"])
    calls = sorted(str(p.func) for p in fused)
    if library == "onednn":
        assert calls == ["mkldnn._linear_pointwise.default"] * 9
    else:
        assert calls == (["aten.addmm.default"] * 2 + ["aten.addmm_.default"] * 2
                         + ["aten.mm.default"] * 7)
    replay(fused)()  # the copies replay on their own


#: the models of the mixed-precision goal (docs/math.md, "Precision")
BF16_MODELS = ("mlp_relu_b64", "mlp_relu_b256", "mlp_softplus_b256", "mlp_silu_b256",
               "cnn_paper_b64")


def _on_python_schedule(step):
    """The step with the cpu backend's native Linear chain turned off (a plain MLP then runs
    on the Python schedule): the chain's gain, side by side."""
    def run() -> None:
        os.environ["GRADREG_KERNELS_NATIVE_CHAIN"] = "0"
        try:
            step()
        finally:
            del os.environ["GRADREG_KERNELS_NATIVE_CHAIN"]
    return run


def _bf16_steps(model: str) -> dict:
    cw.AUTOCAST = torch.bfloat16
    try:
        steps = cw.torch_steps(WORKLOADS[model])
    finally:
        cw.AUTOCAST = None
    steps["fused_cpu_python_schedule"] = _on_python_schedule(steps["fused_cpu"])
    return steps


@pytest.mark.parametrize("method", ("fused_cpu", "fused_cpu_python_schedule", "eager_double",
                                    "products:fused_cpu", "products:eager_double"))
@pytest.mark.parametrize("model", BF16_MODELS)
def test_step_bf16(benchmark, model, method):
    """The step under CPU autocast to bf16 (``products:``: its library products alone)."""
    from gradreg_kernels.backends.cpu import available

    why = available()
    if why is not None:
        pytest.skip(f"cpu backend unavailable: {why}")
    steps = _bf16_steps(model)
    base = method.removeprefix("products:")
    run = replay(record_products(steps[base])) if method != base else steps[base]
    benchmark.group = f"{model}-bf16"
    benchmark.name = {"eager_double": "eager_double_backprop"}.get(
        method, method.replace("products:", "products_alone_"))
    benchmark.pedantic(run, rounds=ROUNDS.get(model, 30), iterations=1, warmup_rounds=3)


@pytest.mark.parametrize("method", list(step_floor.steps()))
def test_step_floor(benchmark, method):
    """The schedule's per-step floor on a tiny MLP (bench/step_floor.py)."""
    from gradreg_kernels.backends.cpu import available

    why = available()
    if why is not None:
        pytest.skip(f"cpu backend unavailable: {why}")
    benchmark.group = "step-floor"
    benchmark.name = method.replace(", ", "-").replace(" ", "_")
    benchmark.pedantic(step_floor.steps()[method], rounds=100, iterations=1, warmup_rounds=10)


@pytest.mark.parametrize("model", ["mlp_relu_b64", "mlp_silu_b256"])
def test_bf16_gradients_on_bench_models_as_close_as_eager(model):
    """bench/bf16_accuracy.py's comparison, for two bench models, both value weights."""
    from gradreg_kernels.backends import cpu_autocast
    from gradreg_kernels.backends.cpu import available

    if available() is not None or not cpu_autocast.native(torch.bfloat16):
        pytest.skip("no cpu backend or no native bf16 products here")
    for vw in (1.0, 0.0):
        fused, eager = bf16_accuracy.errors(WORKLOADS[model], vw, seed=0)
        assert 1e-4 < fused <= 1.25 * eager, (model, vw, fused, eager)


@pytest.mark.parametrize("call", list(float32_product_libraries.calls(1, 1, 1)))
def test_float32_product_libraries(benchmark, call):
    """A Linear layer's three float32 products (B = 256, 784 → 512) on oneDNN and on MKL."""
    fn = float32_product_libraries.calls(256, 784, 512)[call]
    benchmark.group = "float32-products-256x784x512"
    benchmark.name = call.replace("ᵀ", "T").replace(" ", "_")
    benchmark.pedantic(fn, rounds=30, iterations=1, warmup_rounds=3)
