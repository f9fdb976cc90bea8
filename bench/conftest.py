"""Benchmarks run with 2 threads; at the end a table of each group's medians and ratios."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(int(os.environ.get("GRADREG_BENCH_THREADS", "2")))

BASELINE = "eager_double_backprop"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, float]] = {}
    for b in session.benchmarks:
        groups.setdefault(b.group or "", {})[b.name.split("[")[0].replace("test_", "")] = (
            b.stats.median * 1e3)
    lines = ["", "| workload | step | median ms | × vs eager double backprop | × ordinary step |",
             "|---|---|---|---|---|"]
    for group, steps in sorted(groups.items()):
        base = steps.get(BASELINE)
        ordinary = steps.get("ordinary_step")
        for step, ms in sorted(steps.items(), key=lambda kv: kv[1]):
            vs_base = f"{base / ms:.2f}" if base else "-"
            vs_ord = f"{ms / ordinary:.2f}" if ordinary else "-"
            lines.append(f"| {group} | {step} | {ms:.2f} | {vs_base} | {vs_ord} |")
    terminalreporter.write_line("\n".join(lines))
