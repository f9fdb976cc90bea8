"""Gradient error under CPU bf16 autocast on the bench models: fused cpu step and eager
double backprop, each against the float64 oracle on the same weights, inputs and dropout.

    python bench/bf16_accuracy.py [--models mlp_relu_b256,...] [--seeds 2]

Prints ‖g − g₆₄‖ / ‖g₆₄‖ over all parameter gradients as one vector, for the whole loss
(value_weight 1) and the penalty's own gradient (value_weight 0). tests/
test_cpu_mixed_precision.py checks the same for every layer kind on small models.
"""

from __future__ import annotations

import argparse
import copy

import cpu_workloads as cw
import torch
from workloads import LAM

from gradreg_kernels import gradreg_loss
from reference import oracle_grads


def _rel(got: dict, ref: dict) -> float:
    num = sum(((got[n].double() - r) ** 2).sum() for n, r in ref.items())
    return float(num.sqrt() / sum((r ** 2).sum() for r in ref.values()).sqrt())


def errors(w: cw.Workload, value_weight: float, seed: int) -> tuple[float, float]:
    """(fused error, eager error) for one draw of inputs and dropout."""
    torch.manual_seed(seed)
    model = copy.deepcopy(w.model).train()
    x, y = torch.randn_like(w.x), w.y[torch.randperm(len(w.y))]
    torch.manual_seed(seed + 1)
    ref = oracle_grads(copy.deepcopy(model).double(), x.double(), y, LAM,
                       value_weight=value_weight)[0]
    torch.manual_seed(seed + 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = oracle_grads(model, x, y, LAM, value_weight=value_weight)[0]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed + 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gradreg_loss(model, x, y, LAM, backend="cpu",
                     value_weight=value_weight).loss.backward()
    fused = {n: p.grad for n, p in model.named_parameters()}
    return _rel(fused, ref), _rel(eager, ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mlp_relu_b64,mlp_relu_b256,cnn_paper_b64,"
                                        "mlp_softplus_b256,mlp_silu_b256")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    cw.set_threads()
    wanted = set(args.models.split(","))
    print("| model | value_weight | fused bf16 error | eager bf16 error | fused ÷ eager |")
    print("|---|---|---|---|---|")
    for w in cw.workloads():
        if w.name not in wanted:
            continue
        for vw in (1.0, 0.0):
            for seed in range(args.seeds):
                f, e = errors(w, vw, seed)
                print(f"| {w.name} (seed {seed}) | {vw:g} | {f:.2e} | {e:.2e} | {f / e:.2f} |")


if __name__ == "__main__":
    main()
