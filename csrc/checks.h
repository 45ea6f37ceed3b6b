// Input validation shared by the CPU and CUDA registrations. Every op validates all of its inputs
// before touching any of them, so a bad call raises and changes nothing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastamp {

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kBool: return "torch.bool";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string device_name(const at::Tensor& t) { return t.device().str(); }

inline bool is_grad_dtype(at::ScalarType t, bool allow_double) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (allow_double && t == at::kDouble);
}

// Two entries of one written list must not share memory: each shared element would be written twice
// ([t, t] unscaled to a quarter). Exact for the same view given twice and for dense tensors (whose span
// is their memory); strided views with gaps may interleave without sharing an element, and are let be.
inline void check_no_aliasing(const char* op, const char* name, at::TensorList tensors) {
  struct Span {
    uintptr_t begin, end;
    size_t index;
  };
  std::vector<Span> spans;
  std::map<std::tuple<uintptr_t, std::vector<int64_t>, std::vector<int64_t>>, size_t> views;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const auto seen = views.emplace(std::make_tuple(begin, t.sizes().vec(), t.strides().vec()), i);
    TORCH_CHECK(seen.second, "fastamp.", op, ": ", name, "[", seen.first->second, "] and ", name, "[", i,
                "] are the same memory; each element would be written twice. Pass each tensor once");
    if (t.is_non_overlapping_and_dense()) spans.push_back({begin, begin + t.numel() * t.element_size(), i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t k = 1; k < spans.size(); ++k) {
    TORCH_CHECK(spans[k].begin >= spans[k - 1].end, "fastamp.", op, ": ", name, "[",
                std::min(spans[k - 1].index, spans[k].index), "] and ", name, "[",
                std::max(spans[k - 1].index, spans[k].index),
                "] overlap in memory; each shared element would be written twice. Pass each tensor once");
    if (spans[k].end < spans[k - 1].end) spans[k] = spans[k - 1];
  }
}

// A list of gradients (or any tensors an op reads or scales): floating point, on `device`, and, when the
// op writes them, free of internal overlap (an expanded tensor cannot be written element by element).
inline void check_tensor_list(const char* op, const char* name, at::TensorList tensors, const at::Device& device,
                              bool allow_double, bool written) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), "fastamp.", op, ": ", name, "[", i, "] is undefined (None)");
    TORCH_CHECK(is_grad_dtype(t.scalar_type(), allow_double), "fastamp.", op, ": ", name, "[", i, "] has dtype ",
                dtype_name(t.scalar_type()), "; expected torch.float32, torch.float16, torch.bfloat16",
                allow_double ? " or torch.float64" : " (torch.float64 is supported on CPU only)");
    TORCH_CHECK(t.device() == device, "fastamp.", op, ": ", name, "[", i, "] is on ", device_name(t),
                " but the op runs on ", device.str(), "; move every tensor of the call to one device");
    if (written) {
      TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "fastamp.", op, ": ", name, "[", i,
                  "] has elements that share memory (e.g. an expand()ed tensor) and cannot be written in place");
    }
  }
  if (written) check_no_aliasing(op, name, tensors);
}

// A scalar operand such as found_inf, inv_scale or a scale factor: one element, floating point of an
// allowed dtype, on the op's device.
inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t, const at::Device& device,
                                bool allow_double) {
  TORCH_CHECK(t.defined(), "fastamp.", op, ": ", name, " is undefined (None)");
  TORCH_CHECK(t.numel() == 1, "fastamp.", op, ": ", name, " must be a 1-element tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || (allow_double && t.scalar_type() == at::kDouble), "fastamp.", op, ": ",
              name, " must be a torch.float32", allow_double ? " or torch.float64" : "", " tensor, got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == device, "fastamp.", op, ": ", name, " is on ", device_name(t), " but the op runs on ",
              device.str(), "; create it on the gradients' device");
}

inline void check_int_tensor(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined(), "fastamp.", op, ": ", name, " is undefined (None)");
  TORCH_CHECK(t.numel() == 1, "fastamp.", op, ": ", name, " must be a 1-element tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, "fastamp.", op, ": ", name, " must be a torch.int32 tensor, got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == device, "fastamp.", op, ": ", name, " is on ", device_name(t), " but the op runs on ",
              device.str());
}

// The device an op over `tensors` runs on: that of the first tensor, else of the fallback scalar.
inline at::Device op_device(at::TensorList tensors, const at::Tensor& fallback) {
  if (!tensors.empty() && tensors[0].defined()) return tensors[0].device();
  TORCH_CHECK(fallback.defined(), "fastamp: cannot infer the device of an empty tensor list");
  return fallback.device();
}

