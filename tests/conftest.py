"""Shared fixtures: every op is tested through the dispatcher (C++ kernels on CPU) and through the
pure-PyTorch reference, on the same inputs."""

from __future__ import annotations

import os

import pytest
import torch

import fastamp
from fastamp import ops
from fastamp.testing import IMPLEMENTATIONS

# CUDA cases are generated only where a GPU is: a CPU run lists no per-case GPU skips, so that a skip
# that appears is news (the report header says what was left out).
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
# What `make test` promises was built, per dispatch key: a kernel test must then run, not skip.
_EXPECTED = {"CPU": "FASTAMP_EXPECT_EXTENSION", "CUDA": "FASTAMP_EXPECT_CUDA_KERNELS"}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device an op test runs on: every test taking it runs on CPU and, where a GPU is, on CUDA."""
    return request.param


def _require_kernels(device: str) -> None:
    """Where no kernel is registered for `device`, a kernel test would compare the reference with itself:
    skip it, saying why, or fail when the build promised kernels (set by make)."""
    key = device.upper()
    info = fastamp.build_info()
    if key in info["reference_fallback"]:
        reason = f"no compiled {key} kernels: {info['extension_error'] or 'built without them'}"
        if os.environ.get(_EXPECTED[key]) == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request, device):
    """The op namespace under test: 'kernel' (torch.ops.fastamp: C++ on CPU, CUDA on GPU) or 'reference'."""
    if request.param == "kernel":
        _require_kernels(device)
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def kernels(device):
    """The compiled kernels on `device` (for tests that compare them with the reference directly)."""
    _require_kernels(device)
    return ops


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_report_header(config):
    if torch.cuda.is_available():
        return [f"GPU: {torch.cuda.get_device_name()}: CUDA cases and tests/cuda run"]
    return ["no NVIDIA GPU: CUDA cases not generated, tests/cuda not collected (`make gpu-check` runs them)"]
