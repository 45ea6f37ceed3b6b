// The one launch harness of fastamp's CUDA kernels. Planning (which block handles which chunk of which
// tensor, how the list splits into launches) is host C++ in csrc/multi_tensor_plan.h; this file packs a
// plan's launches into kernel parameters and holds the device-side loop.
//
// One block handles one chunk of kChunkSize elements. Tensors of any dtype (fp32, fp16, bf16) share a
// launch: each block switches once on its tensor's dtype. Every chunk uses 128-bit loads and stores,
// kILP of them in flight per thread; a chunk whose base is not 16-byte aligned first peels the few
// elements before the boundary. Each thread visits its elements in a fixed order, so per-thread accumulations, and the
// fixed-shape block reduction after them, give bit-identical results run to run.
#pragma once

#include <cstdint>
#include <vector>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../functors.h"
#include "launch.h"

#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ >= 12)
#define FASTAMP_GRID_CONSTANT __grid_constant__
#else
#define FASTAMP_GRID_CONSTANT
#endif

namespace fastamp::cuda {

// The block shape, a compile-time choice: threads per block, and the minimum resident blocks per SM
// that ptxas must leave room for (it caps registers per thread to fit). 512 threads x 1 block gave the
// norm kernels 74 registers and 16 warps per SM; 512 x 2 caps them at 64 and spills (up to 112 bytes
// on sm_80/sm_90); 256 x 3 caps them at 85: 0 spills on sm_80, sm_90 and sm_90a (up to 80 registers)
// and 24 warps per SM. FASTAMP_BLOCK_THREADS and FASTAMP_MIN_BLOCKS_PER_SM build the variants that
// `make gpu-check` times.
#ifndef FASTAMP_BLOCK_THREADS
#define FASTAMP_BLOCK_THREADS 256
#endif
#ifndef FASTAMP_MIN_BLOCKS_PER_SM
#define FASTAMP_MIN_BLOCKS_PER_SM 3
#endif
constexpr int kBlockThreads = FASTAMP_BLOCK_THREADS;
constexpr int kMinBlocksPerSM = FASTAMP_MIN_BLOCKS_PER_SM;
constexpr int kILP = 4;
// block_sum uses full-mask warp shuffles and one shared slot per warp.
static_assert(kBlockThreads % 32 == 0 && kBlockThreads >= 32 && kBlockThreads <= 1024,
              "kBlockThreads must be a multiple of 32 between 32 and 1024");
static_assert(kMinBlocksPerSM >= 1, "kMinBlocksPerSM must be at least 1");

struct TensorListArgs {
  void* data[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  DType dtype[kMaxTensorsPerLaunch];
  int32_t block_slot[kMaxBlocksPerLaunch];
  int32_t block_chunk[kMaxBlocksPerLaunch];  // 2^31 chunks of 64K elements: far beyond any tensor
  int64_t first_block;
};

// Leave room for the op's own parameters (a few pointers) within the kernel parameter limit.
#if FASTAMP_LARGE_KERNEL_PARAMS
static_assert(sizeof(TensorListArgs) + 256 <= 32764, "TensorListArgs exceeds the 32 KB kernel parameter limit");
#else
static_assert(sizeof(TensorListArgs) + 256 <= 4096, "TensorListArgs exceeds the 4 KB kernel parameter limit");
#endif

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Calls f(x) for data[i], i in [begin, end), with end - begin <= blockDim.x: at most one element per
// thread, so a single predicated access (the peeled head and the tail of a chunk are each shorter than
// one vector).
template <bool kWrite, typename T, typename F>
__device__ __forceinline__ void for_each_peeled(T* data, int64_t begin, int64_t end, F& f) {
  const int64_t i = begin + threadIdx.x;
  if (i < end) {
    const T y = f(data[i]);
    if (kWrite) data[i] = y;
  }
}

// Calls f(x) for every element of data[0, count) visited by this thread, in a fixed order; with kWrite,
// stores what f returns. f(T) -> T. The elements before the first 16-byte boundary (fewer than one
// vector) are peeled off, so every chunk, whatever its base alignment, runs the 128-bit loop with kILP
// vectors in flight per thread; then the tail of fewer than one vector.
template <bool kWrite, typename T, typename F>
__device__ __forceinline__ void for_each_element(T* data, int64_t count, F& f) {
  constexpr int V = 16 / sizeof(T);
  using VecT = Vec<T, V>;
  const int64_t misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(data) / sizeof(T)) % V);
  const int64_t head = misaligned == 0 ? 0 : (V - misaligned < count ? V - misaligned : count);
  for_each_peeled<kWrite>(data, 0, head, f);
  const int64_t vectors = (count - head) / V;
  VecT* vdata = reinterpret_cast<VecT*>(data + head);
  for (int64_t base = threadIdx.x; base < vectors; base += static_cast<int64_t>(blockDim.x) * kILP) {
    VecT r[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t v = base + static_cast<int64_t>(k) * blockDim.x;
      if (v < vectors) r[k] = vdata[v];
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t v = base + static_cast<int64_t>(k) * blockDim.x;
      if (v < vectors) {
#pragma unroll
        for (int j = 0; j < V; ++j) r[k].v[j] = f(r[k].v[j]);
        if (kWrite) vdata[v] = r[k];
      }
    }
  }
  for_each_peeled<kWrite>(data, head + vectors * V, count, f);
}

