"""Every Triton kernel on the CPU, interpreted (TRITON_INTERPRET=1), against the reference.

The interpreter must be switched on before the first `import triton` in a process, so the
cases (tests/kernel_cases/case_*.py) run in a child pytest with the variable set.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_kernel_cases(env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run the kernel cases in a child pytest with the given environment additions."""
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           "-o", "python_files=case_*.py", str(ROOT / "tests" / "kernel_cases")]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_interpreted_on_cpu():
    res = run_kernel_cases({"TRITON_INTERPRET": "1", "GRADREG_KERNEL_DEVICE": "cpu"}, 600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "failed" not in res.stdout
