"""Drop-in Functions: a user's own double-backprop step before and after ``convert``.

Groups (compare the medians inside a group; the machine is shared and noisy):
- DCGAN critic R1 step (64×64 inputs): eager torch.nn vs converted, plus the plain step
  (forward + backward, no penalty) as the yardstick;
- small CIFAR ResNet (ResNet-8, widths 16-32-64) gradient-penalty step: eager vs converted
  vs gradreg_loss (fused schedule), plus the plain step;
- on a GPU, both user steps also captured whole in a CUDA graph (graphs.CapturedStep), the
  eager one and the converted one, each on its own copy of the model; and (paired test) the
  model converted onto the portable "torch" backend, uncaptured.

    PYTHONPATH=. python -m pytest bench/test_functional_bench.py --benchmark-columns=median,iqr

Environment: GK_BENCH_DEVICE (cpu / cuda; cuda when present), GK_BENCH_BATCH (64),
GK_BENCH_ROUNDS (rounds per variant), GK_BENCH_THREADS (torch CPU threads; on an
oversubscribed shared CPU, 1 thread gives stable timings where several stall each other).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.nn import cifar_resnet, convert, dcgan_critic

DEVICE = torch.device(os.environ.get("GK_BENCH_DEVICE",
                                     "cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
BATCH = int(os.environ.get("GK_BENCH_BATCH", "64"))
ROUNDS = int(os.environ.get("GK_BENCH_ROUNDS", "30" if ON_GPU else "9"))
if "GK_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["GK_BENCH_THREADS"]))
if ON_GPU:  # float32 means float32: cuDNN would otherwise use TF32 for convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
R1_GAMMA = 10.0
GP_LAM = 1.0


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def r1_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The critic's step on real images: −mean D(x) + (γ/2) mean ‖∇_x D(x)‖² (R1)."""
    x = x.detach().requires_grad_(True)
    score = model(x)
    (g,) = torch.autograd.grad(score.sum(), x, create_graph=True)
    loss = -score.mean() + 0.5 * R1_GAMMA * g.pow(2).flatten(1).sum(1).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()


