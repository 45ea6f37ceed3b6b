// clip_coef: min(1, max_norm / (total_norm + eps)) with the math of csrc/functors.h (that of the CUDA
// kernel), in the norm's precision.
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

}  // namespace fastamp::cpu
