// CPU kernels of the fastamp ops. Inputs are validated by the registration in ops.cpp.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastamp::cpu {

void unscale_check_(at::TensorList grads, at::Tensor& found_inf, const at::Tensor& inv_scale);

std::tuple<at::Tensor, at::Tensor> grad_norm(at::TensorList grads, const std::optional<at::Tensor>& inv_scale,
                                             const std::optional<at::Tensor>& found_inf, bool per_tensor);

std::tuple<at::Tensor, at::Tensor> unscale_check_norm_(at::TensorList grads, at::Tensor& found_inf,
                                                       const at::Tensor& inv_scale, bool per_tensor);

at::Tensor clip_coef(const at::Tensor& total_norm, double max_norm, double eps);

void scale_(at::TensorList tensors, const at::Tensor& factor, const std::optional<at::Tensor>& found_inf);

void update_scale_(at::Tensor& scale, at::Tensor& growth_tracker, const at::Tensor& found_inf, double growth_factor,
                   double backoff_factor, int64_t growth_interval, int64_t hysteresis,
                   const std::optional<at::Tensor>& hysteresis_tracker, double min_scale, double max_scale);

}  // namespace fastamp::cpu
