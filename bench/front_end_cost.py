"""Host cost of the fused step's front end: tracing a plan once, and looking it up per step.

    python bench/front_end_cost.py [--pairs 400]

Prints, per model: the time to build its plan (torch.fx trace and rule lookup, paid once per
model and again only when the model changes), the time of ``plan_of`` on a kept plan (paid
every step: the signature walk over the module tree), and the whole step of a tiny model,
where the host work is most of the step. The tiny step is timed in ``--pairs`` rounds; run
the same script on another checkout to compare front ends on one machine.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from workloads import median_seconds  # noqa: E402

from gradreg_kernels import gradreg_loss  # noqa: E402
from gradreg_kernels import plan as plan_mod  # noqa: E402


def _median_us(f, n: int) -> float:
    return median_seconds(f, n) * 1e6


def models() -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {
        "mlp784-512-512-10": nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(),
                                           nn.Linear(512, 512), nn.ReLU(),
                                           nn.Linear(512, 10)),
    }
    try:
        import graph_models
    except ImportError:
        return out
    out["resnet18"] = graph_models.resnet18()
    out["unet(16)"] = graph_models.UNet(width=16)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("| model | build the plan (µs, once) | plan_of, kept (µs per step) |\n|---|---|---|")
    for name, m in models().items():
        build = _median_us(lambda m=m: plan_mod.build_plan(m), 5)
        plan_mod.plan_of(m)
        kept = _median_us(lambda m=m: plan_mod.plan_of(m), 200)
        print(f"| {name} | {build:.0f} | {kept:.1f} |")
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))

    def step() -> None:
        tiny.zero_grad(set_to_none=True)
        gradreg_loss(tiny, x, y, 0.5, backend="cpu").loss.backward()

    for _ in range(20):
        step()
    t = _median_us(step, args.pairs)
    print(f"\ntiny MLP 8-8-3, B = 4, whole fused cpu step: {t:.0f} µs (median of {args.pairs})")


if __name__ == "__main__":
    main()
