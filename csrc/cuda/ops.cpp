// CUDA registration of the fastamp ops: validation (shared with the CPU), tensors turned into raw
// device pointers and a launch plan, workspaces from the caching allocator, and the launches in
// launch.h, all on the current stream of the tensors' device. Nothing here reads a device value.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>

#include "../checks.h"
#include "../flat_tensors.h"
#include "launch.h"

namespace fastamp::cuda {
namespace {

DType device_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastamp: unsupported CUDA dtype ", dtype_name(t));
  }
}

struct Prepared {
  FlatTensors flat;
  std::vector<DeviceTensor> tensors;

  explicit Prepared(at::TensorList list) : flat(list, kChunkSize, kMaxTensorsPerLaunch, kMaxBlocksPerLaunch) {
    tensors.reserve(flat.dense.size());
    for (const at::Tensor& t : flat.dense) tensors.push_back({t.data_ptr(), t.numel(), device_dtype(t.scalar_type())});
  }
};

cudaStream_t stream_of(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }

float* float_ptr(const at::Tensor& t) { return t.data_ptr<float>(); }
float* optional_float_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// Runs stage one (`launch_stage_one(prepared, partials)`) and the fixed-order second stage.
template <typename StageOne>
std::tuple<at::Tensor, at::Tensor> norms(const Prepared& prepared, const at::Device& device, bool per_tensor,
                                         const StageOne& launch_stage_one, const ClipFold* clip = nullptr) {
  const cudaStream_t stream = stream_of(device);
  const auto float_options = at::TensorOptions().dtype(at::kFloat).device(device);
  const int64_t n = static_cast<int64_t>(prepared.tensors.size());
  at::Tensor partials = at::empty({prepared.flat.plan.total_blocks}, float_options);
  launch_stage_one(partials.data_ptr<float>());
  at::Tensor total = at::empty({}, float_options);
  at::Tensor per = at::empty({per_tensor ? n : 0}, float_options);
  launch_finish_norms(partials.data_ptr<float>(), prepared.flat.plan, total.data_ptr<float>(),
                      per_tensor ? per.data_ptr<float>() : nullptr, clip, stream);
  return {total, per};
}

void unscale_check_op(at::TensorList grads, at::Tensor& found_inf, const at::Tensor& inv_scale) {
  validate_unscale_check("unscale_check_", grads, found_inf, inv_scale);
  const c10::cuda::CUDAGuard guard(found_inf.device());
  Prepared prepared(grads);
  launch_unscale_check(prepared.tensors, prepared.flat.plan, float_ptr(found_inf), float_ptr(inv_scale),
                       stream_of(found_inf.device()));
  prepared.flat.write_back(grads);
}

std::tuple<at::Tensor, at::Tensor> grad_norm_op(at::TensorList grads, const std::optional<at::Tensor>& inv_scale,
                                                const std::optional<at::Tensor>& found_inf, bool per_tensor) {
  validate_grad_norm("grad_norm", grads, inv_scale, found_inf);
  const at::Device device =
      grads.empty() ? (inv_scale.has_value() ? inv_scale->device() : found_inf->device()) : grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  if (grads.empty()) return zero_norms(device);
  Prepared prepared(grads);
  return norms(prepared, device, per_tensor, [&](float* partials) {
    launch_sum_squares(prepared.tensors, prepared.flat.plan, optional_float_ptr(inv_scale),
                       optional_float_ptr(found_inf), partials, stream_of(device));
  });
}

std::tuple<at::Tensor, at::Tensor> unscale_check_norm_op(at::TensorList grads, at::Tensor& found_inf,
                                                         const at::Tensor& inv_scale, bool per_tensor) {
  validate_unscale_check("unscale_check_norm_", grads, found_inf, inv_scale);
  const at::Device device = found_inf.device();
  const c10::cuda::CUDAGuard guard(device);
  if (grads.empty()) return zero_norms(device);
  Prepared prepared(grads);
  auto result = norms(prepared, device, per_tensor, [&](float* partials) {
    launch_unscale_sum_squares(prepared.tensors, prepared.flat.plan, float_ptr(found_inf), float_ptr(inv_scale),
                               partials, stream_of(device));
  });
  prepared.flat.write_back(grads);
  return result;
}

