"""What the review before the kernels' first GPU run asked to be tested: huge finite grads, a non-finite
value in a middle chunk of a tensor split across launches, scale_ with a NaN found_inf, inv_scale 0 on
inf grads, misaligned vs aligned views on every op, the device guard on a second GPU, and that the
kernels registered for CUDA are the compiled ones. Skipped without an NVIDIA GPU."""

from __future__ import annotations

import math

import pytest
import torch

import fastamp
from fastamp import ops
from fastamp.testing import chunk_size, reference, same_bits, tolerance

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

CHUNK = chunk_size()
NORM_RTOL = tolerance("grad_norm", "cuda", torch.float32)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def flag(value=0.0, device="cuda"):
    return torch.full((1,), value, device=device)


def test_the_cuda_kernels_are_the_compiled_ones():
    """Fails, rather than passing on the reference, when the CUDA key does not run fastamp's C++ kernels."""
    info = fastamp.build_info()
    assert info["cuda_kernels"] and "CUDA" not in info["reference_fallback"], info
    for op in ops.OP_NAMES:
        table = torch._C._dispatch_dump_table(f"fastamp::{op}")
        cuda_line = next(line for line in table.splitlines() if line.startswith("CUDA"))
        assert "cuda/ops.cpp" in cuda_line.replace("\\", "/"), cuda_line


def test_huge_finite_grads_overflow_the_norm_but_are_not_flagged():
    grads = [torch.full((3 * CHUNK + 7,), 1e30, device="cuda"), torch.full((5,), -1e30, device="cuda")]
    found = flag()
    total, per = ops.grad_norm(grads, None, found, per_tensor=True)
    assert found.item() == 0.0
    assert math.isinf(total.item()) and bool(torch.isinf(per).all())
    found = flag()
    ops.unscale_check_(grads, found, flag(1.0))
    assert found.item() == 0.0


def test_nonfinite_in_a_middle_chunk_of_a_tensor_split_across_launches():
    chunks = 2 * 1536 + 3  # more chunks than one launch of the 32 KB layout holds (1536)
    g = torch.randn(chunks * CHUNK, device="cuda", dtype=torch.float16)
    middle = (1536 + 700) * CHUNK + 12345
    clean_found = flag()
    clean_total, _ = ops.grad_norm([g], flag(0.5), clean_found)
    assert clean_found.item() == 0.0
    expected = torch.linalg.vector_norm(g.double() * 0.5)
    assert abs(clean_total.item() - expected.item()) <= NORM_RTOL * expected.item()
    g[middle] = float("nan")
    for op in ("grad_norm", "unscale_check_", "unscale_check_norm_"):
        found = flag()
        target = g.clone()
        if op == "grad_norm":
            ops.grad_norm([target], flag(0.5), found)
        elif op == "unscale_check_":
            ops.unscale_check_([target], found, flag(0.5))
        else:
            ops.unscale_check_norm_([target], found, flag(0.5))
        assert found.item() == 1.0, op


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_with_a_nan_found_inf_writes_nothing(dtype):
    grads = [torch.randn(n, device="cuda").to(dtype) for n in (1, CHUNK + 3, 777)]
    before = [g.clone() for g in grads]
    ops.scale_(grads, flag(0.3), flag(float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


def test_zero_inv_scale_on_inf_grads_matches_torch():
    grads = [torch.randn(CHUNK + 9, device="cuda"), torch.randn(33, device="cuda")]
    grads[0][CHUNK + 1] = float("inf")
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    f_ours, f_theirs = flag(), flag()
    ops.unscale_check_(ours, f_ours, flag(0.0))
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, f_theirs, flag(0.0))
    assert f_ours.item() == f_theirs.item() == 1.0
    assert all(same_bits(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3, 5, 7])
def test_misaligned_views_match_the_reference_on_every_op(dtype, offset):
    buffer = (torch.randn(offset + 2 * CHUNK + 4 * CHUNK + 101, device="cuda") * 30).to(dtype)
    sizes = (2 * CHUNK + 13, 17, 4 * CHUNK + 50)

    def views(source):
        out, start = [], offset
        for n in sizes:
            out.append(source[start:start + n])
            start += n
        return out

    grads = views(buffer)
    for op in ("unscale_check_", "unscale_check_norm_", "scale_"):
        mine, theirs = buffer.clone(), buffer.clone()
        a, b = views(mine), views(theirs)
        fa, fb = flag(), flag()
        if op == "unscale_check_":
            ops.unscale_check_(a, fa, flag(0.37))
            reference.unscale_check_(b, fb, flag(0.37))
        elif op == "unscale_check_norm_":
            na, _ = ops.unscale_check_norm_(a, fa, flag(0.37))
            nb, _ = reference.unscale_check_norm_(b, fb, flag(0.37))
            assert abs(na.item() - nb.item()) <= NORM_RTOL * nb.item()
        else:
            ops.scale_(a, flag(0.37))
            reference.scale_(b, flag(0.37))
        assert same_bits(mine, theirs), op  # every element, including those before and after the views
        assert fa.item() == fb.item()
    total, per = ops.grad_norm(grads, flag(0.5), flag(), per_tensor=True)
    ref_total, ref_per = reference.grad_norm(grads, flag(0.5), flag(), True)
    assert abs(total.item() - ref_total.item()) <= NORM_RTOL * ref_total.item()
    assert torch.allclose(per.double(), ref_per.double(), rtol=NORM_RTOL, atol=0)
    aligned = [g.clone() for g in grads]
    aligned_total, _ = ops.grad_norm(aligned, flag(0.5), flag())
    assert abs(aligned_total.item() - total.item()) <= NORM_RTOL * total.item()
    for position in (0, -1):
        bad = buffer.clone()
        views(bad)[2][position] = float("inf")
        found = flag()
        ops.grad_norm(views(bad), flag(0.5), found)
        assert found.item() == 1.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_run_on_the_tensors_device_not_the_current_one():
    grads = [torch.randn(CHUNK + 5, device="cuda:1"), torch.randn(9, device="cuda:1").half()]
    before = [g.clone() for g in grads]
    torch.cuda.set_device(0)
    found = flag(device="cuda:1")
    total, _ = ops.grad_norm(grads, flag(0.5, "cuda:1"), found)
    assert total.device == torch.device("cuda:1") and found.item() == 0.0
    expected = torch.linalg.vector_norm(torch.cat([g.double() for g in before]) * 0.5)
    assert abs(total.item() - expected.item()) <= NORM_RTOL * expected.item()
    ops.scale_(grads, flag(2.0, "cuda:1"))
    assert all(torch.equal(g, (b.float() * 2.0).to(b.dtype)) for g, b in zip(grads, before))
    with pytest.raises(RuntimeError, match="device"):
        ops.scale_(grads, flag(2.0, "cuda:0"))
