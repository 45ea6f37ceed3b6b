// unscale_check_: g *= inv_scale in place, found_inf = 1 if any g was non-finite. One read, one write.
#include "kernels.h"
#include "multi_tensor_cpu.h"
#include "simd.h"

namespace fastamp::cpu {

namespace {

struct UnscaleCheckOp {
  static constexpr bool kWrites = true;
  static constexpr bool kReverse = false;
  float inv_scale;

  template <typename T>
  ChunkResult run(T* data, int64_t count) const {
    if constexpr (!std::is_same_v<T, double>) {
      return {0.0, simd::dispatch_unscale<T, false>(data, count, inv_scale, nullptr)};
    } else {
      const Unscale<T> unscale{inv_scale};
      double probes[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= count; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          probes[l] += nonfinite_probe(data[i + l]);
          data[i + l] = unscale(data[i + l]);
        }
      }
      for (; i < count; ++i) {
        probes[0] += nonfinite_probe(data[i]);
        data[i] = unscale(data[i]);
      }
      return {0.0, !is_finite_value(sum_lanes(probes))};
    }
  }
};

}  // namespace

void unscale_check_(at::TensorList grads, at::Tensor& found_inf, const at::Tensor& inv_scale) {
  const MultiTensorResult result = multi_tensor_apply(grads, UnscaleCheckOp{inv_scale.item<float>()});
  if (result.nonfinite) found_inf.fill_(1.0f);
}

}  // namespace fastamp::cpu
