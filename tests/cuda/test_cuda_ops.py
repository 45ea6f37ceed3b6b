"""The CUDA kernels against the reference and PyTorch's own ops. Skipped without an NVIDIA GPU."""

from __future__ import annotations

import math

import pytest
import torch

import fastamp
from fastamp import ops
from fastamp.ops import _reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

CHUNK = 65536
SIZES = [0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t):
    return t.contiguous().view(INT_VIEW[t.dtype])


def grads_of(sizes, dtype=torch.float32, scale=100.0):
    return [(torch.randn(n, device="cuda", dtype=torch.float32) * scale).to(dtype) for n in sizes]


def clones(ts):
    return [t.clone() for t in ts]


def cuda_flag(value=0.0):
    return torch.full((1,), value, device="cuda")


def assert_bitwise(actual, expected):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(bits(a), bits(e)), f"tensor {i} differs"


def fp64_norm(ts, inv=1.0):
    if not ts:
        return torch.zeros((), dtype=torch.float64, device="cuda")
    return torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in ts]) * inv)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_cuda_kernels_registered_and_used():
    assert fastamp.has_cuda_kernels(), fastamp.build_info()


@pytest.mark.parametrize("inv", [1 / 1024, 1.0, 3 / 7])
def test_unscale_check_matches_torch_bitwise_fp32(inv):
    grads = grads_of(SIZES)
    ours, theirs = clones(grads), clones(grads)
    f1, f2 = cuda_flag(), cuda_flag()
    inv_scale = torch.full((1,), inv, device="cuda")
    ops.unscale_check_(ours, f1, inv_scale)
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, f2, inv_scale)
    assert_bitwise(ours, theirs)
    assert f1.item() == f2.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_unscale_check_equals_reference(dtype):
    grads = grads_of(SIZES, dtype)
    ours, ref = clones(grads), clones(grads)
    f1, f2 = cuda_flag(), cuda_flag()
    inv = torch.tensor([0.3], device="cuda")
    ops.unscale_check_(ours, f1, inv)
    _reference.unscale_check_(ref, f2, inv)
    assert_bitwise(ours, ref)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("tensor_index", [0, -1])
@pytest.mark.parametrize("position", [0, -1])
@pytest.mark.parametrize("op", ["unscale_check_", "grad_norm", "unscale_check_norm_"])
def test_nonfinite_at_edges_is_flagged(value, tensor_index, position, op):
    grads = grads_of([CHUNK + 3, 5, 2 * CHUNK])
    grads[tensor_index][position] = value
    found = cuda_flag()
    inv = torch.tensor([0.5], device="cuda")
    if op == "grad_norm":
        ops.grad_norm(grads, inv, found)
    else:
        getattr(ops, op)(grads, found, inv)
    assert found.item() == 1.0


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
    assert_bitwise(ours, ref)
    torch.testing.assert_close(n1.double(), n2.double(), rtol=2e-6, atol=0)
    torch.testing.assert_close(p1.double(), p2.double(), rtol=2e-6, atol=0)


def test_non_contiguous_tensors():
    base = torch.randn(512, 300, device="cuda")
    grads = [base.clone().t(), base.clone()[::2, 1::3]]
    expected = [(g * 0.5) for g in grads]
    ops.unscale_check_(grads, cuda_flag(), torch.tensor([0.5], device="cuda"))
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 17, 1000, 5000])
def test_grad_norm_many_tensors_matches_foreach_norm(dtype, count):
    sizes = torch.randint(0, 4096, (count,)).tolist()
    grads = grads_of(sizes, dtype)
    total, per = ops.grad_norm(grads, torch.tensor([0.5], device="cuda"), per_tensor=True)
    torch.testing.assert_close(total.double(), fp64_norm(grads, 0.5), rtol=5e-6, atol=0)
    expected = torch.stack([fp64_norm([g], 0.5) for g in grads])
    torch.testing.assert_close(per.double(), expected, rtol=5e-6, atol=1e-30)
    if dtype == torch.float32:
        torch.testing.assert_close(per * 2, torch.stack(torch._foreach_norm(grads)), rtol=1e-5, atol=0)