// Result dtype of a norm: fp64 when any input is fp64 (accumulated in fp64), else fp32.
inline at::ScalarType norm_dtype(at::TensorList tensors) {
  for (const auto& t : tensors)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

// ---- Per-op validation, shared by the CPU and CUDA registrations. ----
// fp64 tensors are accepted on CPU only.

inline void validate_unscale_check(const char* op, at::TensorList grads, const at::Tensor& found_inf,
                                   const at::Tensor& inv_scale) {
  const at::Device device = found_inf.device();
  const bool allow_double = device.is_cpu();
  check_scalar_tensor(op, "found_inf", found_inf, device, false);
  check_scalar_tensor(op, "inv_scale", inv_scale, device, false);
  check_tensor_list(op, "grads", grads, device, allow_double, /*written=*/true);
}

inline void validate_grad_norm(const char* op, at::TensorList grads, const std::optional<at::Tensor>& inv_scale,
                               const std::optional<at::Tensor>& found_inf) {
  // An empty list runs where its scalars are; with none, the dispatcher chose the CompositeExplicitAutograd
  // kernel (fastamp/ops/_library.py), never this one.
  const at::Tensor& scalar = inv_scale.has_value() ? *inv_scale : found_inf.has_value() ? *found_inf : at::Tensor();
  const at::Device device = op_device(grads, scalar);
  const bool allow_double = device.is_cpu();
  check_tensor_list(op, "grads", grads, device, allow_double, /*written=*/false);
  if (inv_scale.has_value()) check_scalar_tensor(op, "inv_scale", *inv_scale, device, false);
  if (found_inf.has_value()) check_scalar_tensor(op, "found_inf", *found_inf, device, false);
}

inline void check_clip_args(const char* op, double max_norm, double eps) {
  TORCH_CHECK(max_norm >= 0.0, "fastamp.", op, ": max_norm must be non-negative, got ", max_norm);
  TORCH_CHECK(eps >= 0.0, "fastamp.", op, ": eps must be non-negative, got ", eps);
}

inline void validate_clip_coef(const char* op, const at::Tensor& total_norm, double max_norm, double eps) {
  check_scalar_tensor(op, "total_norm", total_norm, total_norm.device(), true);
  check_clip_args(op, max_norm, eps);
}

inline void validate_clip_norm(const char* op, at::TensorList grads, double max_norm,
                               const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf,
                               double eps) {
  validate_grad_norm(op, grads, inv_scale, found_inf);
  check_clip_args(op, max_norm, eps);
}

inline void validate_scale(const char* op, at::TensorList tensors, const at::Tensor& factor,
                           const std::optional<at::Tensor>& found_inf) {
  const at::Device device = factor.device();
  check_scalar_tensor(op, "factor", factor, device, device.is_cpu());
  if (found_inf.has_value()) check_scalar_tensor(op, "found_inf", *found_inf, device, false);
  check_tensor_list(op, "tensors", tensors, device, device.is_cpu(), /*written=*/true);
}

inline void validate_update_scale(const char* op, const at::Tensor& scale, const at::Tensor& growth_tracker,
                                  const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                                  int64_t growth_interval, int64_t hysteresis,
                                  const std::optional<at::Tensor>& hysteresis_tracker, double min_scale,
                                  double max_scale) {
  const at::Device device = scale.device();
  check_scalar_tensor(op, "scale", scale, device, false);
  check_int_tensor(op, "growth_tracker", growth_tracker, device);
  check_scalar_tensor(op, "found_inf", found_inf, device, false);
  TORCH_CHECK(hysteresis >= 1, "fastamp.", op, ": hysteresis must be >= 1, got ", hysteresis);
  TORCH_CHECK(hysteresis == 1 || hysteresis_tracker.has_value(), "fastamp.", op, ": hysteresis=", hysteresis,
              " needs a hysteresis_tracker (a 1-element torch.int32 tensor)");
  if (hysteresis_tracker.has_value()) check_int_tensor(op, "hysteresis_tracker", *hysteresis_tracker, device);
  TORCH_CHECK(min_scale >= 0.0 && min_scale <= max_scale, "fastamp.", op,
              ": need 0 <= min_scale <= max_scale, got min_scale=", min_scale, ", max_scale=", max_scale);
}

}  // namespace fastamp
