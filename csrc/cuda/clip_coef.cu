// clip_coef on CUDA, one thread: min(1, max_norm / (total_norm + eps)) with the math of csrc/functors.h,
// so that it stays on the device next to the norm it reads.
#include "multi_tensor_apply.cuh"

namespace fastamp::cuda {

namespace {

template <typename A>
__global__ void clip_coef_kernel(const A* total_norm, A* coef, double max_norm, double eps) {
  *coef = clip_coefficient<A>(*total_norm, max_norm, eps);
}

}  // namespace

void launch_clip_coef(const void* total_norm, void* coef, bool fp64, double max_norm, double eps, cudaStream_t stream) {
  if (fp64) {
    clip_coef_kernel<double>
        <<<1, 1, 0, stream>>>(static_cast<const double*>(total_norm), static_cast<double*>(coef), max_norm, eps);
  } else {
    clip_coef_kernel<float>
        <<<1, 1, 0, stream>>>(static_cast<const float*>(total_norm), static_cast<float*>(coef), max_norm, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastamp::cuda
