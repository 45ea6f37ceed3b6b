"""grad_norm: the L2 norm of g * inv_scale and found_inf, read-only."""

from __future__ import annotations

import math

import pytest
import torch

from fastamp import ops
from fastamp.testing import (
    GRAD_DTYPES,
    assert_bitwise_equal,
    bits,
    chunk_size,
    clone_all,
    flags,
    make_grads,
    norm_by_torch,
    norm_rtol,
    sizes_around_chunks,
    skip_unless_supported,
)

SIZES = sizes_around_chunks()


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("inv", [None, 1 / 4096])
def test_grad_norm_matches_vector_norm(impl, dtype, inv, device):
    skip_unless_supported(dtype, device)
    grads = make_grads(SIZES, dtype, device=device)
    before = clone_all(grads)
    inv_scale = None if inv is None else torch.tensor([inv], device=device)
    total, per = impl.grad_norm(grads, inv_scale, None, per_tensor=True)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert total.dtype == per.dtype == expected_dtype and total.shape == () and per.shape == (len(grads),)
    scale = 1.0 if inv is None else inv
    torch.testing.assert_close(total.double(), norm_by_torch(grads, scale), rtol=norm_rtol(dtype, device), atol=0)
    expected_per = torch.stack([norm_by_torch([g], scale) for g in grads])
    torch.testing.assert_close(per.double(), expected_per, rtol=norm_rtol(dtype, device), atol=0)
    assert_bitwise_equal(grads, before)  # read-only


def test_grad_norm_per_tensor_matches_foreach_norm(impl, device):
    grads = make_grads([3, 70000, 1, 0, 257], device=device)
    _, per = impl.grad_norm(grads, per_tensor=True)
    torch.testing.assert_close(per, torch.stack(torch._foreach_norm(grads)), rtol=norm_rtol(torch.float32, device), atol=0)
    total, none = impl.grad_norm(grads)
    assert none is None


def test_grad_norm_mixed_dtypes(impl, device):
    grads = make_grads([100], torch.float16, device=device) + make_grads([70000], torch.bfloat16, device=device)
    grads += make_grads([3], torch.float32, device=device)
    total, _ = impl.grad_norm(grads, torch.tensor([0.5], device=device))
    assert total.dtype == torch.float32
    torch.testing.assert_close(total.double(), norm_by_torch(grads, 0.5), rtol=norm_rtol(torch.float16, device), atol=0)


def test_grad_norm_non_contiguous(impl, device):
    base = torch.randn(300, 301, device=device)
    grads = [base.t(), base[::2, 1:], base.flatten()[1:]]
    total, per = impl.grad_norm(grads, per_tensor=True)
    rtol = norm_rtol(torch.float32, device)
    torch.testing.assert_close(total.double(), norm_by_torch([g.contiguous() for g in grads]), rtol=rtol, atol=0)
    torch.testing.assert_close(per.double(), torch.stack([norm_by_torch([g]) for g in grads]), rtol=rtol, atol=0)


def test_grad_norm_is_deterministic_across_runs_and_thread_counts():
    grads = make_grads([1_000_000, 65537, 12345, 3])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            for _ in range(2):
                total, per = ops.grad_norm(grads, torch.tensor([0.37]), per_tensor=True)
                results.append((bits(total), bits(per)))
    finally:
        torch.set_num_threads(threads)
    for total, per in results[1:]:
        assert torch.equal(total, results[0][0]) and torch.equal(per, results[0][1])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("position", [0, -1])
def test_grad_norm_sets_found_inf(impl, value, position, device):
    grads = make_grads([chunk_size(), chunk_size() + 1], device=device)
    grads[position][position] = value
    found, _ = flags(device)
    total, _ = impl.grad_norm(grads, torch.tensor([1.0], device=device), found)
    assert found.item() == 1.0
    assert not math.isfinite(total.item())


def test_grad_norm_without_found_inf_still_reports_nonfinite_norm(impl, device):
    grads = make_grads([10], device=device)
    grads[0][3] = math.inf
    total, _ = impl.grad_norm(grads)
    assert math.isinf(total.item())


def test_grad_norm_large_finite_values_are_not_flagged(impl, device):
    # Squares overflow fp32 but every value is finite: not an overflow step (as in PyTorch).
    grads = [torch.full((1000,), 1e30, device=device)]
    found, _ = flags(device)
    impl.grad_norm(grads, None, found)
    assert found.item() == 0.0


def test_grad_norm_empty(impl, device):
    total, per = impl.grad_norm([], per_tensor=True)  # names no device: CPU
    assert total.item() == 0.0 and per.shape == (0,) and total.device.type == "cpu"
    found = torch.zeros(1, device=device)
    total, per = impl.grad_norm([], torch.ones(1, device=device), found, per_tensor=True)
    assert total.item() == 0.0 and per.shape == (0,) and total.device == found.device and found.item() == 0.0
    total, per = impl.grad_norm([torch.zeros(0, device=device), torch.zeros(0, 5, device=device)], per_tensor=True)
    assert total.item() == 0.0 and per.tolist() == [0.0, 0.0]


def test_grad_norm_hundreds_of_tensors(impl, device):
    grads = make_grads(torch.randint(0, 3000, (500,)).tolist(), torch.float16, device=device)
    total, per = impl.grad_norm(grads, torch.tensor([0.01], device=device), per_tensor=True)
    torch.testing.assert_close(total.double(), norm_by_torch(grads, 0.01), rtol=norm_rtol(torch.float16, device), atol=0)
    assert per.shape == (500,)
