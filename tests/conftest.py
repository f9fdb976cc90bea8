"""Test-wide fixtures and the skipping of GPU tests without CUDA."""

from __future__ import annotations

import pytest
import torch


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
