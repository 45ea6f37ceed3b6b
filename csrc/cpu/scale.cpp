// scale_: t *= factor in place, skipped entirely when found_inf is set (the step will be skipped, so
// the tensors must stay bit-identical).
#include "kernels.h"
#include "multi_tensor_cpu.h"
#include "simd.h"

namespace fastamp::cpu {

namespace {

template <typename T>
void scale_chunk(T* data, int64_t count, const Scale<T>& scale) {
  if constexpr (!std::is_same_v<T, double>) {
    simd::dispatch_scale(data, count, scale.factor);
  } else {
    for (int64_t i = 0; i < count; ++i) data[i] = scale(data[i]);
  }
}

}  // namespace

void scale_(at::TensorList tensors, const at::Tensor& factor, const std::optional<at::Tensor>& found_inf) {
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  const double f = factor.item<double>();
  FlatTensors flat(tensors, kChunkSize, INT64_MAX, INT64_MAX);
  parallel_for_each_chunk(
      flat,
      [&](int64_t t, int64_t first, int64_t count, int64_t) {
        const at::Tensor& x = flat.dense[t];
        dispatch_grad_dtype(x.scalar_type(), [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          const Scale<T> scale{static_cast<opmath_t<T>>(f)};
          scale_chunk(static_cast<T*>(x.data_ptr()) + first, count, scale);
        });
      },
      /*reverse=*/true);
  flat.write_back(tensors);
}

}  // namespace fastamp::cpu