// Deterministic block-wide sum (fixed shuffle tree, then warp sums in order); every thread gets it.
template <typename A>
__device__ __forceinline__ A block_sum(A value) {
  __shared__ A warp_sums[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) / 32;
    value = lane < warps ? warp_sums[lane] : A(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) warp_sums[0] = value;
  }
  __syncthreads();
  const A total = warp_sums[0];
  __syncthreads();
  return total;
}

// Runs op.template run<T>(chunk_data, count, global_block) for the block's chunk.
template <typename Op>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    multi_tensor_kernel(const FASTAMP_GRID_CONSTANT TensorListArgs args, Op op) {
  const int slot = args.block_slot[blockIdx.x];
  const int64_t first = static_cast<int64_t>(args.block_chunk[blockIdx.x]) * kChunkSize;
  const int64_t remaining = args.numel[slot] - first;
  const int64_t count = remaining < kChunkSize ? remaining : kChunkSize;
  const int64_t block = args.first_block + blockIdx.x;
  switch (args.dtype[slot]) {
    case DType::kFloat: op.template run<float>(static_cast<float*>(args.data[slot]) + first, count, block); break;
    case DType::kHalf:
      op.template run<c10::Half>(static_cast<c10::Half*>(args.data[slot]) + first, count, block);
      break;
    case DType::kBFloat16:
      op.template run<c10::BFloat16>(static_cast<c10::BFloat16*>(args.data[slot]) + first, count, block);
      break;
  }
}

// Launches op over every chunk of the plan, one kernel per launch of the plan, on `stream`.
template <typename Op>
void multi_tensor_apply(const std::vector<DeviceTensor>& tensors, const MultiTensorPlan& plan, const Op& op,
                        cudaStream_t stream) {
  for (const Launch& launch : plan.launches) {
    TORCH_INTERNAL_ASSERT(launch.tensors.size() <= static_cast<size_t>(kMaxTensorsPerLaunch) &&
                              launch.block_slot.size() <= static_cast<size_t>(kMaxBlocksPerLaunch),
                          "fastamp: a launch of ", launch.tensors.size(), " tensors and ", launch.block_slot.size(),
                          " blocks does not fit the kernel parameters (", kMaxTensorsPerLaunch, ", ",
                          kMaxBlocksPerLaunch, ")");
    TensorListArgs args;
    for (size_t s = 0; s < launch.tensors.size(); ++s) {
      const DeviceTensor& t = tensors[launch.tensors[s]];
      args.data[s] = t.data;
      args.numel[s] = t.numel;
      args.dtype[s] = t.dtype;
    }
    for (size_t b = 0; b < launch.block_slot.size(); ++b) {
      args.block_slot[b] = launch.block_slot[b];
      args.block_chunk[b] = static_cast<int32_t>(launch.block_chunk[b]);
    }
    args.first_block = launch.first_block;
    multi_tensor_kernel<<<static_cast<unsigned>(launch.block_slot.size()), kBlockThreads, 0, stream>>>(args, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace fastamp::cuda
