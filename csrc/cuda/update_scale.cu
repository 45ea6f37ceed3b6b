// update_scale_ on CUDA, one thread: the math is csrc/functors.h, shared with the CPU, so the
// device-side loss-scale update is bit-identical to the CPU's (and to torch._amp_update_scale_).
#include "multi_tensor_apply.cuh"

namespace fastamp::cuda {

namespace {

__global__ void update_scale_kernel(const ScaleUpdate update) { update_scale_step(update); }

}  // namespace

void launch_update_scale(const ScaleUpdate& update, cudaStream_t stream) {
  update_scale_kernel<<<1, 1, 0, stream>>>(update);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastamp::cuda
