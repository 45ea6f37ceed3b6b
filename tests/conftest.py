"""Shared fixtures: every op is tested through the dispatcher (C++ kernels on CPU) and through the
pure-PyTorch reference, on the same inputs."""

from __future__ import annotations

import os
import types

import pytest
import torch

import fastamp
from fastamp import ops
from fastamp.ops import _reference


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


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    """The op namespace under test: 'kernel' (torch.ops.fastamp, C++ on CPU) or 'reference'. Where no
    CPU kernels are registered, 'kernel' would be the reference compared with itself: it is skipped,
    saying why, or fails when the build promised kernels (FASTAMP_EXPECT_EXTENSION=1, set by make)."""
    if request.param == "kernel" and "CPU" in fastamp.build_info()["reference_fallback"]:
        reason = f"no compiled CPU kernels: {fastamp.build_info()['extension_error']}"
        if os.environ.get("FASTAMP_EXPECT_EXTENSION") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return IMPLEMENTATIONS[request.param]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
