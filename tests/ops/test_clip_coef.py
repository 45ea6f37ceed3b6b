"""clip_coef: min(1, max_norm / (norm + eps)) as clip_grad_norm_ computes it, and the whole clip."""

from __future__ import annotations

import math

import pytest
import torch

from fastamp.testing import (
    IMPLEMENTATIONS,
    bits,
    norm_rtol,
)


@pytest.mark.parametrize("norm", [0.0, 1e-7, 0.5, 1.0, 1.0000001, 2.0, 1e30, math.inf, math.nan])
@pytest.mark.parametrize("max_norm", [0.0, 1.0, 0.3])
def test_clip_coef_is_clip_grad_norm_formula(impl, norm, max_norm, device):
    total = torch.tensor(norm, device=device)
    coef = impl.clip_coef(total, max_norm)
    # What torch.nn.utils.clip_grad_norm_ computes: max_norm / (total_norm + 1e-6), clamped at 1.
    expected = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    assert coef.shape == () and coef.dtype == torch.float32
    assert torch.equal(bits(coef), bits(expected)) or (math.isnan(coef.item()) and math.isnan(expected.item()))


def test_clip_coef_kernel_equals_reference_fp64(kernels, device):
    for value in (0.1, 3.0, 1e300):
        total = torch.tensor(value, dtype=torch.float64, device=device)
        k = kernels.clip_coef(total, 1.5, 1e-6)
        r = IMPLEMENTATIONS["reference"].clip_coef(total, 1.5, 1e-6)
        assert k.dtype == torch.float64 and torch.equal(k, r)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_matches_torch_clip_grad_norm(impl, max_norm, device):
    params = [torch.nn.Parameter(torch.zeros(n, device=device)) for n in (5, 65537, 300)]
    for p in params:
        p.grad = torch.randn(p.shape, device=device) * 3
    grads = [p.grad.clone() for p in params]
    torch_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    total, _ = impl.grad_norm(grads)
    coef = impl.clip_coef(total, max_norm)
    impl.scale_(grads, coef.reshape(1))
    torch.testing.assert_close(total, torch_norm, rtol=norm_rtol(torch.float32, device), atol=0)
    for ours, p in zip(grads, params):
        torch.testing.assert_close(ours, p.grad, rtol=1e-5, atol=1e-7)
