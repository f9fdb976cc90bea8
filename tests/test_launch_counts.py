"""Kernel launches and host synchronizations of one training step (bench/launch_count.py),
counted on the CPU with the Triton kernels interpreted: the default GPU path (the Triton
backend) makes at most half of eager double backprop's launches on the paper CNN and
reads back once per step; the counter itself counts what it claims to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from launch_count import count_step  # noqa: E402


def test_the_counter_counts_launching_ops_read_backs_and_not_views():
    x = torch.randn(4, 5)

    def step():
        y = (x * 2).t().reshape(-1)  # mul launches; t and the reshape of a view do not
        z = torch.empty(3)           # an allocation only
        float(y.sum())               # sum launches, the read-back syncs
        y[:2].tolist()               # a read-back without an operator on the CPU
        return z

    c = count_step(step)
    assert dict(c.ops) == {"mul": 1, "clone": 1, "sum": 1}, c.ops  # clone: reshape(t)'s copy
    assert c.aten == 3 and c.free == 4  # t, the view after the copy, empty, the slice
    assert c.syncs == 2 and dict(c.sync_ops) == {"_local_scalar_dense": 1, "tolist": 1}
    assert c.triton == 0


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    out = tmp_path_factory.mktemp("launches") / "counts.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "launch_count.py"),
                          "--models", "mnist_cnn,mlp", "--batch", "2", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_default_gpu_path_makes_at_most_half_of_eagers_launches(counts):
    cnn = counts["mnist_cnn"]
    eager, fused = cnn["eager double backprop"], cnn["fused triton"]
    assert fused["launches"] <= 0.5 * eager["launches"], (fused, eager["launches"])
    mlp = counts["mlp"]
    assert mlp["fused triton"]["launches"] < mlp["eager double backprop"]["launches"]


def test_the_fused_steps_read_back_once(counts):
    for model, steps in counts.items():
        assert steps["fused triton"]["syncs"] == 1, (model, steps["fused triton"])
        assert steps["eager double backprop"]["syncs"] == 0
    assert counts["mlp"]["fused torch"]["syncs"] == 1


def test_the_gpu_profile_counts_each_kernels_time_once():
    """A kernel's time appears on its own (device) row and on its launching operator's row:
    bench/gpu_profile.py sums device time and kernels over the device rows alone."""
    from types import SimpleNamespace

    from gpu_profile import step_totals

    dev = torch.autograd.DeviceType
    events = [
        SimpleNamespace(device_type=dev.CUDA, self_device_time_total=1000.0,
                        self_cpu_time_total=0.0, count=10),   # the kernels: 1 ms over 5 steps
        SimpleNamespace(device_type=dev.CPU, self_device_time_total=1000.0,
                        self_cpu_time_total=500.0, count=10),  # the ops that launched them
    ]
    assert step_totals(events, 5) == (0.2, 0.1, 2.0)
