"""Test-wide fixtures, a time limit on every test, seeded property tests, an optional
test order for finding order dependence, and the skipping of GPU tests without CUDA.

Environment:
- ``GRADREG_TEST_TIMEOUT_S``: seconds one test may run (default 300; 0 turns it off);
- ``HYPOTHESIS_PROFILE``: ``seeded`` (default: derandomized, the same examples every run,
  no example database) or ``long`` (random examples, 400 per property);
- ``GRADREG_TEST_ORDER``: ``reverse`` or ``shuffle:SEED`` runs the collected tests in that
  order, to show that no test depends on another having run first."""

from __future__ import annotations

import os
import random
import signal
import threading

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("seeded", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=400, derandomize=False, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "seeded"))

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
    """Reorder the tests if GRADREG_TEST_ORDER asks; tests marked ``gpu`` need CUDA: skip
    them cleanly without it."""
    order = os.environ.get("GRADREG_TEST_ORDER", "")
    if order == "reverse":
        items.reverse()
    elif order.startswith("shuffle:"):
        random.Random(int(order.split(":", 1)[1])).shuffle(items)
    elif order:
        raise pytest.UsageError(f"GRADREG_TEST_ORDER={order!r}: expected 'reverse' or "
                                "'shuffle:SEED'")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
