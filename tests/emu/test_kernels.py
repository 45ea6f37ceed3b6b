"""fastamp's CUDA kernels, executed by the emulator (and, where a GPU is, the same cases on the real
kernels: the `target` fixture), against the reference (fastamp.ops._reference)
and PyTorch's own AMP op: every op, the awkward inputs (sizes around vectors and chunks, misaligned
heads at every offset, one-hot tensors, inf/nan at head, vector, chunk and tail positions, hundreds of
tensors over several launches, mixed dtypes in one launch), both parameter layouts and every block
shape `make gpu-check` builds. Norms are held to the CUDA tolerance of fastamp.testing.tolerance;
everything else bit for bit."""

from __future__ import annotations

import math
from typing import List

import pytest
import torch

from fastamp.ops import _reference as ref
from fastamp.testing import assert_bitwise_equal, clones, same_bits, tolerance

from .conftest import emulated

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 65536


def _grads(sizes: List[int], dtype: torch.dtype, seed: int = 0, magnitude: float = 100.0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen) * magnitude).to(dtype) for n in sizes]


def _assert_norm_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, op: str = "grad_norm") -> None:
    rtol = tolerance(op, "cuda", dtype)
    assert torch.allclose(actual.double(), expected.double(), rtol=rtol, atol=0.0), (actual, expected)


def _flags():
    return torch.zeros(()), torch.zeros(())


