// scale_ on CUDA: t *= factor in place; every block returns at once when found_inf is set (an overflow
// step leaves the tensors bit-identical and costs almost nothing) or when the factor is exactly 1.
#include "multi_tensor_apply.cuh"

namespace fastamp::cuda {

namespace {

struct ScaleOp {
  const float* factor;
  const float* found_inf;

  template <typename T>
  __device__ void run(T* data, int64_t count, int64_t) const {
    // Skipped on an overflow, and a factor of exactly 1 (unscale at scale 1, no clip) writes nothing.
    if ((found_inf != nullptr && *found_inf != 0.0f) || *factor == 1.0f) return;
    const Scale<T> scale{static_cast<opmath_t<T>>(*factor)};
    auto f = [&](T t) { return scale(t); };
    for_each_element<true>(data, count, f);
  }
};

}  // namespace

void launch_scale(const std::vector<DeviceTensor>& tensors, const MultiTensorPlan& plan, const float* factor,
                  const float* found_inf, cudaStream_t stream) {
  multi_tensor_apply(tensors, plan, ScaleOp{factor, found_inf}, stream);
}

}  // namespace fastamp::cuda
