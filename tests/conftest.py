"""Shared fixtures: every op is tested through the dispatcher (C++ kernels on CPU) and through the
pure-PyTorch reference, on the same inputs."""

from __future__ import annotations

import os
import types

import pytest
import torch

import fastamp
from fastamp import ops
from fastamp.testing import reference as _reference


def _reference_ops() -> types.SimpleNamespace:
    def grad_norm(grads, inv_scale=None, found_inf=None, per_tensor=False):
        if not grads:
            return ops.grad_norm(grads, inv_scale, found_inf, per_tensor)
        total, per = _reference.grad_norm(grads, inv_scale, found_inf, per_tensor)
        return total, (per if per_tensor else None)

    def unscale_check_norm_(grads, found_inf, inv_scale, per_tensor=False):
        total, per = _reference.unscale_check_norm_(grads, found_inf, inv_scale, per_tensor)
        return total, (per if per_tensor else None)

    def update_scale_(scale, *args, **kwargs):
        _reference.update_scale_(scale, *args, **kwargs)
        return scale

    return types.SimpleNamespace(
        unscale_check_=_reference.unscale_check_,
        grad_norm=grad_norm,
        unscale_check_norm_=unscale_check_norm_,
        clip_coef=_reference.clip_coef,
        scale_=_reference.scale_,
        update_scale_=update_scale_,
    )


IMPLEMENTATIONS = {"kernel": ops, "reference": _reference_ops()}
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
