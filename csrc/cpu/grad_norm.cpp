// grad_norm (read-only) and unscale_check_norm_ (in place): the L2 norm of the unscaled gradients,
// total and per tensor, with the non-finite check folded into the same pass.
#include <atomic>
#include <cmath>
#include <vector>

#include <ATen/ops/empty.h>

#include "../checks.h"
#include "kernels.h"
#include "multi_tensor_cpu.h"
#include "simd.h"

namespace fastamp::cpu {

namespace {

// Sum of squares of g * inv_scale over one chunk.
template <typename T>
double sum_squares_chunk(const T* data, int64_t count, opmath_t<T> inv_scale) {
  if constexpr (std::is_same_v<T, double>) {
    return sum_squares_cascade<double>(count, [&](int64_t i, int) { return data[i] * inv_scale; });
  } else {
    return simd::dispatch_sum_squares(data, count, inv_scale);
  }
}

// Unscales one chunk in place and returns the sum of squares of the values as written (rounded to T);
// sets *nonfinite when any original element was non-finite.
template <typename T>
double unscale_sum_squares_chunk(T* data, int64_t count, const Unscale<T>& unscale, bool* nonfinite) {
  using A = opmath_t<T>;
  if constexpr (std::is_same_v<T, double>) {
    A probes[kLanes] = {};
    const double sum = sum_squares_cascade<A>(count, [&](int64_t i, int lane) {
      const T g = data[i];
      probes[lane] += nonfinite_probe(static_cast<A>(g));
      const T u = unscale(g);
      data[i] = u;
      return static_cast<A>(u);
    });
    *nonfinite = !is_finite_value(sum_lanes(probes));
    return sum;
  } else {
    double sum = 0.0;
    *nonfinite = simd::dispatch_unscale<T, true>(data, count, unscale.inv_scale, &sum);
    return sum;
  }
}

// Second stage, in fixed order: per-tensor sums of the block partials, then their total.
std::tuple<at::Tensor, at::Tensor> finish_norms(const FlatTensors& flat, const std::vector<double>& partials,
                                                at::ScalarType out_dtype, bool per_tensor) {
  const auto& plan = flat.plan;
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
  const bool check = found_inf.has_value();
  FlatTensors flat(grads, kChunkSize, INT64_MAX, INT64_MAX);
  std::vector<double> partials(flat.plan.total_blocks, 0.0);
  std::atomic<bool> any_nonfinite{false};
  parallel_for_each_chunk(flat, [&](int64_t t, int64_t first, int64_t count, int64_t block) {
    const at::Tensor& g = flat.dense[t];
    dispatch_grad_dtype(g.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* data = static_cast<const T*>(g.data_ptr()) + first;
      const auto sum = sum_squares_chunk(data, count, static_cast<opmath_t<T>>(inv));
      partials[block] = sum;
      // A finite sum proves every element finite; only a non-finite one needs a closer look.
      if (check && !is_finite_value(sum) && chunk_has_nonfinite(data, count))
        any_nonfinite.store(true, std::memory_order_relaxed);
    });
  });
  if (any_nonfinite.load()) found_inf->fill_(1.0f);
  return finish_norms(flat, partials, norm_dtype(grads), per_tensor);
}

std::tuple<at::Tensor, at::Tensor> unscale_check_norm_(at::TensorList grads, at::Tensor& found_inf,
                                                       const at::Tensor& inv_scale, bool per_tensor) {
  const float inv = inv_scale.item<float>();
  FlatTensors flat(grads, kChunkSize, INT64_MAX, INT64_MAX);
  std::vector<double> partials(flat.plan.total_blocks, 0.0);
  std::atomic<bool> any_nonfinite{false};
  parallel_for_each_chunk(flat, [&](int64_t t, int64_t first, int64_t count, int64_t block) {
    const at::Tensor& g = flat.dense[t];
    dispatch_grad_dtype(g.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const Unscale<T> unscale{static_cast<opmath_t<T>>(inv)};
      bool nonfinite = false;
      const auto sum = unscale_sum_squares_chunk(static_cast<T*>(g.data_ptr()) + first, count, unscale, &nonfinite);
      partials[block] = sum;
      if (nonfinite) any_nonfinite.store(true, std::memory_order_relaxed);
    });
  });
  flat.write_back(grads);
  if (any_nonfinite.load()) found_inf.fill_(1.0f);
  return finish_norms(flat, partials, norm_dtype(grads), per_tensor);
}

}  // namespace fastamp::cpu
