// A CUDA-semantics runtime for running fastamp's .cu files on a CPU, test-only. Force-included
// (-include) ahead of every emulated source, so the kernels compile unmodified by g++ once
// tests/emu/build.py has rewritten `k<<<grid, block, shmem, stream>>>(args)` into emu::launch.
//
// The model: every CUDA thread of a block is an OS thread; the blocks of a launch run one after another
// (so `__shared__` is a function-local static); `__syncthreads` is a counting barrier over the block;
// the warp intrinsics (`__shfl_*_sync`, `__syncwarp`, `__ballot_sync`) are collectives over the lanes
// their mask names, with CUDA's 32-lane and `width` rules. Whatever CUDA leaves undefined and a GPU
// would run silently wrong (a divergent barrier, a lane that exits while its warp waits, a shuffle that
// reads a lane outside its mask, a deadlock, an invalid launch shape, kernel parameters over the limit)
// is a launch error here, reported by the next C10_CUDA_KERNEL_LAUNCH_CHECK.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

// What the kernel body reads as threadIdx & co.: this OS thread's coordinates.
extern thread_local uint3 emu_thread_idx;
extern thread_local uint3 emu_block_idx;
extern thread_local dim3 emu_block_dim;
extern thread_local dim3 emu_grid_dim;
#define threadIdx emu_thread_idx
#define blockIdx emu_block_idx
#define blockDim emu_block_dim
#define gridDim emu_grid_dim

namespace emu {

// Largest parameter block a kernel may take: 4,096 bytes (every GPU), or 32,764 bytes (Volta and newer
// on CUDA 12.1+), as the emulated device is built.
#ifndef EMU_MAX_PARAM_BYTES
#define EMU_MAX_PARAM_BYTES 4096
#endif

enum class WarpOp { kShflDown, kShflUp, kShflXor, kShfl, kBallot, kSyncwarp };

// One lane's part of a warp collective: value in (up to 8 bytes), value out.
uint64_t warp_collective(const char* file, int line, WarpOp op, unsigned mask, uint64_t value, int arg, int width);
void syncthreads(const char* file, int line);
void launch(const char* kernel, const char* file, int line, dim3 grid, dim3 block, size_t shared_bytes,
            size_t param_bytes, const std::function<void()>& body);
// Throws std::runtime_error with the launch error, if the last launch had one (and clears it).
void check_last_launch(const char* file, int line);

template <typename T>
T shuffle(const char* file, int line, WarpOp op, unsigned mask, T value, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled values are at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_collective(file, line, op, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// The <<<grid, block, shared_bytes, stream>>> of a launch (the stream is ignored: launches run in order).
struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  template <typename Stream = std::nullptr_t>
  LaunchConfig(dim3 grid_, dim3 block_, size_t shared_bytes_ = 0, Stream = nullptr)
      : grid(grid_), block(block_), shared_bytes(shared_bytes_) {}
};

constexpr size_t param_bytes() { return 0; }
template <typename T, typename... Rest>
constexpr size_t param_bytes(const T&, const Rest&... rest) {
  // Each parameter at its own alignment, as the CUDA ABI lays them out (a close upper bound).
  return (sizeof(T) + alignof(T) - 1) / alignof(T) * alignof(T) + param_bytes(rest...);
}

}  // namespace emu

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __shfl_down_sync(mask, value, delta, ...) \
  ::emu::shuffle(__FILE__, __LINE__, ::emu::WarpOp::kShflDown, mask, value, delta, EMU_WIDTH(__VA_ARGS__))
#define __shfl_up_sync(mask, value, delta, ...) \
  ::emu::shuffle(__FILE__, __LINE__, ::emu::WarpOp::kShflUp, mask, value, delta, EMU_WIDTH(__VA_ARGS__))
#define __shfl_xor_sync(mask, value, lane_mask, ...) \
  ::emu::shuffle(__FILE__, __LINE__, ::emu::WarpOp::kShflXor, mask, value, lane_mask, EMU_WIDTH(__VA_ARGS__))
#define __shfl_sync(mask, value, src_lane, ...) \
  ::emu::shuffle(__FILE__, __LINE__, ::emu::WarpOp::kShfl, mask, value, src_lane, EMU_WIDTH(__VA_ARGS__))
#define __ballot_sync(mask, predicate)                                                           \
  static_cast<unsigned>(::emu::warp_collective(__FILE__, __LINE__, ::emu::WarpOp::kBallot, mask, \
                                               static_cast<uint64_t>((predicate) ? 1 : 0), 0, 32))
#define __syncwarp(...) \
  ((void)::emu::warp_collective(__FILE__, __LINE__, ::emu::WarpOp::kSyncwarp, EMU_MASK(__VA_ARGS__), 0, 0, 32))
// The optional trailing `width` (default 32) and `mask` (default all lanes).
#define EMU_WIDTH(...) (::emu::optional_int<32>(__VA_ARGS__))
#define EMU_MASK(...) (static_cast<unsigned>(::emu::optional_int<-1>(__VA_ARGS__)))

namespace emu {
template <int kDefault> constexpr int optional_int() { return kDefault; }
template <int kDefault> constexpr int optional_int(long long value) { return static_cast<int>(value); }
template <int kDefault> constexpr int optional_int(unsigned value) { return static_cast<int>(value); }
template <int kDefault> constexpr int optional_int(int value) { return value; }
}  // namespace emu
