"""Where the fused step spends its GPU time: the top kernels of one model, side by side
with eager double backprop (torch.profiler, CUDA time), to guide the next kernel work.

The profiler lists a kernel's time twice: on the kernel's own row (a device event) and on
the row of the operator that launched it. GPU time and the kernel count are summed over
the device events alone (``step_totals``), host time over the host events alone.

    PYTHONPATH=$PWD python3 bench/gpu_profile.py [--model mnist_cnn] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from gpu_models import MODELS  # noqa: E402

from gradreg_kernels import gradreg_loss  # noqa: E402


def step_totals(events, steps: int) -> tuple[float, float, float]:
    """(GPU ms, host ms, kernels) per step from ``prof.key_averages()``: device time and
    launches of the device rows (kernels, copies, fills), self host time of the others."""
    device = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    host = [e for e in events if e not in device]
    gpu_ms = sum(e.self_device_time_total for e in device) / steps / 1e3
    host_ms = sum(e.self_cpu_time_total for e in host) / steps / 1e3
    return gpu_ms, host_ms, sum(e.count for e in device) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mnist_cnn")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    make, shape, _ = MODELS[args.model]
    model = make().cuda().train()
    x = torch.rand(args.batch, *shape, device="cuda")
    y = torch.randint(0, 10, (args.batch,), device="cuda")
    lam = 10 ** 4.75 / (2 * 256)

    def fused():
        model.zero_grad(set_to_none=True)
        gradreg_loss(model, x, y, lam, backend=args.backend, check_finite=False).loss.backward()

    def eager():
        model.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_(True)
        ce = F.cross_entropy(model(xg), y, reduction="sum")
        (g,) = torch.autograd.grad(ce, xg, create_graph=True)
        (ce / args.batch + lam * g.pow(2).sum() / args.batch).backward()

    for name, fn in (("fused " + args.backend, fused), ("eager double backprop", eager)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        gpu_ms, host_ms, kernels = step_totals(ka, 5)
        print(f"\n## {name}: {args.model} B={args.batch}: GPU busy {gpu_ms:.2f} ms/step, "
              f"host {host_ms:.2f} ms/step, {kernels:.0f} kernels/step")
        print(ka.table(sort_by="self_device_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
