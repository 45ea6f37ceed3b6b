// The interface between the CUDA registration (ops.cpp, host C++ with ATen) and the kernels (*.cu,
// compiled by nvcc without ATen, which keeps the CUDA build fast). Everything here is raw pointers,
// the plan and a stream: no tensor ever crosses this line and no device value is read on the host.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

#include "../functors.h"
#include "../multi_tensor_plan.h"

namespace fastamp::cuda {

using fastamp::kChunkSize;

// Launch capacity: what fits in one kernel's parameters. CUDA 12.1+ gives kernels on Volta and newer
// 32,764 bytes of parameters (setup.py defines FASTAMP_LARGE_KERNEL_PARAMS when every compiled arch
// allows it); the classic limit is 4,096 bytes.
#if FASTAMP_LARGE_KERNEL_PARAMS
constexpr int kMaxTensorsPerLaunch = 768;
constexpr int kMaxBlocksPerLaunch = 1536;
constexpr int kMaxTensorsPerNormLaunch = 2000;
#else
constexpr int kMaxTensorsPerLaunch = 96;
constexpr int kMaxBlocksPerLaunch = 192;
constexpr int kMaxTensorsPerNormLaunch = 240;
#endif

enum class DType : uint8_t { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct DeviceTensor {
  void* data;
  int64_t numel;
  DType dtype;
};

// g *= *inv_scale in place; *found_inf = 1 if any g was non-finite.
void launch_unscale_check(const std::vector<DeviceTensor>& tensors, const MultiTensorPlan& plan, float* found_inf,
                          const float* inv_scale, cudaStream_t stream);

// partials[block] = sum over the block's chunk of (g * inv_scale)^2 (inv_scale may be null). When
// found_inf is not null it is set if any g is non-finite.
void launch_sum_squares(const std::vector<DeviceTensor>& tensors, const MultiTensorPlan& plan, const float* inv_scale,
                        float* found_inf, float* partials, cudaStream_t stream);

// Unscale in place (as launch_unscale_check) and partials[block] = sum of squares of the written values.
void launch_unscale_sum_squares(const std::vector<DeviceTensor>& tensors, const MultiTensorPlan& plan, float* found_inf,
                                const float* inv_scale, float* partials, cudaStream_t stream);

// What a clip folds into the norm's finish: *coef = min(1, max_norm / (total + eps)) of the fp32 total
// (clip_coefficient, as clip_coef computes it) and *factor = *inv_scale * coef (coef when inv_scale is
// null), so a clipped step needs no launch between the norm and the scale pass.
struct ClipFold {
  double max_norm;
  double eps;
  const float* inv_scale;  // may be null
  float* coef;
  float* factor;
};

// Fixed-order second stage: total = sqrt(sum of partials), the same bits whether or not per_tensor_out
// (may be null) also asks for each tensor's norm from its block range; with clip (may be null), the clip
// coefficient and the combined factor from the same kernel.
void launch_finish_norms(const float* partials, const MultiTensorPlan& plan, float* total_out, float* per_tensor_out,
                         const ClipFold* clip, cudaStream_t stream);

// t *= *factor in place, unless found_inf (may be null) is set.
void launch_scale(const std::vector<DeviceTensor>& tensors, const MultiTensorPlan& plan, const float* factor,
                  const float* found_inf, cudaStream_t stream);

// *coef = min(1, max_norm / (*total_norm + eps)) in the norm's precision (fp32, or fp64 when fp64).
void launch_clip_coef(const void* total_norm, void* coef, bool fp64, double max_norm, double eps, cudaStream_t stream);

// One dynamic loss-scale update on the device (ScaleUpdate: csrc/functors.h).
void launch_update_scale(const ScaleUpdate& update, cudaStream_t stream);

}  // namespace fastamp::cuda
