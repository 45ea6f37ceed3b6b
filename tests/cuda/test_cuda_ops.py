"""What only the CUDA kernels have: misaligned 128-bit loads, lists split over several launches, the
two-stage reduction's determinism, no host sync, CUDA graphs, torch.compile, >2**31 elements. The
op semantics on CUDA are tested with the CPU's, in tests/ops/ (device "cuda"). Needs a GPU."""

from __future__ import annotations

import math

import pytest
import torch

import fastamp
from fastamp import ops
from fastamp.testing import assert_bitwise_equal, chunk_size, same_bits, tolerance
from fastamp.testing import reference as _reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

CHUNK = chunk_size()
NORM_RTOL = tolerance("grad_norm", "cuda", torch.float32)
SIZES = [0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
def grads_of(sizes, dtype=torch.float32, scale=100.0):
    return [(torch.randn(n, device="cuda", dtype=torch.float32) * scale).to(dtype) for n in sizes]


def clones(ts):
    return [t.clone() for t in ts]


def cuda_flag(value=0.0):
    return torch.full((1,), value, device="cuda")


def fp64_norm(ts, inv=1.0):
    if not ts:
        return torch.zeros((), dtype=torch.float64, device="cuda")
    return torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in ts]) * inv)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_cuda_kernels_registered_and_used():
    assert fastamp.has_cuda_kernels(), fastamp.build_info()


