"""The fused ops on every device (cpu; cuda where a GPU is) and in both implementations (the compiled
kernels and the pure-PyTorch reference), against PyTorch's own ops and hand-computed values. What only
CUDA has (graphs, sync debug mode, streams, >2**31 elements, launch splitting) is in tests/cuda."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastamp
from fastamp import ops

from .conftest import IMPLEMENTATIONS

# Sizes around the 64K-element chunk boundary of the kernels, and the 16-lane inner loop.
SIZES = [0, 1, 15, 16, 17, 65535, 65536, 65537, 131073]
GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
# Relative error of a norm against the fp64 oracle: fp32 sums per 64K chunk on CPU (cascaded in
# 1K-element sub-blocks), per block on CUDA, then fp64 across chunks; fp64 all the way for fp64 grads.
NORM_RTOL = {"cpu": 2e-6, "cuda": 5e-6}


def norm_rtol(dtype: torch.dtype, device: str) -> float:
    return 1e-12 if dtype == torch.float64 else NORM_RTOL[torch.device(device).type]


def supported(dtype: torch.dtype, device: str) -> bool:
    """fp64 gradients are a CPU-only feature of the kernels (and of the reference, which mirrors them)."""
    return dtype in ops.kernel_dtypes(device)


def skip_unless_supported(dtype: torch.dtype, device: str) -> None:
    if not supported(dtype, device):
        pytest.skip(f"{dtype} is not taken on {device}")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bitwise_equal(actual, expected):
    """Bit-identical, except that any NaN matches any NaN (PyTorch's own scalar and vectorized bf16
    conversions disagree on the NaN bit pattern)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        nan = a.isnan()
        assert torch.equal(nan, e.isnan()), f"tensor {i}: NaNs differ"
        assert torch.equal(bits(a)[~nan], bits(e)[~nan]), f"tensor {i} differs"


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_grads(sizes, dtype=torch.float32, magnitude=100.0, device="cpu"):
    """Normal values drawn on the CPU (the same on every device), then moved."""
    return [(torch.randn(n, dtype=torch.float64) * magnitude).to(device=device, dtype=dtype) for n in sizes]


def unscaled_by_hand(g, inv):
    """g * inv in opmath, rounded once: the documented semantics."""
    a = opmath(g.dtype)
    if inv == 1.0:
        return g.clone()
    return (g.to(a) * torch.tensor(inv, dtype=torch.float32).to(a)).to(g.dtype)


def clone_all(tensors):
    return [t.clone() for t in tensors]


def flags(device="cpu"):
    return torch.zeros(1, device=device), torch.zeros(1, device=device)


# ---- unscale_check_ ---------------------------------------------------------------------------------


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
    grads = make_grads([65537, 3, 65536], device=device)
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


# ---- grad_norm ----------------------------------------------------------------------------------------


def norm_by_torch(grads, inv=1.0):
    flat = torch.cat([g.to(torch.float64).flatten() for g in grads]) if grads else torch.zeros(0, dtype=torch.float64)
    return torch.linalg.vector_norm(flat * inv)


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
    grads = make_grads([65536, 65537], device=device)
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


# ---- unscale_check_norm_ ---------------------------------------------------------------------------


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


# ---- clip_coef ------------------------------------------------------------------------------------------


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


# ---- scale_ -------------------------------------------------------------------------------------------------


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


# ---- update_scale_ --------------------------------------------------------------------------------------


def fresh_state(scale, device="cpu"):
    return torch.full((1,), scale, dtype=torch.float32, device=device), torch.zeros(1, dtype=torch.int32, device=device)


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


# ---- bad input: clear errors, nothing modified -----------------------------------------------------------


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


# ---- reference vs PyTorch (the oracle itself is checked) --------------------------------------------------


def _registered_from(op: str, key: str) -> str:
    table = torch._C._dispatch_dump_table(f"fastamp::{op}")
    return next(line for line in table.splitlines() if line.startswith(key + ":")).replace("\\", "/")


def test_the_reference_is_registered_exactly_where_no_kernel_was_compiled():
    info = fastamp.build_info()
    for op in ops.OP_NAMES:
        for key in ("CPU", "CUDA"):
            line = _registered_from(op, key)
            compiled = f"csrc/{key.lower()}/ops.cpp" in line or f"_csrc/{key.lower()}/ops.cpp" in line
            runs_reference = op in info["reference_fallback"].get(key, [])
            assert compiled != runs_reference and (runs_reference == ("ops/_library.py" in line)), line
        assert info["cpu_kernels"] == ("csrc/cpu/ops.cpp" in _registered_from(op, "CPU")), op


def test_without_the_extension_every_key_runs_the_reference_and_kernel_tests_do_not_pass_on_it():
    code = (
        "import torch, fastamp; from fastamp import ops; info = fastamp.build_info()\n"
        "assert info['reference_fallback'] == {'CPU': list(ops.OP_NAMES), 'CUDA': list(ops.OP_NAMES)}, info\n"
        "t = torch._C._dispatch_dump_table('fastamp::scale_')\n"
        "assert 'ops/_library.py' in t and 'ops.cpp' not in t, t\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTAMP_EXPECT_EXTENSION"}
    env["FASTAMP_DISABLE_EXTENSION"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # The kernel-vs-reference tests of this file are skipped there, saying why (see conftest.impl).
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__,
                          "-k", "unscale_check_matches_torch and kernel"], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    summary = out.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "no compiled CPU kernels" in out.stdout, out.stdout[-3000:]


# ---- nonfinite_report -----------------------------------------------------------------------------------------


def test_nonfinite_report_names_and_counts():
    a = torch.zeros(10)
    b = torch.tensor([math.nan, math.inf, -math.inf, -math.inf, 1.0], dtype=torch.float16)
    c = torch.tensor([math.nan, math.nan])
    report = ops.nonfinite_report({"layer.a": a, "layer.b": b, "no_grad": None, "layer.c": c})
    assert [r.name for r in report] == ["layer.b", "layer.c"]
    assert (report[0].nan, report[0].posinf, report[0].neginf, report[0].total) == (1, 1, 2, 4)
    assert report[0].dtype == torch.float16 and report[0].shape == (5,)
    assert (report[1].nan, report[1].total) == (2, 2)
    assert ops.nonfinite_report([("x", a)]) == []