def gp_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean CE + λ mean_n ‖∇_{x_n} CE_n‖², written by hand with create_graph=True."""
    x = x.detach().requires_grad_(True)
    ce = F.cross_entropy(model(x), y, reduction="sum")
    (g,) = torch.autograd.grad(ce, x, create_graph=True)
    loss = ce / x.shape[0] + GP_LAM * g.pow(2).sum() / x.shape[0]
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()


def fused_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = gradreg_loss(model, x, y, GP_LAM, check_finite=False)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    assert out.backend != "autograd"
    return out.loss.detach()


def plain_step(model: nn.Module, loss_of) -> None:
    model.zero_grad(set_to_none=True)
    loss_of(model).backward()


def captured(fn, *inputs):
    """fn(*inputs) captured in a CUDA graph (graphs.CapturedStep), as a no-argument step
    replaying it on the same inputs; GPU only."""
    from gradreg_kernels.graphs import CapturedStep

    if not ON_GPU:
        pytest.skip("CUDA-graph capture needs a GPU")
    step = CapturedStep(fn, *inputs)
    return lambda: step(*inputs)


GRAPHED = ["eager_graphed", "converted_graphed"]


def _run(benchmark, fn) -> None:
    def step():
        fn()
        _sync()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)


@pytest.fixture(scope="module")
def critic_setup():
    torch.manual_seed(0)
    model = dcgan_critic().to(DEVICE).train()
    x = torch.randn(BATCH, 3, 64, 64, device=DEVICE)
    return model, convert(copy.deepcopy(model)), x


@pytest.fixture(scope="module")
def resnet_setup():
    torch.manual_seed(0)
    model = cifar_resnet(1, 16).to(DEVICE).train()
    x = torch.randn(BATCH, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (BATCH,), device=DEVICE)
    return model, convert(copy.deepcopy(model)), x, y


@pytest.mark.parametrize("variant", ["plain_step", "eager", "converted"] + GRAPHED)
def test_dcgan_critic_r1(benchmark, critic_setup, variant):
    eager, converted, x = critic_setup
    benchmark.group = f"DCGAN critic R1 step, B={BATCH}, 64x64, {DEVICE.type}"
    benchmark.extra_info.update(batch=BATCH, device=str(DEVICE), threads=torch.get_num_threads())
    if variant in GRAPHED:  # a copy: the graph keeps its own p.grad buffers
        model = copy.deepcopy(eager if variant == "eager_graphed" else converted)
        _run(benchmark, captured(lambda xx: r1_step(model, xx), x))
    elif variant == "plain_step":
        _run(benchmark, lambda: plain_step(eager, lambda m: m(x).mean()))
    else:
        _run(benchmark, lambda: r1_step(eager if variant == "eager" else converted, x))


@pytest.mark.parametrize("variant",
                         ["plain_step", "eager", "converted", "fused_gradreg_loss"] + GRAPHED)
def test_resnet_gradreg(benchmark, resnet_setup, variant):
    eager, converted, x, y = resnet_setup
    benchmark.group = f"ResNet-8 (16-32-64) gradreg step, B={BATCH}, 32x32, {DEVICE.type}"
    benchmark.extra_info.update(batch=BATCH, device=str(DEVICE), threads=torch.get_num_threads())
    if variant in GRAPHED:
        model = copy.deepcopy(eager if variant == "eager_graphed" else converted)
        _run(benchmark, captured(lambda xx, yy: gp_step(model, xx, yy), x, y))
    elif variant == "plain_step":
        _run(benchmark, lambda: plain_step(eager, lambda m: F.cross_entropy(m(x), y)))
    elif variant == "fused_gradreg_loss":
        _run(benchmark, lambda: fused_step(eager, x, y))
    else:
        _run(benchmark, lambda: gp_step(eager if variant == "eager" else converted, x, y))


def test_variants_compute_the_same_step(critic_setup, resnet_setup):
    """The timed variants agree (float32, relative 1e-4) on the models being timed."""
    eager, converted, x = critic_setup
    la, lb = r1_step(eager, x), r1_step(converted, x)
    ga = torch.cat([p.grad.flatten() for p in eager.parameters()])
    gb = torch.cat([p.grad.flatten() for p in converted.parameters()])
    assert float((la - lb).abs() / la.abs()) < 1e-4
    assert float((ga - gb).norm() / ga.norm()) < 1e-4
    eager, converted, x, y = resnet_setup
    grads = []
    for model, step in ((eager, gp_step), (converted, gp_step), (eager, fused_step)):
        step(model, x, y)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for g in grads[1:]:
        assert float((g - grads[0]).norm() / grads[0].norm()) < 1e-4


def _paired(fns: dict, rounds: int) -> dict[str, float]:
    """Run the variants interleaved, round after round; per-round ratios to the first one.

    On a shared machine the load drifts between rounds; a ratio taken inside one round sees
    nearly the same load on both sides, so the median of per-round ratios is steadier than
    a ratio of medians taken minutes apart.
    """
    names = list(fns)
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in names}
    import time
    for _ in range(rounds):
        for n in names:
            _sync()
            t = time.perf_counter()
            fns[n]()
            _sync()
            times[n].append(time.perf_counter() - t)
    base = times[names[0]]
    out = {}
    for n in names[1:]:
        ratios = sorted(b / t for b, t in zip(base, times[n], strict=True))
        out[f"{names[0]} / {n}"] = ratios[len(ratios) // 2]
    return out


def test_paired_speedups(benchmark, critic_setup, resnet_setup):
    """Median per-round speedups over eager double backprop (printed and in extra_info)."""
    c_eager, c_conv, xc = critic_setup
    r_eager, r_conv, xr, y = resnet_setup
    benchmark.group = f"paired speedups, B={BATCH}, {DEVICE.type}"
    result = {}

    critic = {"eager": lambda: r1_step(c_eager, xc), "converted": lambda: r1_step(c_conv, xc)}
    resnet = {"eager": lambda: gp_step(r_eager, xr, y), "converted": lambda: gp_step(r_conv, xr, y),
              "fused": lambda: fused_step(r_eager, xr, y)}
    if ON_GPU:
        # the portable backend's ATen calls cost less host time per launch than Triton's
        # launcher: which is faster for an uncaptured converted step decides convert's default
        c_torch = convert(copy.deepcopy(c_eager), backend="torch")
        r_torch = convert(copy.deepcopy(r_eager), backend="torch")
        critic["converted_torch"] = lambda: r1_step(c_torch, xc)
        resnet["converted_torch"] = lambda: gp_step(r_torch, xr, y)
        # each captured on its own copy of the model
        for name, src in (("eager_graphed", c_eager), ("converted_graphed", c_conv)):
            m = copy.deepcopy(src)
            critic[name] = captured(lambda xx, m=m: r1_step(m, xx), xc)
        for name, src in (("eager_graphed", r_eager), ("converted_graphed", r_conv)):
            m = copy.deepcopy(src)
            resnet[name] = captured(lambda xx, yy, m=m: gp_step(m, xx, yy), xr, y)

    def run():
        result["critic"] = _paired(critic, ROUNDS)
        result["resnet"] = _paired(resnet, ROUNDS)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(batch=BATCH, device=str(DEVICE), threads=torch.get_num_threads(),
                                **{f"{m}: {k}": v for m, d in result.items() for k, v in d.items()})
    for m, d in result.items():
        for k, v in d.items():
            print(f"{m}: {k} = {v:.2f}x")
