// update_scale_: one dynamic loss-scale update (csrc/functors.h's update_scale_step, as on CUDA).
#include "kernels.h"
#include "multi_tensor_cpu.h"

namespace fastamp::cpu {

void update_scale_(at::Tensor& scale, at::Tensor& growth_tracker, const at::Tensor& found_inf, double growth_factor,
                   double backoff_factor, int64_t growth_interval, int64_t hysteresis,
                   const std::optional<at::Tensor>& hysteresis_tracker, double min_scale, double max_scale) {
  update_scale_step(ScaleUpdate{scale.data_ptr<float>(), growth_tracker.data_ptr<int32_t>(),
                                hysteresis_tracker.has_value() ? hysteresis_tracker->data_ptr<int32_t>() : nullptr,
                                found_inf.data_ptr<float>(), growth_factor, backoff_factor, growth_interval, hysteresis,
                                min_scale, max_scale});
}

}  // namespace fastamp::cpu
