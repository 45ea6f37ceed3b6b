// unscale_check_: g *= inv_scale in place, found_inf = 1 if any g was non-finite. One read, one write.
#include <atomic>

#include "kernels.h"
#include "multi_tensor_cpu.h"
#include "simd.h"

namespace fastamp::cpu {

namespace {

// Unscales one chunk in place; returns whether any original element was non-finite.
template <typename T>
bool unscale_chunk(T* data, int64_t count, const Unscale<T>& unscale) {
  if constexpr (!std::is_same_v<T, double>) {
    return simd::dispatch_unscale<T, false>(data, count, unscale.inv_scale, nullptr);
  } else {
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
    return !is_finite_value(sum_lanes(probes));
  }
}

}  // namespace

void unscale_check_(at::TensorList grads, at::Tensor& found_inf, const at::Tensor& inv_scale) {
  const float inv = inv_scale.item<float>();
  FlatTensors flat(grads, kChunkSize, INT64_MAX, INT64_MAX);
  std::atomic<bool> any_nonfinite{false};
  parallel_for_each_chunk(flat, [&](int64_t t, int64_t first, int64_t count, int64_t) {
    const at::Tensor& g = flat.dense[t];
    dispatch_grad_dtype(g.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const Unscale<T> unscale{static_cast<opmath_t<T>>(inv)};
      if (unscale_chunk(static_cast<T*>(g.data_ptr()) + first, count, unscale))
        any_nonfinite.store(true, std::memory_order_relaxed);
    });
  });
  flat.write_back(grads);
  if (any_nonfinite.load()) found_inf.fill_(1.0f);
}

}  // namespace fastamp::cpu
