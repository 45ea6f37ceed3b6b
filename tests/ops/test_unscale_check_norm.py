"""unscale_check_norm_: unscale_check_ and the norm of the grads as written, in one pass."""

from __future__ import annotations

import math

import pytest
import torch

from fastamp.testing import (
    GRAD_DTYPES,
    assert_bitwise_equal,
    clone_all,
    flags,
    make_grads,
    norm_by_torch,
    norm_rtol,
    sizes_around_chunks,
    skip_unless_supported,
    unscaled_by_hand,
)

SIZES = sizes_around_chunks()


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_unscale_check_norm_is_unscale_then_norm(impl, dtype, device):
    skip_unless_supported(dtype, device)
    grads = make_grads(SIZES, dtype, device=device)
    fused, separate = clone_all(grads), clone_all(grads)
    found, found_separate = flags(device)
    inv = torch.tensor([1 / 8192], device=device)
    total, per = impl.unscale_check_norm_(fused, found, inv, per_tensor=True)
    impl.unscale_check_(separate, found_separate, inv)
    assert_bitwise_equal(fused, separate)
    rtol = norm_rtol(dtype, device)
    torch.testing.assert_close(total.double(), norm_by_torch(separate), rtol=rtol, atol=0)
    torch.testing.assert_close(per.double(), torch.stack([norm_by_torch([g]) for g in separate]), rtol=rtol, atol=0)
    assert found.item() == 0.0


def test_unscale_check_norm_flags_and_matches_torch(impl, device):
    grads = make_grads([65537, 100], device=device)
    grads[1][-1] = math.nan
    ours, theirs = clone_all(grads), clone_all(grads)
    found, found_torch = flags(device)
    impl.unscale_check_norm_(ours, found, torch.tensor([0.5], device=device))
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, found_torch, torch.tensor([0.5], device=device))
    assert found.item() == found_torch.item() == 1.0
    assert_bitwise_equal(ours, theirs)


def test_unscale_check_norm_non_contiguous(impl, device):
    base = torch.randn(40, 90, device=device)
    grads = [base.clone()[:, ::2], base.clone().t()]
    expected = [unscaled_by_hand(g, 0.25) for g in grads]
    found, _ = flags(device)
    total, _ = impl.unscale_check_norm_(grads, found, torch.tensor([0.25], device=device))
    assert_bitwise_equal(grads, expected)
    torch.testing.assert_close(total.double(), norm_by_torch(expected), rtol=norm_rtol(torch.float32, device), atol=0)
