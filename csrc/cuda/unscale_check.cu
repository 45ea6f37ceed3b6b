// unscale_check_ on CUDA: g *= inv_scale in place, found_inf = 1 if any g was non-finite. 1R 1W.
#include "multi_tensor_apply.cuh"

namespace fastamp::cuda {

namespace {

struct UnscaleCheckOp {
  float* found_inf;
  const float* inv_scale;

  template <typename T>
  __device__ void run(T* data, int64_t count, int64_t) const {
    using A = opmath_t<T>;
    const Unscale<T> unscale{static_cast<A>(*inv_scale)};
    A probe = A(0);
    auto f = [&](T g) {
      probe += nonfinite_probe(static_cast<A>(g));
      return unscale(g);
    };
    for_each_element<true>(data, count, f);
    // Several threads may store the same 1.0: benign, as in PyTorch's own kernel.
    if (!is_finite_value(probe)) *found_inf = 1.0f;
  }
};

}  // namespace

void launch_unscale_check(const std::vector<DeviceTensor>& tensors, const MultiTensorPlan& plan, float* found_inf,
                          const float* inv_scale, cudaStream_t stream) {
  multi_tensor_apply(tensors, plan, UnscaleCheckOp{found_inf, inv_scale}, stream);
}

}  // namespace fastamp::cuda
