"""Bad input to every op: a clear error naming the tensor, dtype or device, and nothing modified."""

from __future__ import annotations

import pytest
import torch

from fastamp.testing import (
    flags,
    fresh_state,
)


def test_bad_grad_dtype_names_tensor_and_changes_nothing(impl, device):
    good = torch.randn(10, device=device)
    before = good.clone()
    found = torch.zeros(1, device=device)
    for bad in (torch.arange(3, device=device), torch.ones(3, dtype=torch.bool, device=device)):
        with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype torch\.(int64|bool)"):
            impl.unscale_check_([good, bad], found, torch.tensor([0.5], device=device))
        with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype"):
            impl.unscale_check_norm_([good, bad], found, torch.tensor([0.5], device=device))
        with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype"):
            impl.grad_norm([good, bad], None, found)
        with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype"):
            impl.scale_([good, bad], torch.tensor([0.5], device=device))
    assert torch.equal(good, before) and found.item() == 0.0


@pytest.mark.parametrize(
    "found_inf, message",
    [
        (torch.zeros(1, dtype=torch.float16), r"found_inf must be a torch\.float32 tensor, got torch\.float16"),
        (torch.zeros(2), r"found_inf must be a 1-element tensor"),
        (torch.zeros(1, dtype=torch.int32), r"found_inf must be a torch\.float32"),
    ],
)
def test_bad_found_inf(impl, found_inf, message, device):
    grads = [torch.randn(5, device=device)]
    found_inf = found_inf.to(device)
    before = grads[0].clone()
    with pytest.raises(RuntimeError, match=message):
        impl.unscale_check_(grads, found_inf, torch.tensor([0.5], device=device))
    assert torch.equal(grads[0], before)


def test_bad_inv_scale(impl, device):
    grads = [torch.randn(5, device=device)]
    before = grads[0].clone()
    with pytest.raises(RuntimeError, match=r"inv_scale must be a torch\.float32 tensor, got torch\.int64"):
        impl.unscale_check_(grads, torch.zeros(1, device=device), torch.tensor([2], device=device))
    with pytest.raises(RuntimeError, match=r"inv_scale must be a 1-element tensor"):
        impl.grad_norm(grads, torch.ones(3, device=device))
    assert torch.equal(grads[0], before)


def test_wrong_device_names_tensor_and_device(impl, device):
    # The meta device stands in for a second device on a CPU-only machine; on a GPU, cpu is the other one.
    other = "meta" if device == "cpu" else "cpu"
    grads = [torch.randn(5, device=device), torch.randn(5, device=other)]
    here = str(grads[0].device)
    before = grads[0].clone()
    with pytest.raises(RuntimeError, match=rf"grads\[1\] is on {other} but the op runs on {here}"):
        impl.unscale_check_(grads, torch.zeros(1, device=device), torch.tensor([0.5], device=device))
    with pytest.raises(RuntimeError, match=rf"inv_scale is on {other} but the op runs on {here}"):
        impl.unscale_check_(grads[:1], torch.zeros(1, device=device), torch.tensor([0.5], device=other))
    with pytest.raises(RuntimeError, match=rf"found_inf is on {other} but the op runs on {here}"):
        impl.grad_norm(grads[:1], None, torch.zeros(1, device=other))
    assert torch.equal(grads[0], before)


def test_expanded_tensor_cannot_be_written(impl, device):
    with pytest.raises(RuntimeError, match=r"grads\[0\] has elements that share memory"):
        found, _ = flags(device)
        impl.unscale_check_([torch.ones(1, device=device).expand(10)], found, torch.tensor([0.5], device=device))


def _aliased_lists(device):
    t = torch.randn(12, device=device)
    m = torch.randn(4, 6, device=device)
    return {
        "the same tensor twice": ([torch.randn(3, device=device), t, t], r"\[1\] and \w+\[2\] are the same memory"),
        "overlapping slices": ([t[2:8], t[5:]], r"\[0\] and \w+\[1\] overlap in memory"),
        "a tensor and its transpose": ([m, m.t()], r"\[0\] and \w+\[1\] overlap in memory"),
    }


@pytest.mark.parametrize("case", ["the same tensor twice", "overlapping slices", "a tensor and its transpose"])
def test_entries_sharing_memory_are_refused_before_anything_is_written(impl, device, case):
    """[t, t] used to be unscaled twice (t at a quarter); written ops now refuse it, naming both entries."""
    tensors, message = _aliased_lists(device)[case]
    before = [x.clone() for x in tensors]
    found = torch.zeros(1, device=device)
    half = torch.tensor([0.5], device=device)
    with pytest.raises(RuntimeError, match="grads" + message):
        impl.unscale_check_(tensors, found, half)
    with pytest.raises(RuntimeError, match="grads" + message):
        impl.unscale_check_norm_(tensors, found, half)
    with pytest.raises(RuntimeError, match="tensors" + message):
        impl.scale_(tensors, half)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before)) and found.item() == 0.0
    impl.grad_norm(tensors, None, found)  # reading twice is fine


def test_views_that_share_no_element_are_accepted(impl, device):
    t = torch.randn(12, device=device)
    m = torch.randn(4, 6, device=device)
    for tensors in ([t[::2], t[1::2]], [t[:6], t[6:]], [m[:2], m[2:]], [m[:, :3], m[:, 3:]]):
        expected = [x.clone() * 0.5 for x in tensors]
        impl.scale_(tensors, torch.tensor([0.5], device=device))
        assert all(torch.equal(a, b) for a, b in zip(tensors, expected))


def test_bad_update_scale_arguments(impl, device):
    scale, tracker = fresh_state(2.0, device)
    with pytest.raises(RuntimeError, match=r"hysteresis=2 needs a hysteresis_tracker"):
        impl.update_scale_(scale, tracker, torch.ones(1, device=device), 2.0, 0.5, 10, 2)
    with pytest.raises(RuntimeError, match=r"growth_tracker must be a torch\.int32 tensor"):
        impl.update_scale_(scale, torch.zeros(1, device=device), torch.ones(1, device=device), 2.0, 0.5, 10)
    with pytest.raises(RuntimeError, match=r"min_scale <= max_scale"):
        impl.update_scale_(scale, tracker, torch.ones(1, device=device), 2.0, 0.5, 10, min_scale=4.0, max_scale=2.0)
    assert scale.item() == 2.0 and tracker.item() == 0


def test_bad_scale_factor(impl, device):
    t = [torch.randn(4, device=device)]
    with pytest.raises(RuntimeError, match=r"factor must be a 1-element tensor"):
        impl.scale_(t, torch.ones(2, device=device))


def test_bad_clip_coef(impl, device):
    with pytest.raises(RuntimeError, match=r"max_norm must be non-negative"):
        impl.clip_coef(torch.tensor(1.0, device=device), -1.0)
