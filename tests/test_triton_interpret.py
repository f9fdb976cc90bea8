"""Every Triton kernel on the CPU, interpreted (TRITON_INTERPRET=1), against the reference;
then every launch the cases made, compiled for an H100/H200 (sm_90) without one.

The interpreter must be switched on before the first `import triton` in a process, so the
cases (tests/kernel_cases/case_*.py) run in a child pytest with the variable set; that run
records its launches (kernel, argument types, constants), and tests/compile_launches.py
compiles each one in another child, through Triton's whole pipeline down to a cubin.
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


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed")


@pytest.fixture(scope="module")
def interpreted_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The interpreted kernel cases, run once, and the file of the launches they made."""
    launches = tmp_path_factory.mktemp("triton") / "launches.json"
    res = run_kernel_cases({"TRITON_INTERPRET": "1", "GRADREG_KERNEL_DEVICE": "cpu",
                            "GRADREG_RECORD_LAUNCHES": str(launches)}, 600)
    return res, launches


@needs_triton
def test_triton_kernels_interpreted_on_cpu(interpreted_run):
    res, _ = interpreted_run
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


def _can_compile_for_cuda() -> str | None:
    """Why Triton cannot compile for a CUDA target here (None if it can)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this triton cannot compile ahead of time for CUDA: {e}"
    return None


@needs_triton
def test_every_launch_compiles_for_sm90(interpreted_run):
    why = _can_compile_for_cuda()
    if why:
        pytest.skip(why)
    res, launches = interpreted_run
    assert launches.exists(), "the interpreted run recorded no launches:\n" + res.stdout[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_launches.py"),
                          str(launches), "--arch", "90",
                          "--package", "gradreg_kernels.backends.triton"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-3000:]
    assert " launches compiled for sm_90" in out.stdout
