// CPU registration of the fastamp ops. The schemas are defined once, in fastamp/ops/_library.py; this
// file validates the inputs (before anything is modified) and calls the kernels.
#include <torch/library.h>

#include <ATen/ops/mul.h>

#include "../checks.h"
#include "kernels.h"

namespace fastamp::cpu {
namespace {

void unscale_check_op(at::TensorList grads, at::Tensor& found_inf, const at::Tensor& inv_scale) {
  validate_unscale_check("unscale_check_", grads, found_inf, inv_scale);
  unscale_check_(grads, found_inf, inv_scale);
}

std::tuple<at::Tensor, at::Tensor> grad_norm_op(at::TensorList grads, const std::optional<at::Tensor>& inv_scale,
                                                const std::optional<at::Tensor>& found_inf, bool per_tensor) {
  validate_grad_norm("grad_norm", grads, inv_scale, found_inf);
  return grad_norm(grads, inv_scale, found_inf, per_tensor);
}

std::tuple<at::Tensor, at::Tensor> unscale_check_norm_op(at::TensorList grads, at::Tensor& found_inf,
                                                         const at::Tensor& inv_scale, bool per_tensor) {
  validate_unscale_check("unscale_check_norm_", grads, found_inf, inv_scale);
  return unscale_check_norm_(grads, found_inf, inv_scale, per_tensor);
}

at::Tensor clip_coef_op(const at::Tensor& total_norm, double max_norm, double eps) {
  validate_clip_coef("clip_coef", total_norm, max_norm, eps);
  return clip_coef(total_norm, max_norm, eps);
}

// The CPU has no launches to save: grad_norm, then the coefficient and the factor from its total.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_norm_op(at::TensorList grads, double max_norm,
                                                                        const std::optional<at::Tensor>& inv_scale,
                                                                        const std::optional<at::Tensor>& found_inf,
                                                                        bool per_tensor, double eps) {
  validate_clip_norm("clip_norm", grads, max_norm, inv_scale, found_inf, eps);
  auto [total, per] = grad_norm(grads, inv_scale, found_inf, per_tensor);
  at::Tensor coef = clip_coef(total, max_norm, eps).to(at::kFloat);
  at::Tensor factor = inv_scale.has_value() ? at::mul(inv_scale->reshape({}), coef) : coef.clone();
  return {total, per, coef, factor};
}

void scale_op(at::TensorList tensors, const at::Tensor& factor, const std::optional<at::Tensor>& found_inf) {
  validate_scale("scale_", tensors, factor, found_inf);
  scale_(tensors, factor, found_inf);
}

void update_scale_op(at::Tensor& scale, at::Tensor& growth_tracker, const at::Tensor& found_inf, double growth_factor,
                     double backoff_factor, int64_t growth_interval, int64_t hysteresis,
                     const std::optional<at::Tensor>& hysteresis_tracker, double min_scale, double max_scale) {
  validate_update_scale("update_scale_", scale, growth_tracker, found_inf, growth_factor, backoff_factor,
                        growth_interval, hysteresis, hysteresis_tracker, min_scale, max_scale);
  update_scale_(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval, hysteresis,
                hysteresis_tracker, min_scale, max_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastamp, CPU, m) {
  m.impl("unscale_check_", &unscale_check_op);
  m.impl("grad_norm", &grad_norm_op);
  m.impl("unscale_check_norm_", &unscale_check_norm_op);
  m.impl("clip_coef", &clip_coef_op);
  m.impl("clip_norm", &clip_norm_op);
  m.impl("scale_", &scale_op);
  m.impl("update_scale_", &update_scale_op);
}

}  // namespace fastamp::cpu
