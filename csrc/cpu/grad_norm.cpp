// grad_norm (read-only) and unscale_check_norm_ (in place): the L2 norm of the unscaled gradients,
// total and per tensor, with the non-finite check folded into the same pass.
#include <cmath>
#include <vector>

#include <ATen/ops/empty.h>

#include "../checks.h"
#include "kernels.h"
#include "multi_tensor_cpu.h"
#include "simd.h"

namespace fastamp::cpu {

namespace {

// Sum of squares of g * inv_scale over each chunk; the finiteness check only where it is asked for.
struct GradNormOp {
  static constexpr bool kWrites = false;
  static constexpr bool kReverse = false;
  float inv_scale;
  bool check;

  template <typename T>
  ChunkResult run(T* data, int64_t count) const {
    const opmath_t<T> inv = static_cast<opmath_t<T>>(inv_scale);
    double sum;
    if constexpr (std::is_same_v<T, double>) {
      sum = sum_squares_cascade<double>(count, [&](int64_t i, int) { return data[i] * inv; });
    } else {
      sum = simd::dispatch_sum_squares(static_cast<const T*>(data), count, inv);
    }
    // A finite sum proves every element finite; only a non-finite one needs a closer look.
    return {sum, check && !is_finite_value(sum) && chunk_has_nonfinite(data, count)};
  }
};

// Unscales each chunk in place; the sum of squares is of the values as written (rounded to T).
struct UnscaleCheckNormOp {
  static constexpr bool kWrites = true;
  static constexpr bool kReverse = false;
  float inv_scale;

  template <typename T>
  ChunkResult run(T* data, int64_t count) const {
    using A = opmath_t<T>;
    if constexpr (std::is_same_v<T, double>) {
      const Unscale<T> unscale{static_cast<A>(inv_scale)};
      A probes[kLanes] = {};
      const double sum = sum_squares_cascade<A>(count, [&](int64_t i, int lane) {
        const T g = data[i];
        probes[lane] += nonfinite_probe(static_cast<A>(g));
        const T u = unscale(g);
        data[i] = u;
        return static_cast<A>(u);
      });
      return {sum, !is_finite_value(sum_lanes(probes))};
    } else {
      double sum = 0.0;
      const bool nonfinite = simd::dispatch_unscale<T, true>(data, count, inv_scale, &sum);
      return {sum, nonfinite};
    }
  }
};

// Second stage, in fixed order: per-tensor sums of the block partials, then their total.
std::tuple<at::Tensor, at::Tensor> finish_norms(const MultiTensorResult& result, at::ScalarType out_dtype,
                                                bool per_tensor) {
  const auto& plan = result.plan;
  const auto& partials = result.block_sums;
  const int64_t n = static_cast<int64_t>(plan.first_block.size());
  auto options = at::TensorOptions().dtype(out_dtype).device(at::kCPU);
  at::Tensor per_tensor_norms = at::empty({per_tensor ? n : 0}, options);
  double total = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    double sum = 0.0;
    for (int64_t b = plan.first_block[t]; b < plan.first_block[t] + plan.num_chunks[t]; ++b) sum += partials[b];
    total += sum;
    if (per_tensor) {
      if (out_dtype == at::kDouble) per_tensor_norms.data_ptr<double>()[t] = std::sqrt(sum);
      else per_tensor_norms.data_ptr<float>()[t] = static_cast<float>(std::sqrt(sum));
    }
  }
  at::Tensor total_norm = at::empty({}, options);
  if (out_dtype == at::kDouble) *total_norm.data_ptr<double>() = std::sqrt(total);
  else *total_norm.data_ptr<float>() = static_cast<float>(std::sqrt(total));
  return {total_norm, per_tensor_norms};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> grad_norm(at::TensorList grads, const std::optional<at::Tensor>& inv_scale,
                                             const std::optional<at::Tensor>& found_inf, bool per_tensor) {
  const float inv = inv_scale.has_value() ? inv_scale->item<float>() : 1.0f;
  const MultiTensorResult result = multi_tensor_apply(grads, GradNormOp{inv, found_inf.has_value()});
  if (result.nonfinite) found_inf->fill_(1.0f);
  return finish_norms(result, norm_dtype(grads), per_tensor);
}

std::tuple<at::Tensor, at::Tensor> unscale_check_norm_(at::TensorList grads, at::Tensor& found_inf,
                                                       const at::Tensor& inv_scale, bool per_tensor) {
  const MultiTensorResult result = multi_tensor_apply(grads, UnscaleCheckNormOp{inv_scale.item<float>()});
  if (result.nonfinite) found_inf.fill_(1.0f);
  return finish_norms(result, norm_dtype(grads), per_tensor);
}

}  // namespace fastamp::cpu
