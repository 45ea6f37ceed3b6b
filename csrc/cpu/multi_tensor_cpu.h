// The CPU counterpart of csrc/cuda/multi_tensor_apply.cuh: the same plan (fixed-size chunks, blocks
// numbered in list order), executed by at::parallel_for instead of a grid. Chunk boundaries do not
// depend on the thread count, so reductions are bit-identical however many threads run them.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../functors.h"
#include "../flat_tensors.h"
#include "../multi_tensor_plan.h"
#include "simd.h"

namespace fastamp::cpu {

// 64K elements (multi_tensor_plan.h): large enough to amortize per-chunk work, small enough to balance
// a few threads.
using fastamp::kChunkSize;
// Independent accumulators per chunk: breaks the add dependency chain so the loop vectorizes, and
// keeps a fixed summation order.
constexpr int kLanes = 16;

// Runs f(T* tag) with the C++ element type of a gradient dtype.
template <typename F>
void dispatch_grad_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kDouble: f(static_cast<double*>(nullptr)); break;
    default: TORCH_CHECK(false, "fastamp: unsupported dtype ", c10::toString(dtype));
  }
}

// What an op's run<T> reports about one chunk.
struct ChunkResult {
  double sum_squares = 0.0;  // the chunk's partial of a norm (ops that reduce)
  bool nonfinite = false;    // the chunk held inf or nan
};

// What a multi_tensor_apply gathered: per-block partials, in block (list) order, and the flag.
struct MultiTensorResult {
  MultiTensorPlan plan;
  std::vector<double> block_sums;
  bool nonfinite = false;
};

// Below this many elements the thread pool costs more than it saves.
constexpr int64_t kMinParallelElements = 2 * kChunkSize;

// The CPU multi-tensor harness: plans `tensors` into chunks, dispatches each chunk's dtype and calls
// `op.template run<T>(data, count)` on it (data points at the chunk's first element), in parallel.
// An Op declares
//   static constexpr bool kWrites;   // it writes the tensors (strided ones are copied back afterwards)
//   static constexpr bool kReverse;  // chunks are claimed last to first
//   template <typename T> ChunkResult run(T* data, int64_t count) const;
// Threads claim work units (runs of chunks of about 64K elements: one full chunk, or many small
// tensors) from a shared counter, so a list mixing 64K-element chunks with hundreds of tiny tensors
// keeps every thread busy to the end (a split by chunk count does not: a tiny tensor is one "chunk" of
// almost no work). Results land in their block's slot, so reductions do not depend on which thread ran
// what. kReverse serves ops that follow a full pass over the same tensors (scale_ after grad_norm):
// they start on the chunks still in the last-level cache.
template <typename Op>
MultiTensorResult multi_tensor_apply(at::TensorList tensors, const Op& op) {
  FlatTensors flat(tensors, kChunkSize, INT64_MAX, INT64_MAX);
  MultiTensorResult result;
  result.block_sums.assign(flat.plan.total_blocks, 0.0);
  if (!flat.plan.launches.empty()) {
    const Launch& launch = flat.plan.launches.front();
    const int64_t blocks = static_cast<int64_t>(launch.block_slot.size());
    auto count_of = [&](int64_t b) {
      const int64_t numel = flat.dense[launch.tensors[launch.block_slot[b]]].numel();
      return std::min(flat.plan.chunk_size, numel - launch.block_chunk[b] * flat.plan.chunk_size);
    };
    // Work units: runs of consecutive blocks of about one chunk's worth of elements, so that a thread
    // claims hundreds of tiny tensors at once rather than one by one (each claim is a contended atomic).
    std::vector<int64_t> unit_end;
    int64_t elements = 0, in_unit = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t count = count_of(b);
      elements += count;
      in_unit += count;
      if (in_unit >= flat.plan.chunk_size || b + 1 == blocks) {
        unit_end.push_back(b + 1);
        in_unit = 0;
      }
    }
    const int64_t units = static_cast<int64_t>(unit_end.size());
    std::atomic<int64_t> next{0};
    std::atomic<bool> nonfinite{false};
    auto run_block = [&](int64_t b) {
      const at::Tensor& t = flat.dense[launch.tensors[launch.block_slot[b]]];
      const int64_t first = launch.block_chunk[b] * flat.plan.chunk_size;
      dispatch_grad_dtype(t.scalar_type(), [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        const ChunkResult r = op.template run<T>(static_cast<T*>(t.data_ptr()) + first, count_of(b));
        result.block_sums[launch.first_block + b] = r.sum_squares;
        if (r.nonfinite) nonfinite.store(true, std::memory_order_relaxed);
      });
    };
    auto claim_and_run = [&](int64_t, int64_t) {
      for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < units;
           k = next.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t u = Op::kReverse ? units - 1 - k : k;
        const int64_t begin = u == 0 ? 0 : unit_end[u - 1], end = unit_end[u];
        for (int64_t i = begin; i < end; ++i) run_block(Op::kReverse ? begin + end - 1 - i : i);
      }
    };
    const int64_t threads = at::get_num_threads();
    if (units == 1 || threads == 1 || elements < kMinParallelElements || at::in_parallel_region()) {
      claim_and_run(0, 1);
    } else {
      at::parallel_for(0, std::min(threads, units), 1, claim_and_run);
    }
    result.nonfinite = nonfinite.load();
  }
  if constexpr (Op::kWrites) flat.write_back(tensors);
  result.plan = std::move(flat.plan);
  return result;
}

template <typename A>
inline A sum_lanes(A (&lanes)[kLanes]) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// Elements per sub-block: each sub-block is summed in opmath over kLanes lanes (64 adds per lane), and
// sub-block sums are added in fp64. Cascading keeps fp32 rounding error near 64 ulps, not 4096.
using simd::kSubBlock;

// Sum over [0, count) of value_at(i, lane)^2, in a fixed order. value_at may also write element i.
template <typename A, typename F>
inline double sum_squares_cascade(int64_t count, const F& value_at) {
  double total = 0.0;
  for (int64_t base = 0; base < count; base += kSubBlock) {
    const int64_t end = std::min(count, base + kSubBlock);
    A lanes[kLanes] = {};
    int64_t i = base;
    for (; i + kLanes <= end; i += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] = square_accumulate(lanes[l], value_at(i + l, l));
    for (; i < end; ++i) lanes[0] = square_accumulate(lanes[0], value_at(i, 0));
    total += static_cast<double>(sum_lanes(lanes));
  }
  return total;
}

template <typename T>
inline bool chunk_has_nonfinite(const T* data, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    if (!is_finite_value(static_cast<opmath_t<T>>(data[i]))) return true;
  return false;
}

}  // namespace fastamp::cpu
