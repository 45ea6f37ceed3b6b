"""unscale_check_: g *= inv_scale in place and found_inf, in one pass."""

from __future__ import annotations

import math

import pytest
import torch

from fastamp.testing import (
    GRAD_DTYPES,
    IMPLEMENTATIONS,
    assert_bitwise_equal,
    chunk_size,
    clone_all,
    flags,
    make_grads,
    sizes_around_chunks,
    skip_unless_supported,
    supported,
    unscaled_by_hand,
)

SIZES = sizes_around_chunks()


@pytest.mark.parametrize("inv", [1 / 1024, 1.0, 3.0 / 7.0, 65536.0])
def test_unscale_check_matches_torch_bitwise_fp32(impl, inv, device):
    grads = make_grads(SIZES, device=device)
    ours, theirs = clone_all(grads), clone_all(grads)
    found, found_torch = flags(device)
    inv_scale = torch.full((1,), inv, device=device)
    impl.unscale_check_(ours, found, inv_scale)
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, found_torch, inv_scale)
    assert_bitwise_equal(ours, theirs)
    assert found.item() == found_torch.item() == 0.0


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_unscale_check_rounds_once_in_fp32(impl, dtype, device):
    skip_unless_supported(dtype, device)
    grads = make_grads(SIZES, dtype, device=device)
    ours = clone_all(grads)
    found, _ = flags(device)
    inv = 1 / 3.0
    impl.unscale_check_(ours, found, torch.tensor([inv], device=device))
    assert_bitwise_equal(ours, [unscaled_by_hand(g, inv) for g in grads])
    assert found.item() == 0.0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["first-of-first", "last-of-first", "first-of-last", "last-of-last"])
def test_unscale_check_flags_nonfinite_anywhere(impl, value, where, device):
    grads = make_grads([chunk_size() + 1, 3, chunk_size()], device=device)
    tensor = grads[0] if where.endswith("first") else grads[-1]
    tensor[0 if where.startswith("first") else -1] = value
    ours, theirs = clone_all(grads), clone_all(grads)
    found, found_torch = flags(device)
    impl.unscale_check_(ours, found, torch.tensor([0.25], device=device))
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, found_torch, torch.tensor([0.25], device=device))
    assert found.item() == found_torch.item() == 1.0
    assert_bitwise_equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unscale_check_flags_nonfinite_reduced_precision(impl, dtype, device):
    grads = make_grads([100, 70000], dtype, device=device)
    grads[1][-1] = math.inf
    grads[1][5] = math.nan
    grads[0][0] = -math.inf
    expected = [unscaled_by_hand(g, 0.5) for g in grads]
    found, _ = flags(device)
    impl.unscale_check_(grads, found, torch.tensor([0.5], device=device))
    assert found.item() == 1.0
    assert_bitwise_equal(grads, expected)


def test_found_inf_is_never_cleared(impl, device):
    grads = make_grads([10, 20], device=device)
    found = torch.ones(1, device=device)
    impl.unscale_check_(grads, found, torch.tensor([0.5], device=device))
    assert found.item() == 1.0
    impl.grad_norm(grads, torch.tensor([0.5], device=device), found)
    assert found.item() == 1.0


def test_unscale_check_mixed_dtypes_in_one_list(impl, device):
    grads = [g for dtype, n in [(torch.float32, 33), (torch.float16, 65537), (torch.bfloat16, 5), (torch.float16, 0),
                                (torch.float64, 7)] if supported(dtype, device) for g in make_grads([n], dtype, device=device)]
    ours = clone_all(grads)
    found, _ = flags(device)
    impl.unscale_check_(ours, found, torch.tensor([0.125], device=device))
    assert_bitwise_equal(ours, [unscaled_by_hand(g, 0.125) for g in grads])


def test_unscale_check_non_contiguous_views(impl, device):
    base = torch.randn(64, 130, device=device) * 10
    transposed = base.clone().t()  # dense but permuted
    strided = base.clone()[:, ::3]  # not dense: goes through a copy
    misaligned = base.clone().flatten()[1:]  # contiguous, not 16-byte aligned
    owner = strided._base
    outside = owner[:, 1::3].clone()
    grads = [transposed, strided, misaligned]
    expected = [unscaled_by_hand(g, 0.5) for g in grads]
    found, _ = flags(device)
    impl.unscale_check_(grads, found, torch.tensor([0.5], device=device))
    assert_bitwise_equal(grads, expected)
    assert torch.equal(owner[:, 1::3], outside), "elements outside the strided view were modified"


def test_unscale_check_hundreds_of_tensors_kernel_equals_reference(kernels, device):
    sizes = torch.randint(0, 5000, (400,)).tolist()
    grads = make_grads(sizes, device=device)
    grads[123][7] = math.nan
    k, r = clone_all(grads), clone_all(grads)
    fk, fr = flags(device)
    kernels.unscale_check_(k, fk, torch.tensor([0.1], device=device))
    IMPLEMENTATIONS["reference"].unscale_check_(r, fr, torch.tensor([0.1], device=device))
    assert_bitwise_equal(k, r)
    assert fk.item() == fr.item() == 1.0


def test_unscale_check_empty_list(impl, device):
    found, _ = flags(device)
    impl.unscale_check_([], found, torch.tensor([0.5], device=device))
    assert found.item() == 0.0
