// A tensor list prepared for the multi-tensor kernels, on CPU or CUDA: dense memory plus its plan.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include "multi_tensor_plan.h"

namespace fastamp {

// A tensor list as flat memory. Dense tensors (contiguous or only permuted) are used where they lie;
// anything else (strided slices) is copied to a contiguous buffer, which in-place ops write back.
struct FlatTensors {
  std::vector<at::Tensor> dense;
  std::vector<size_t> copied;
  MultiTensorPlan plan;

  FlatTensors(at::TensorList tensors, int64_t chunk_size, int64_t max_tensors, int64_t max_blocks) {
    dense.reserve(tensors.size());
    std::vector<int64_t> numels;
    numels.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      if (t.is_non_overlapping_and_dense()) {
        dense.push_back(t);
      } else {
        dense.push_back(t.contiguous());
        copied.push_back(i);
      }
      numels.push_back(t.numel());
    }
    plan = plan_multi_tensor(numels, chunk_size, max_tensors, max_blocks);
  }

  // For in-place ops: copy results computed in contiguous buffers back into the strided originals.
  void write_back(at::TensorList originals) const {
    for (size_t i : copied) originals[i].copy_(dense[i]);
  }
};

// The (total, per-tensor) norms of an empty list: 0 and no per-tensor entries, fp32, on `device`.
inline std::tuple<at::Tensor, at::Tensor> zero_norms(const at::Device& device) {
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  return {at::zeros({}, options), at::zeros({0}, options)};
}

}  // namespace fastamp