def misaligned(t):
    """A copy of t whose data pointer is not 16-byte aligned."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    return view


def test_mixed_dtypes_one_list_and_misaligned_views():
    base = torch.randn(3 * CHUNK + 9, device="cuda")
    grads = [base, base.half(), base.bfloat16(), torch.randn(0, device="cuda"), base[5:6].clone()]
    ours = [misaligned(g) for g in grads]
    assert all(o.data_ptr() % 16 != 0 for o in ours[:3])
    ref = clones(grads)
    f1, f2 = cuda_flag(), cuda_flag()
    inv = torch.tensor([0.25], device="cuda")
    n1, p1 = ops.unscale_check_norm_(ours, f1, inv, per_tensor=True)
    n2, p2 = _reference.unscale_check_norm_(ref, f2, inv, per_tensor=True)
    assert_bitwise_equal(ours, ref)
    torch.testing.assert_close(n1.double(), n2.double(), rtol=NORM_RTOL, atol=0)
    torch.testing.assert_close(p1.double(), p2.double(), rtol=NORM_RTOL, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 17, 1000, 5000])
def test_grad_norm_many_tensors_matches_foreach_norm(dtype, count):
    sizes = torch.randint(0, 4096, (count,)).tolist()
    grads = grads_of(sizes, dtype)
    total, per = ops.grad_norm(grads, torch.tensor([0.5], device="cuda"), per_tensor=True)
    torch.testing.assert_close(total.double(), fp64_norm(grads, 0.5), rtol=NORM_RTOL, atol=0)
    expected = torch.stack([fp64_norm([g], 0.5) for g in grads])
    torch.testing.assert_close(per.double(), expected, rtol=NORM_RTOL, atol=1e-30)
    if dtype == torch.float32:
        torch.testing.assert_close(per * 2, torch.stack(torch._foreach_norm(grads)), rtol=1e-5, atol=0)


def test_grad_norm_across_many_launches():
    # More blocks and more tensors than one launch holds; tensors split between launches.
    grads = grads_of([30_000_000, 7] + [CHUNK + 1] * 800 + [90_000_000])
    total, per = ops.grad_norm(grads, per_tensor=True)
    torch.testing.assert_close(total.double(), fp64_norm(grads), rtol=NORM_RTOL, atol=0)
    torch.testing.assert_close(per.double(), torch.stack([fp64_norm([g]) for g in grads]), rtol=NORM_RTOL, atol=0)


def test_grad_norm_is_bit_identical_across_runs():
    grads = grads_of([10_000_000, 3 * CHUNK, 17] + [1000] * 900)
    first = ops.grad_norm(grads, per_tensor=True)
    for _ in range(5):
        again = ops.grad_norm(grads, per_tensor=True)
        assert same_bits(again[0], first[0]) and same_bits(again[1], first[1])


def test_no_host_sync_on_the_hot_path():
    grads = grads_of([1000, CHUNK + 1], torch.float16) + grads_of([77])
    scale = torch.full((1,), 1024.0, device="cuda")
    tracker = torch.zeros(1, dtype=torch.int32, device="cuda")
    found = cuda_flag()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        inv = scale.double().reciprocal().float()
        total, per = ops.grad_norm(grads, inv, found, per_tensor=True)
        coef = ops.clip_coef(total, 1.0)
        ops.scale_(grads, inv * coef, found)
        ops.unscale_check_(grads, found, inv)
        ops.unscale_check_norm_(grads, found, inv)
        ops.update_scale_(scale, tracker, found, 2.0, 0.5, 100)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_capture():
    grads = grads_of([CHUNK * 2 + 1, 100])
    static = clones(grads)
    scale = torch.full((1,), 256.0, device="cuda")
    tracker = torch.zeros(1, dtype=torch.int32, device="cuda")
    found = cuda_flag()

    def step():
        found.zero_()
        inv = scale.reciprocal()
        total, _ = ops.grad_norm(static, inv, found)
        ops.scale_(static, inv * ops.clip_coef(total, 1e9), found)
        ops.update_scale_(scale, tracker, found, 2.0, 0.5, 1000)
        return total

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    for s, g in zip(static, grads):
        s.copy_(g)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = step()
    for s, g in zip(static, grads):
        s.copy_(g)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(total.double(), fp64_norm(grads, 1 / 256), rtol=NORM_RTOL, atol=0)
    for s, g in zip(static, grads):
        torch.testing.assert_close(s, g / 256, rtol=1e-6, atol=0)


def test_compile_fullgraph_on_cuda():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter, fullgraph=True)
    def step(grads, scale, tracker, found):
        inv = scale.reciprocal()
        total, _ = ops.grad_norm(grads, inv, found)
        ops.scale_(grads, inv * ops.clip_coef(total, 1.0), found)
        ops.update_scale_(scale, tracker, found, 2.0, 0.5, 2)
        return total

    for value in (1024.0, 4096.0):
        grads = grads_of([5000, 3])
        expected = fp64_norm(grads, 1 / value)
        total = step(grads, torch.full((1,), value, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda"), cuda_flag())
        torch.testing.assert_close(total.double(), expected, rtol=NORM_RTOL, atol=0)
    assert counter.frame_count == 1


def test_fp64_is_refused_on_cuda_naming_the_tensor():
    grads = grads_of([10]) + [torch.zeros(3, device="cuda", dtype=torch.float64)]
    before = clones(grads[:1])
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype torch.float64.*supported on CPU only"):
        ops.unscale_check_(grads, cuda_flag(), torch.tensor([0.5], device="cuda"))
    assert_bitwise_equal(grads[:1], before)


@pytest.mark.slow
def test_tensor_larger_than_2_to_the_31_elements():
    n = 2**31 + 1000
    free, _ = torch.cuda.mem_get_info()
    if free < n * 2 * 3:
        pytest.skip("not enough GPU memory")
    g = torch.ones(n, device="cuda", dtype=torch.float16)
    g[-1] = 3.0
    total, _ = ops.grad_norm([g])
    assert total.item() == pytest.approx(math.sqrt(n - 1 + 9), rel=1e-5)
    found = cuda_flag()
    ops.unscale_check_([g], found, torch.tensor([0.5], device="cuda"))
    assert g[-1].item() == 1.5 and g[0].item() == 0.5 and g[2**31 + 7].item() == 0.5 and found.item() == 0.0
