// The scalar ops: clip_coef and update_scale_. Tiny, but kept as kernels so that they run where the
// data lives (on CUDA, on the device) with the same math as csrc/functors.h.
#include <ATen/ops/empty.h>

#include "kernels.h"
#include "multi_tensor_cpu.h"

namespace fastamp::cpu {

at::Tensor clip_coef(const at::Tensor& total_norm, double max_norm, double eps) {
  at::Tensor coef = at::empty({}, total_norm.options());
  if (total_norm.scalar_type() == at::kDouble) {
    *coef.data_ptr<double>() = clip_coefficient<double>(total_norm.item<double>(), max_norm, eps);
  } else {
    *coef.data_ptr<float>() = clip_coefficient<float>(total_norm.item<float>(), max_norm, eps);
  }
  return coef;
}

void update_scale_(at::Tensor& scale, at::Tensor& growth_tracker, const at::Tensor& found_inf, double growth_factor,
                   double backoff_factor, int64_t growth_interval, int64_t hysteresis,
                   const std::optional<at::Tensor>& hysteresis_tracker, double min_scale, double max_scale) {
  update_scale_step(ScaleUpdate{scale.data_ptr<float>(), growth_tracker.data_ptr<int32_t>(),
                                hysteresis_tracker.has_value() ? hysteresis_tracker->data_ptr<int32_t>() : nullptr,
                                found_inf.data_ptr<float>(), growth_factor, backoff_factor, growth_interval, hysteresis,
                                min_scale, max_scale});
}

}  // namespace fastamp::cpu