def test_grad_norm_across_many_launches():
    # More blocks and more tensors than one launch holds; tensors split between launches.
    grads = grads_of([30_000_000, 7] + [CHUNK + 1] * 800 + [90_000_000])
    total, per = ops.grad_norm(grads, per_tensor=True)
    torch.testing.assert_close(total.double(), fp64_norm(grads), rtol=5e-6, atol=0)
    torch.testing.assert_close(per.double(), torch.stack([fp64_norm([g]) for g in grads]), rtol=5e-6, atol=0)


def test_grad_norm_is_bit_identical_across_runs():
    grads = grads_of([10_000_000, 3 * CHUNK, 17] + [1000] * 900)
    first = ops.grad_norm(grads, per_tensor=True)
    for _ in range(5):
        again = ops.grad_norm(grads, per_tensor=True)
        assert torch.equal(bits(again[0]), bits(first[0])) and torch.equal(bits(again[1]), bits(first[1]))


def test_scale_skips_on_found_inf_and_matches_reference():
    tensors = grads_of(SIZES, torch.float16)
    before = clones(tensors)
    ops.scale_(tensors, torch.tensor([0.1], device="cuda"), cuda_flag(1.0))
    assert_bitwise(tensors, before)
    ref = clones(tensors)
    ops.scale_(tensors, torch.tensor([0.1], device="cuda"), cuda_flag(0.0))
    _reference.scale_(ref, torch.tensor([0.1], device="cuda"), cuda_flag(0.0))
    assert_bitwise(tensors, ref)


def test_clip_matches_clip_grad_norm():
    params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in (5, CHUNK + 1, 300)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    grads = [p.grad.clone() for p in params]
    torch_norm = torch.nn.utils.clip_grad_norm_(params, 0.5, foreach=True)
    total, _ = ops.grad_norm(grads)
    ops.scale_(grads, ops.clip_coef(total, 0.5).reshape(1))
    torch.testing.assert_close(total, torch_norm, rtol=5e-6, atol=0)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_update_scale_matches_torch_bitwise():
    gen = torch.Generator().manual_seed(3)
    for growth, backoff, interval in [(2.0, 0.5, 3), (1.5, 0.25, 1), (3.3, 0.7, 2)]:
        s1, t1 = torch.full((1,), 2.0**16, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
        s2, t2 = s1.clone(), t1.clone()
        for _ in range(100):
            found = cuda_flag(float(torch.rand(1, generator=gen).item() < 0.3))
            ops.update_scale_(s1, t1, found, growth, backoff, interval)
            torch._amp_update_scale_(s2, t2, found, growth, backoff, interval)
            assert torch.equal(bits(s1), bits(s2)) and torch.equal(t1, t2)


def test_update_scale_hysteresis_matches_cpu():
    s_cpu, t_cpu, h_cpu = torch.tensor([1024.0]), torch.zeros(1, dtype=torch.int32), torch.full((1,), 2, dtype=torch.int32)
    s, t, h = s_cpu.cuda(), t_cpu.cuda(), h_cpu.cuda()
    for overflow in [1, 1, 1, 0, 1, 0, 0, 0, 1, 1]:
        ops.update_scale_(s, t, cuda_flag(overflow), 2.0, 0.5, 2, 2, h, 1.0, 4096.0)
        ops.update_scale_(s_cpu, t_cpu, torch.tensor([float(overflow)]), 2.0, 0.5, 2, 2, h_cpu, 1.0, 4096.0)
        assert (s.item(), t.item(), h.item()) == (s_cpu.item(), t_cpu.item(), h_cpu.item())


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
    torch.testing.assert_close(total.double(), fp64_norm(grads, 1 / 256), rtol=5e-6, atol=0)
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
        torch.testing.assert_close(total.double(), expected, rtol=5e-6, atol=0)
    assert counter.frame_count == 1


def test_wrong_device_is_named():
    grads = grads_of([10])
    before = clones(grads)
    with pytest.raises(RuntimeError, match=r"found_inf is on cpu"):
        ops.grad_norm(grads, None, torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cpu but the op runs on cuda"):
        ops.unscale_check_(grads + [torch.zeros(3)], cuda_flag(), torch.tensor([0.5], device="cuda"))
    with pytest.raises(RuntimeError, match=r"torch.float64 is supported on CPU only"):
        ops.unscale_check_([torch.zeros(3, device="cuda", dtype=torch.float64)], cuda_flag(), torch.tensor([0.5], device="cuda"))
    assert_bitwise(grads, before)


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