at::Tensor clip_coef_op(const at::Tensor& total_norm, double max_norm, double eps) {
  validate_clip_coef("clip_coef", total_norm, max_norm, eps);
  const c10::cuda::CUDAGuard guard(total_norm.device());
  at::Tensor coef = at::empty({}, total_norm.options());
  launch_clip_coef(total_norm.data_ptr(), coef.data_ptr(), total_norm.scalar_type() == at::kDouble, max_norm, eps,
                   stream_of(total_norm.device()));
  return coef;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_norm_op(at::TensorList grads, double max_norm,
                                                                        const std::optional<at::Tensor>& inv_scale,
                                                                        const std::optional<at::Tensor>& found_inf,
                                                                        bool per_tensor, double eps) {
  validate_clip_norm("clip_norm", grads, max_norm, inv_scale, found_inf, eps);
  const at::Device device =
      grads.empty() ? (inv_scale.has_value() ? inv_scale->device() : found_inf->device()) : grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto float_options = at::TensorOptions().dtype(at::kFloat).device(device);
  if (grads.empty()) {
    auto [total, per] = zero_norms(device);
    at::Tensor coef = clip_coef_op(total, max_norm, eps);
    return {total, per, coef, inv_scale.has_value() ? at::mul(inv_scale->reshape({}), coef) : coef.clone()};
  }
  Prepared prepared(grads);
  at::Tensor coef = at::empty({}, float_options);
  at::Tensor factor = at::empty({}, float_options);
  const ClipFold clip{max_norm, eps, optional_float_ptr(inv_scale), float_ptr(coef), float_ptr(factor)};
  auto [total, per] = norms(
      prepared, device, per_tensor,
      [&](float* partials) {
        launch_sum_squares(prepared.tensors, prepared.flat.plan, optional_float_ptr(inv_scale),
                           optional_float_ptr(found_inf), partials, stream_of(device));
      },
      &clip);
  return {total, per, coef, factor};
}

void scale_op(at::TensorList tensors, const at::Tensor& factor, const std::optional<at::Tensor>& found_inf) {
  validate_scale("scale_", tensors, factor, found_inf);
  const c10::cuda::CUDAGuard guard(factor.device());
  Prepared prepared(tensors);
  launch_scale(prepared.tensors, prepared.flat.plan, float_ptr(factor), optional_float_ptr(found_inf),
               stream_of(factor.device()));
  prepared.flat.write_back(tensors);
}

void update_scale_op(at::Tensor& scale, at::Tensor& growth_tracker, const at::Tensor& found_inf, double growth_factor,
                     double backoff_factor, int64_t growth_interval, int64_t hysteresis,
                     const std::optional<at::Tensor>& hysteresis_tracker, double min_scale, double max_scale) {
  validate_update_scale("update_scale_", scale, growth_tracker, found_inf, growth_factor, backoff_factor,
                        growth_interval, hysteresis, hysteresis_tracker, min_scale, max_scale);
  const c10::cuda::CUDAGuard guard(scale.device());
  launch_update_scale(ScaleUpdate{float_ptr(scale), growth_tracker.data_ptr<int32_t>(),
                                  hysteresis_tracker.has_value() ? hysteresis_tracker->data_ptr<int32_t>() : nullptr,
                                  float_ptr(found_inf), growth_factor, backoff_factor, growth_interval, hysteresis,
                                  min_scale, max_scale},
                      stream_of(scale.device()));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastamp, CUDA, m) {
  m.impl("unscale_check_", &unscale_check_op);
  m.impl("grad_norm", &grad_norm_op);
  m.impl("unscale_check_norm_", &unscale_check_norm_op);
  m.impl("clip_coef", &clip_coef_op);
  m.impl("clip_norm", &clip_norm_op);
  m.impl("scale_", &scale_op);
  m.impl("update_scale_", &update_scale_op);
}

}  // namespace fastamp::cuda

// The installed driver's CUDA version (e.g. 12010 for 12.1), 0 without a driver. Read when the module
// loads: kernels built with the 32 KB parameter layout need 12.1 (R530) or newer, and on an older
// driver every launch would be rejected. cudaDriverGetVersion creates no context.
extern "C" int fastamp_cuda_driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return version;
}
