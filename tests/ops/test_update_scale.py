"""update_scale_: the dynamic loss-scale update, against torch._amp_update_scale_."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastamp import ops
from fastamp.testing import (
    IMPLEMENTATIONS,
    bits,
    fresh_state,
)


@settings(max_examples=60, deadline=None)
@given(
    init=st.sampled_from([1.0, 2.0**16, 3.0e38, 1e-30, 777.77]),
    growth=st.sampled_from([2.0, 1.5, 3.3, 1.0001]),
    backoff=st.sampled_from([0.5, 0.25, 0.7, 0.999]),
    interval=st.integers(1, 5),
    overflows=st.lists(st.booleans(), min_size=1, max_size=50),
    which=st.sampled_from(sorted(IMPLEMENTATIONS)),
)
def test_update_scale_matches_torch_bitwise(init, growth, backoff, interval, overflows, which):
    impl = IMPLEMENTATIONS[which]
    scale, tracker = fresh_state(init)
    torch_scale, torch_tracker = fresh_state(init)
    for overflow in overflows:
        found = torch.full((1,), float(overflow))
        impl.update_scale_(scale, tracker, found, growth, backoff, interval)
        torch._amp_update_scale_(torch_scale, torch_tracker, found, growth, backoff, interval)
        assert torch.equal(bits(scale), bits(torch_scale)), (scale, torch_scale)
        assert torch.equal(tracker, torch_tracker)


def test_update_scale_hysteresis_by_hand(impl, device):
    scale, tracker = fresh_state(1024.0, device)
    hysteresis = torch.full((1,), 3, dtype=torch.int32, device=device)
    expected = [  # (found_inf, scale after, growth tracker after, hysteresis tracker after)
        (1, 1024.0, 0, 2),  # first overflow tolerated
        (1, 1024.0, 0, 1),  # second tolerated
        (1, 512.0, 0, 0),  # third consecutive: back off
        (1, 256.0, 0, -1),  # and on every one after it
        (0, 256.0, 1, 3),  # a clean step refills the tolerance
        (1, 256.0, 0, 2),
        (0, 256.0, 1, 3),
        (0, 512.0, 0, 3),  # growth_interval=2 clean steps: grow
    ]
    for found, s, g, h in expected:
        impl.update_scale_(scale, tracker, torch.full((1,), float(found), device=device), 2.0, 0.5, 2, 3, hysteresis)
        assert (scale.item(), tracker.item(), hysteresis.item()) == (s, g, h)


def test_update_scale_min_max_bounds(impl, device):
    scale, tracker = fresh_state(4.0, device)
    for _ in range(5):
        impl.update_scale_(scale, tracker, torch.ones(1, device=device), 2.0, 0.5, 1, min_scale=1.0)
    assert scale.item() == 1.0
    for _ in range(10):
        impl.update_scale_(scale, tracker, torch.zeros(1, device=device), 2.0, 0.5, 1, max_scale=16.0)
    assert scale.item() == 16.0


def test_update_scale_never_grows_to_inf(impl, device):
    scale, tracker = fresh_state(3.0e38, device)
    impl.update_scale_(scale, tracker, torch.zeros(1, device=device), 2.0, 0.5, 1)
    assert scale.item() == pytest.approx(3.0e38) and tracker.item() == 0


def test_update_scale_matches_torch_bitwise_on_every_device(impl, device):
    gen = torch.Generator().manual_seed(3)
    for growth, backoff, interval in [(2.0, 0.5, 3), (1.5, 0.25, 1), (3.3, 0.7, 2)]:
        scale, tracker = fresh_state(2.0**16, device)
        torch_scale, torch_tracker = fresh_state(2.0**16, device)
        for _ in range(60):
            found = torch.full((1,), float(torch.rand(1, generator=gen).item() < 0.3), device=device)
            impl.update_scale_(scale, tracker, found, growth, backoff, interval)
            torch._amp_update_scale_(torch_scale, torch_tracker, found, growth, backoff, interval)
            assert torch.equal(bits(scale), bits(torch_scale)) and torch.equal(tracker, torch_tracker)


def test_update_scale_returns_scale():
    scale, tracker = fresh_state(8.0)
    assert ops.update_scale_(scale, tracker, torch.ones(1), 2.0, 0.5, 10) is scale
