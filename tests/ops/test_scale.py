"""scale_: t *= factor, nothing written on found_inf or a factor of 1."""

from __future__ import annotations

import math

import pytest
import torch

from fastamp.testing import (
    GRAD_DTYPES,
    assert_bitwise_equal,
    clone_all,
    make_grads,
    opmath,
    sizes_around_chunks,
    skip_unless_supported,
    unscaled_by_hand,
)

SIZES = sizes_around_chunks()


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_scale_rounds_once(impl, dtype, device):
    skip_unless_supported(dtype, device)
    tensors = make_grads(SIZES, dtype, device=device)
    ours = clone_all(tensors)
    impl.scale_(ours, torch.tensor([0.3], device=device))
    factor = torch.tensor(0.3, dtype=torch.float32, device=device).to(opmath(dtype))
    expected = [(t.to(opmath(dtype)) * factor).to(dtype) for t in tensors]
    assert_bitwise_equal(ours, expected)


def test_scale_by_exactly_one_writes_nothing(impl, device):
    # A signaling NaN comes out of any multiplication quieted: only a pass that writes nothing keeps it.
    signaling = torch.tensor([0x7F800001, 0x3F800000], dtype=torch.int32).view(torch.float32)
    tensors = [signaling.to(device)] + make_grads([65537], device=device)
    before = clone_all(tensors)
    impl.scale_(tensors, torch.ones(1, device=device))
    for t, b in zip(tensors, before):
        assert torch.equal(t.view(torch.int32), b.view(torch.int32))


def test_scale_does_nothing_when_found_inf_set(impl, device):
    tensors = make_grads([65537, 3], device=device) + make_grads([9], torch.float16, device=device)
    tensors[0][5] = math.nan
    tensors[1][0] = -math.inf
    before = clone_all(tensors)
    impl.scale_(tensors, torch.tensor([0.5], device=device), torch.ones(1, device=device))
    assert_bitwise_equal(tensors, before)
    impl.scale_(tensors, torch.tensor([0.5], device=device), torch.zeros(1, device=device))
    assert_bitwise_equal(tensors[2:], [unscaled_by_hand(before[2], 0.5)])


def test_scale_fp64_factor_on_cpu(impl):
    tensors = make_grads([100], torch.float64)
    expected = tensors[0] * 0.1
    impl.scale_(tensors, torch.tensor([0.1], dtype=torch.float64))
    assert torch.equal(tensors[0], expected)


def test_scale_non_contiguous(impl, device):
    base = torch.randn(50, 50, device=device)
    view = base.clone()[::2, ::3]
    expected = view * 2.5
    impl.scale_([view], torch.tensor([2.5], device=device))
    assert torch.equal(view, expected)
