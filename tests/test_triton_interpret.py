"""Every Triton kernel on the CPU, interpreted (TRITON_INTERPRET=1), against the reference.

The interpreter must be switched on before the first `import triton` in a process, so the
cases (tests/kernel_cases/case_*.py) run in a child pytest with the variable set.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_kernel_cases(env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run the kernel cases in a child pytest with the given environment additions.

    The child's output is echoed line by line as it comes (visible live with ``pytest -s``)
    and returned in ``stdout``.
    """
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "--durations=10", "-p",
           "no:cacheprovider", "-o", "python_files=case_*.py",
           str(ROOT / "tests" / "kernel_cases")]
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
            if time.monotonic() > deadline:
                proc.kill()
                lines.append(f"\n[killed after {timeout} s]\n")
                break
        rc = proc.wait()
    return subprocess.CompletedProcess(cmd, rc, "".join(lines), "")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_interpreted_on_cpu():
    res = run_kernel_cases({"TRITON_INTERPRET": "1", "GRADREG_KERNEL_DEVICE": "cpu"}, 600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "failed" not in res.stdout