# Element counts around a 16-byte vector (4 fp32, 8 fp16/bf16), a block's worth of vectors, and a chunk.
SIZES = [0, 1, 3, 7, 8, 9, 255, 256 * 4 * 4 + 3, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


@pytest.mark.parametrize("dtype", DTYPES)
def test_unscale_check_bitwise_against_reference(target, dtype):
    grads = _grads(SIZES, dtype)
    expected = clones(grads)
    inv = torch.full((), 1 / 1024.0 * 3)
    found, ref_found = _flags()
    target.unscale_check_(grads, found, inv)
    ref.unscale_check_(expected, ref_found, inv)
    assert_bitwise_equal(grads, expected)
    assert found.item() == ref_found.item() == 0.0


def test_unscale_check_fp32_bitwise_against_torch(target):
    grads = _grads(SIZES, torch.float32, seed=3)
    expected = clones(grads)
    found, torch_found = _flags()
    inv = torch.full((), 0.1)
    target.unscale_check_(grads, found, inv)
    torch._amp_foreach_non_finite_check_and_unscale_([g for g in expected if g.numel()], torch_found, inv)
    assert_bitwise_equal(grads, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_norm_total_and_per_tensor(target, dtype):
    grads = _grads(SIZES, dtype, seed=1)
    inv = torch.full((), 0.25)
    found, ref_found = _flags()
    total, per = target.grad_norm(grads, inv, found, per_tensor=True)
    ref_total, ref_per = ref.grad_norm(grads, inv, ref_found, per_tensor=True)
    _assert_norm_close(total, ref_total.float(), dtype)
    _assert_norm_close(per, ref_per.float(), dtype)
    assert found.item() == 0.0
    # The total is one summation whether or not per-tensor norms are asked for: the same bits.
    alone, none = target.grad_norm(grads, inv, None)
    assert none is None and same_bits(alone, total)
    without_scale, _ = target.grad_norm(grads)
    _assert_norm_close(without_scale, ref.grad_norm(grads)[0].float(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unscale_check_norm_writes_and_norms(target, dtype):
    grads = _grads(SIZES, dtype, seed=2)
    expected = clones(grads)
    inv = torch.full((), 1 / 3.0)
    found, ref_found = _flags()
    total, per = target.unscale_check_norm_(grads, found, inv, per_tensor=True)
    ref_total, ref_per = ref.unscale_check_norm_(expected, ref_found, inv, per_tensor=True)
    assert_bitwise_equal(grads, expected)
    _assert_norm_close(total, ref_total.float(), dtype, "unscale_check_norm_")
    _assert_norm_close(per, ref_per.float(), dtype, "unscale_check_norm_")


@pytest.mark.parametrize("max_norm", [1e-3, 1e9])
def test_clip_norm_folds_coefficient_and_factor_into_the_finish(target, max_norm):
    grads = _grads(SIZES, torch.float16, seed=6)
    inv = torch.full((), 1 / 3.0)
    found = torch.zeros(())
    total, per, coef, factor = target.clip_norm(grads, max_norm, inv, found, per_tensor=True)
    ref_total, ref_per, _, _ = ref.clip_norm(grads, max_norm, inv, torch.zeros(()), per_tensor=True)
    _assert_norm_close(total, ref_total.float(), torch.float16)
    _assert_norm_close(per, ref_per.float(), torch.float16)
    # The coefficient and factor of the kernel's own total, bit for bit as clip_coef and torch's multiply.
    expected_coef = ref.clip_coef(total, max_norm).float()
    assert same_bits(coef, expected_coef) and same_bits(factor, inv * expected_coef)
    assert same_bits(total, target.grad_norm(grads, inv)[0])
    _, _, coef_alone, factor_alone = target.clip_norm(grads, max_norm)
    assert same_bits(factor_alone, coef_alone)
    grads[4][-1] = math.inf
    total, _, coef, _ = target.clip_norm(grads, max_norm, inv, found)
    assert found.item() == 1.0 and math.isinf(total.item()) and coef.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_bitwise_and_skipped_on_overflow(target, dtype):
    grads = _grads(SIZES, dtype, seed=4)
    expected = clones(grads)
    factor = torch.full((), 0.3)
    target.scale_(grads, factor)
    ref.scale_(expected, factor)
    assert_bitwise_equal(grads, expected)
    before = clones(grads)
    target.scale_(grads, factor, torch.ones(()))  # an overflow step writes nothing
    assert_bitwise_equal(grads, before)
    target.scale_(grads, torch.ones(()), torch.zeros(()))  # a factor of exactly 1 writes nothing
    assert_bitwise_equal(grads, before)


@pytest.mark.parametrize("norm", [0.0, 0.5, 1.0, 3.0, 1e30, math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_coef_bitwise(target, norm, dtype):
    total = torch.tensor(norm, dtype=dtype)
    assert same_bits(target.clip_coef(total, 1.0), ref.clip_coef(total, 1.0))
    assert same_bits(target.clip_coef(total, 0.25, eps=1e-3), ref.clip_coef(total, 0.25, eps=1e-3))


def test_update_scale_sequence_bitwise(target):
    """Overflows and clean steps with hysteresis and bounds: state after every step equals the reference."""
    def state():
        return torch.full((), 2.0**15), torch.zeros((), dtype=torch.int32), torch.full((), 2, dtype=torch.int32)

    emu_state, ref_state = state(), state()
    policy = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=3, hysteresis=2, min_scale=1.0,
                  max_scale=2.0**16)
    for step, overflow in enumerate([0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0] + [1] * 40):
        flag = torch.full((), float(overflow))
        target.update_scale_(emu_state[0], emu_state[1], flag, hysteresis_tracker=emu_state[2], **policy)
        ref.update_scale_(ref_state[0], ref_state[1], flag, hysteresis_tracker=ref_state[2], **policy)
        assert_bitwise_equal(list(emu_state), list(ref_state))
    assert emu_state[0].item() == 1.0  # held at min_scale
    plain, ref_plain = state()[:2], state()[:2]
    for overflow in (0, 0, 0, 1, 0):
        flag = torch.full((), float(overflow))
        target.update_scale_(*plain, flag, 2.0, 0.5, 3)
        torch._amp_update_scale_(*ref_plain, flag, 2.0, 0.5, 3)
        assert_bitwise_equal(list(plain), list(ref_plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_misaligned_heads_at_every_offset(target, dtype):
    """Views starting at every element offset within a 16-byte vector: the peeled head, the vector loop
    and the tail together visit every element once (unscale bitwise, norm of one-hots exact)."""
    per_vector = 16 // torch.empty((), dtype=dtype).element_size()
    for offset in range(per_vector):
        for n in (1, per_vector - 1, per_vector + 1, 3 * per_vector + 2, 4100):
            if n < 1:
                continue
            base = torch.randn(offset + n + per_vector).to(dtype)
            view = base[offset:offset + n]
            expected = view.clone()
            around = torch.cat([base[:offset], base[offset + n:]])
            found, ref_found = _flags()
            target.unscale_check_([view], found, torch.full((), 0.5))
            ref.unscale_check_([expected], ref_found, torch.full((), 0.5))
            assert_bitwise_equal([view], [expected])
            assert same_bits(torch.cat([base[:offset], base[offset + n:]]), around)  # nothing outside the view
    # One-hot views: each view's norm is exactly 1 whichever element carries the 1.
    positions = (0, 1, per_vector - 1, per_vector, 20, 36)
    for offset in range(per_vector):
        views = []
        for position in positions:
            base = torch.zeros(per_vector + 40, dtype=dtype)
            views.append(base[offset:offset + 37])
            views[-1][position] = 1
        _, per = target.grad_norm(views, per_tensor=True)
        assert torch.equal(per, torch.ones(len(positions))), (offset, per)


def test_one_hot_every_position_class(target):
    """A single 1 at the head, inside the vector loop, at a chunk boundary and in the tail: counted once."""
    n = 2 * CHUNK + 7
    positions = [0, 1, 5, 4 * 256, 4 * 256 * 4 + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, n - 1]
    for dtype in DTYPES:
        grads = [torch.zeros(n, dtype=dtype) for _ in positions]
        for g, p in zip(grads, positions):
            g[p] = 2
        total, per = target.grad_norm(grads, per_tensor=True)
        assert torch.equal(per, torch.full((len(positions),), 2.0)), (dtype, per)
        assert total.item() == pytest.approx(2.0 * math.sqrt(len(positions)), rel=1e-7)


@pytest.mark.parametrize("value,dtype", [(math.inf, torch.float32), (-math.inf, torch.bfloat16),
                                         (math.nan, torch.float16)])
def test_nonfinite_found_at_every_position(target, value, dtype):
    n = 2 * CHUNK + 7
    for position in (0, 3, 4 * 256 * 4, CHUNK - 1, CHUNK, n - 1):
        grads = [torch.ones(5, dtype=dtype), torch.ones(n, dtype=dtype)]
        grads[1][position] = value
        found = torch.zeros(())
        target.grad_norm(grads, None, found)
        assert found.item() == 1.0, ("grad_norm", position)
        found = torch.zeros(())
        before = clones(grads)
        target.unscale_check_(grads, found, torch.full((), 0.5))
        assert found.item() == 1.0, ("unscale_check_", position)
        expected = clones(before)
        ref.unscale_check_(expected, torch.zeros(()), torch.full((), 0.5))
        assert_bitwise_equal(grads, expected)
        found = torch.zeros(())
        total, _ = target.unscale_check_norm_(clones(before), found, torch.full((), 0.5))
        assert found.item() == 1.0 and not math.isfinite(total.item())


def test_hundreds_of_tensors_mixed_dtypes_over_several_launches(emu):
    sizes = [(i * 37) % 3000 for i in range(210)]
    sizes[100] = CHUNK + 3
    dtypes = [DTYPES[i % 3] for i in range(210)]
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(n, generator=gen).to(d) for n, d in zip(sizes, dtypes)]
    expected = clones(grads)
    inv = torch.full((), 0.125)
    with emu.launches() as launches:
        found = torch.zeros(())
        total, per = emu.unscale_check_norm_(grads, found, inv, per_tensor=True)
    ref_total, ref_per = ref.unscale_check_norm_(expected, torch.zeros(()), inv, per_tensor=True)
    assert_bitwise_equal(grads, expected)
    _assert_norm_close(total, ref_total.float(), torch.float16)
    _assert_norm_close(per, ref_per.float(), torch.float16)
    stage_one = math.ceil(210 / emu.max_tensors_per_launch)
    assert launches.count("multi_tensor_kernel") == stage_one > 1
    assert launches[-1] == "finish_kernel"


def test_block_order_does_not_change_a_bit(emu):
    grads = _grads([CHUNK * 3 + 11, 5, CHUNK + 1], torch.float16, seed=7)
    in_order, per = emu.grad_norm(grads, per_tensor=True)
    for seed in (1, 2, 3):
        with emu.block_order(seed):
            shuffled, shuffled_per = emu.grad_norm(grads, per_tensor=True)
        assert same_bits(shuffled, in_order) and same_bits(shuffled_per, per)


def test_parameter_layouts_give_the_same_bits(emu):
    """The 4 KB and 32 KB layouts split a long list into different launches; every block's partial
    lands at its global index, so the totals agree bit for bit."""
    large = emulated("large-params")
    assert large.max_tensors_per_launch > emu.max_tensors_per_launch
    grads = _grads([(i * 53) % 900 + 1 for i in range(110)], torch.bfloat16, seed=8)
    a, per_a = emu.grad_norm(grads, per_tensor=True)
    b, per_b = large.grad_norm(grads, per_tensor=True)
    assert same_bits(a, b) and same_bits(per_a, per_b)


def test_non_contiguous_views_written_back(target):
    base = torch.randn(64, 33)
    view = base.t()[:, ::2]
    expected = view.clone()
    target.unscale_check_([view], torch.zeros(()), torch.full((), 0.5))
    ref.unscale_check_([expected], torch.zeros(()), torch.full((), 0.5))
    assert same_bits(view.contiguous(), expected)


def test_every_block_shape_and_layout(emu_variant):
    """Each build variant on a case mixing dtypes, chunk boundaries, a misaligned head and a NaN."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float32]
    sizes = [CHUNK + 1, 2 * CHUNK + 9, 1, 1000]
    grads = [g.to(d) for g, d in zip(_grads(sizes, torch.float32, seed=9), dtypes)]
    grads[3] = torch.randn(1003)[3:]  # misaligned head
    expected = clones(grads)
    inv = torch.full((), 0.5)
    found, ref_found = _flags()
    total, per = emu_variant.unscale_check_norm_(grads, found, inv, per_tensor=True)
    ref_total, ref_per = ref.unscale_check_norm_(expected, ref_found, inv, per_tensor=True)
    assert_bitwise_equal(grads, expected)
    _assert_norm_close(total, ref_total.float(), torch.float16)
    _assert_norm_close(per, ref_per.float(), torch.float16)
    grads[2][0] = math.nan
    found = torch.zeros(())
    emu_variant.grad_norm(grads, inv, found)
    assert found.item() == 1.0


def test_launch_counts(emu):
    """Launches per op: one stage-one launch per plan launch, one finish, one more for per-tensor norms."""
    grads = _grads([CHUNK + 5, 100], torch.float32)
    found, inv = torch.zeros(()), torch.full((), 0.5)
    with emu.launches() as norm:
        emu.grad_norm(grads, inv, found)
    assert norm == ["multi_tensor_kernel", "finish_kernel"]
    with emu.launches() as per_tensor:
        emu.grad_norm(grads, inv, found, per_tensor=True)
    assert per_tensor == ["multi_tensor_kernel", "per_tensor_norms_kernel", "finish_kernel"]
    with emu.launches() as unscale:
        emu.unscale_check_(grads, found, inv)
    assert unscale == ["multi_tensor_kernel"]
    with emu.launches() as empty:
        total, _ = emu.grad_norm([], inv, found)
    assert empty == [] and total.item() == 0.0


def test_launches_per_clipped_step(emu):
    """A clipped step before clip_norm: norm pass, finish, clip_coef, (torch's inv_scale * coef), scale
    pass. Now: norm pass, one finish that also writes the coefficient and the factor, scale pass; with
    a fused optimizer (the factor is its grad_scale) no scale pass at all."""
    grads = _grads([CHUNK + 5, 100, 3], torch.float16)
    found, inv = torch.zeros(()), torch.full((), 0.5)
    with emu.launches() as before:
        total, _ = emu.grad_norm(grads, inv, found)
        factor = inv * emu.clip_coef(total, 1.0)  # + one launch of torch's multiply on a GPU
        emu.scale_(grads, factor, found)
    assert before == ["multi_tensor_kernel", "finish_kernel", "clip_coef_kernel", "multi_tensor_kernel"]
    with emu.launches() as now:
        _, _, _, factor = emu.clip_norm(grads, 1.0, inv, found)
        emu.scale_(grads, factor, found)
    assert now == ["multi_tensor_kernel", "finish_kernel", "multi_tensor_kernel"]
    with emu.launches() as fused:
        emu.clip_norm(grads, 1.0, inv, found)
    assert fused == ["multi_tensor_kernel", "finish_kernel"]
