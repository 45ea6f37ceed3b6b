// Host-side planning for multi-tensor kernels: which block handles which chunk of which tensor, and
// how a tensor list is split into launches. Plain C++17 with no torch or CUDA dependency so that it is
// unit-tested on any machine (csrc/tests/test_multi_tensor_plan.cpp) and shared by the CPU kernels
// (one "launch" of unlimited capacity, blocks run by at::parallel_for) and the CUDA harness.
//
// Blocks are numbered globally in list order (tensor-major, chunk-minor), so tensor t owns the block
// range [first_block[t], first_block[t] + num_chunks[t]). Per-block partial results therefore land at
// the same index however the list is split into launches, and a fixed-order second stage over those
// ranges gives bit-identical reductions whatever the launch limits or thread count.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastamp {

// Elements per chunk, the unit of work of a block (CUDA) or a work claim (CPU), and the unit of fp32
// accumulation (fp64 across chunks). One value for both backends; fastamp._C exports it (chunk_size),
// and the tests take it from there.
constexpr int64_t kChunkSize = 65536;

struct Launch {
  // Indices into the input list of the tensors this launch touches, in list order. A tensor larger
  // than one launch's block capacity appears in several consecutive launches.
  std::vector<int32_t> tensors;
  // For each block of the launch: the position in `tensors` and the chunk index within that tensor.
  std::vector<int32_t> block_slot;
  std::vector<int64_t> block_chunk;
  // Global number of the launch's first block; block b of this launch is global block first_block + b.
  int64_t first_block = 0;
};

struct MultiTensorPlan {
  int64_t chunk_size = 0;
  int64_t total_blocks = 0;
  std::vector<int64_t> first_block;  // per input tensor
  std::vector<int64_t> num_chunks;   // per input tensor; 0 for empty tensors
  std::vector<Launch> launches;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits tensors of the given element counts into chunks of `chunk_size` elements and packs the
// chunks into launches holding at most `max_tensors` distinct tensors and `max_blocks` blocks each.
// Empty tensors get no block. The limits mirror what fits in one kernel's parameter space.
inline MultiTensorPlan plan_multi_tensor(const std::vector<int64_t>& numels, int64_t chunk_size, int64_t max_tensors,
                                         int64_t max_blocks) {
  if (chunk_size <= 0) throw std::invalid_argument("plan_multi_tensor: chunk_size must be positive");
  if (max_tensors <= 0 || max_blocks <= 0)
    throw std::invalid_argument("plan_multi_tensor: launch limits must be positive");
  if (numels.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    throw std::invalid_argument("plan_multi_tensor: too many tensors");

  MultiTensorPlan plan;
  plan.chunk_size = chunk_size;
  plan.first_block.resize(numels.size());
  plan.num_chunks.resize(numels.size());

  Launch current;
  current.first_block = 0;
  int64_t next_block = 0;
  auto flush = [&]() {
    if (!current.block_slot.empty()) plan.launches.push_back(std::move(current));
    current = Launch();
    current.first_block = next_block;
  };

  for (size_t t = 0; t < numels.size(); ++t) {
    const int64_t numel = numels[t];
    if (numel < 0) throw std::invalid_argument("plan_multi_tensor: negative numel at index " + std::to_string(t));
    const int64_t chunks = ceil_div(numel, chunk_size);
    plan.first_block[t] = next_block;
    plan.num_chunks[t] = chunks;
    for (int64_t c = 0; c < chunks; ++c) {
      const bool tensor_is_new = current.tensors.empty() || current.tensors.back() != static_cast<int32_t>(t);
      if (static_cast<int64_t>(current.block_slot.size()) == max_blocks ||
          (tensor_is_new && static_cast<int64_t>(current.tensors.size()) == max_tensors)) {
        flush();
      }
      if (current.tensors.empty() || current.tensors.back() != static_cast<int32_t>(t)) {
        current.tensors.push_back(static_cast<int32_t>(t));
      }
      current.block_slot.push_back(static_cast<int32_t>(current.tensors.size() - 1));
      current.block_chunk.push_back(c);
      ++next_block;
    }
  }
  flush();
  plan.total_blocks = next_block;
  return plan;
}

}  // namespace fastamp
