"""Test-wide fixtures, a time limit on every test, and the skipping of GPU tests without
CUDA."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

#: seconds a single test may run before it fails (GRADREG_TEST_TIMEOUT_S; 0 turns it off)
TEST_TIMEOUT_S = int(os.environ.get("GRADREG_TEST_TIMEOUT_S", "300"))


@pytest.fixture(autouse=True)
def _time_limit(request):
    """Fail a test that runs past TEST_TIMEOUT_S (SIGALRM: main thread, POSIX only) instead
    of letting it hang the run."""
    if TEST_TIMEOUT_S <= 0 or not hasattr(signal, "SIGALRM") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{request.node.nodeid} ran past {TEST_TIMEOUT_S} s "
                           "(GRADREG_TEST_TIMEOUT_S)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def no_tf32():
    """float32 means float32 on CUDA: no TF32 in cuBLAS / cuDNN products for the test."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skip them cleanly without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
