// scale_: t *= factor in place, skipped entirely when found_inf is set (the step will be skipped, so
// the tensors must stay bit-identical) or when the factor is exactly 1.
#include "kernels.h"
#include "multi_tensor_cpu.h"
#include "simd.h"

namespace fastamp::cpu {

namespace {

struct ScaleOp {
  static constexpr bool kWrites = true;
  static constexpr bool kReverse = true;  // follows the norm pass over the same tensors
  double factor;

  template <typename T>
  ChunkResult run(T* data, int64_t count) const {
    const Scale<T> scale{static_cast<opmath_t<T>>(factor)};
    if constexpr (!std::is_same_v<T, double>) {
      simd::dispatch_scale(data, count, scale.factor);
    } else {
      for (int64_t i = 0; i < count; ++i) data[i] = scale(data[i]);
    }
    return {};
  }
};

}  // namespace

void scale_(at::TensorList tensors, const at::Tensor& factor, const std::optional<at::Tensor>& found_inf) {
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  const double f = factor.item<double>();
  if (f == 1.0) return;  // nothing to multiply: no pass over the tensors, and every bit (NaN payloads) kept
  multi_tensor_apply(tensors, ScaleOp{f});
}

}  // namespace fastamp::cpu
