"""pytest-benchmark view of the GPU benchmark (skipped without CUDA).

Each model and method of gpu_bench.py timed side by side by pytest-benchmark, so
`pytest bench/` compares them in one table; gpu_bench.py is the quick, self-timed script
with memory, accuracy and the goal ratios.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [("mlp", 256), ("mlp", 4096), ("mnist_cnn", 256), ("cifar_cnn", 256)]
METHODS = ["eager", "fused torch", "fused triton", "fused cuda", "fused triton graph",
           "ordinary"]


def _step(method, model, x, y, lam):
    import gpu_bench as gb

    if method == "eager":
        return gb.eager_step(model, x, y, lam)
    if method == "ordinary":
        return gb.ordinary_step(model, x, y)
    kernels = method.split()[1]
    why = gb.backend_ready(kernels, x.device)
    if why is not None:
        pytest.skip(why)
    if method == "fused triton graph":
        return gb.graphed_step(model, x, y, lam, "triton")
    return gb.fused_step(model, x, y, lam, kernels)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,batch", CASES)
def test_gpu_step(benchmark, name, batch, method):
    from gpu_models import MODELS

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    build, in_shape, _ = MODELS[name]
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = build().to(dev)
    x = torch.rand(batch, *in_shape, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    fn = _step(method, model, x, y, 55.0)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    benchmark.group = f"{name} B={batch}"

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=30, warmup_rounds=3)
