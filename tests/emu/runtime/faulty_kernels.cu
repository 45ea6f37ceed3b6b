// Kernels for the emulator's own tests (tests/emu/test_runtime.py): one correct kernel that records
// what each warp intrinsic returns (checked against CUDA's rules, computed by hand in the test), and one
// kernel per misbehaviour the runtime must report as a launch error instead of running on.
#include <cstdint>
#include <string>

#include <c10/cuda/CUDAException.h>

namespace {

constexpr unsigned kFull = 0xffffffffu;

// out[5 * t + k]: shfl_down(1), shfl_up(2, width 8), shfl_xor(5), shfl(src 3, width 16), ballot(odd lanes).
__global__ void warp_rules_kernel(int* out) {
  const int t = threadIdx.x;
  const int lane = t % 32;
  out[5 * t + 0] = __shfl_down_sync(kFull, t, 1);
  out[5 * t + 1] = __shfl_up_sync(kFull, t, 2, 8);
  out[5 * t + 2] = __shfl_xor_sync(kFull, t, 5);
  out[5 * t + 3] = __shfl_sync(kFull, t, 3, 16);
  out[5 * t + 4] = static_cast<int>(__ballot_sync(kFull, lane % 2 == 1));
  __syncwarp();
}

// Shared memory is one per block, and __syncthreads orders it: each thread reads its neighbour's write.
__global__ void shared_rotation_kernel(int* out) {
  __shared__ int slots[1024];
  slots[threadIdx.x] = static_cast<int>(blockIdx.x * 1000 + threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

__global__ void divergent_syncthreads_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_before_shuffle_kernel(int* out) {
  if (threadIdx.x == 3) return;  // one lane leaves; the others shuffle with a full mask
  out[threadIdx.x] = __shfl_down_sync(kFull, static_cast<int>(threadIdx.x), 1);
}

__global__ void exit_while_warp_waits_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = __shfl_down_sync(kFull, lane, 1);  // lanes 16-31 return instead
}

__global__ void out_of_mask_read_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, lane, 1);  // lane 15 reads lane 16
}

__global__ void mask_without_own_lane_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, static_cast<int>(threadIdx.x), 0);  // only lane 0 is in the mask
}

__global__ void deadlock_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int v = lane;
  if (lane != 5) v = __shfl_sync(kFull, v, 0);  // waits for lane 5, which waits at the barrier
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void exit_while_block_waits_kernel(int* out) {
  if (threadIdx.x == 0) __syncthreads();
  out[threadIdx.x] = 1;
}

struct Oversized {
  char bytes[5000];
};

__global__ void oversized_parameters_kernel(const Oversized params, int* out) { out[threadIdx.x] = params.bytes[0]; }

__global__ void plain_kernel(int* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = 1; }

thread_local std::string g_result;

template <typename F>
const char* checked(F&& launch) {
  g_result.clear();
  try {
    launch();
  } catch (const std::exception& e) {
    g_result = e.what();
  }
  return g_result.c_str();
}

}  // namespace

// Each returns "" when the launch ran cleanly, else the launch check's error text.
extern "C" const char* faulty_launch(const char* name, int* out, int threads, int blocks) {
  const std::string n(name);
  return checked([&] {
    if (n == "warp_rules") {
      warp_rules_kernel<<<blocks, threads>>>(out);
    } else if (n == "shared_rotation") {
      shared_rotation_kernel<<<blocks, threads>>>(out);
    } else if (n == "divergent_syncthreads") {
      divergent_syncthreads_kernel<<<blocks, threads>>>(out);
    } else if (n == "exit_before_shuffle") {
      exit_before_shuffle_kernel<<<blocks, threads>>>(out);
    } else if (n == "exit_while_warp_waits") {
      exit_while_warp_waits_kernel<<<blocks, threads>>>(out);
    } else if (n == "out_of_mask_read") {
      out_of_mask_read_kernel<<<blocks, threads>>>(out);
    } else if (n == "mask_without_own_lane") {
      mask_without_own_lane_kernel<<<blocks, threads>>>(out);
    } else if (n == "deadlock") {
      deadlock_kernel<<<blocks, threads>>>(out);
    } else if (n == "exit_while_block_waits") {
      exit_while_block_waits_kernel<<<blocks, threads>>>(out);
    } else if (n == "oversized_parameters") {
      Oversized params{};
      oversized_parameters_kernel<<<blocks, threads>>>(params, out);
    } else {
      plain_kernel<<<blocks, threads>>>(out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
