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

// 64K elements: large enough to amortize per-chunk work, small enough to balance a few threads.
constexpr int64_t kChunkSize = 65536;
// Independent accumulators per chunk: breaks the add dependency chain so the loop vectorizes, and
// keeps a fixed summation order.
constexpr int kLanes = 16;

// Calls f(tensor_index, first_element, element_count, global_block) for every chunk, in parallel.
// With reverse, each thread walks its range of chunks backwards: an op that follows a full pass over
// the same tensors (scale_ after grad_norm) then starts on the chunks still in the last-level cache.
template <typename F>
void parallel_for_each_chunk(const FlatTensors& flat, const F& f, bool reverse = false) {
  if (flat.plan.launches.empty()) return;
  const Launch& launch = flat.plan.launches.front();
  const int64_t blocks = static_cast<int64_t>(launch.block_slot.size());
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = reverse ? begin + end - 1 - k : k;
      const int64_t tensor = launch.tensors[launch.block_slot[b]];
      const int64_t first = launch.block_chunk[b] * flat.plan.chunk_size;
      const int64_t count = std::min(flat.plan.chunk_size, flat.dense[tensor].numel() - first);
      f(tensor, first, count, launch.first_block + b);
    }
  };
  // A single chunk is not worth waking the thread pool for.
  if (blocks == 1) {
    body(0, 1);
  } else {
    at::parallel_for(0, blocks, 1, body);
  }
}

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
