"""The portable fused path against eager double backprop and an ordinary step (CPU).

pytest-benchmark times each step on each workload; ``test_side_by_side`` also times them
interleaved (see side_by_side.py) and prints the ratios, which are what RESULTS.md records.

Run: .venv/bin/python -m pytest bench/
"""

from __future__ import annotations

import pytest
from side_by_side import default_steps, measure, table
from workloads import WORKLOADS, make_workload

STEPS = default_steps()


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("step", sorted(STEPS))
def test_step(benchmark, workload, step):
    model, x, y = make_workload(workload)
    benchmark.group = workload
    benchmark.name = step
    benchmark.pedantic(STEPS[step], args=(model, x, y), rounds=10, iterations=1,
                       warmup_rounds=2)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_side_by_side(workload, capsys):
    res = measure(workload, STEPS, rounds=10)
    assert set(res) == set(STEPS) and all(ms > 0 for ms in res.values())
    with capsys.disabled():
        print("\n" + table({workload: res}))
