// grad_norm and unscale_check_norm_ on CUDA. Stage one writes one fp32 partial sum of squares per block
// (no float atomics); stage two reduces the partials in a fixed order in fp64. Same input, same bits.
#include <algorithm>

#include "multi_tensor_apply.cuh"

namespace fastamp::cuda {

namespace {

constexpr int kFinishThreads = 1024;

struct GradNormOp {
  const float* inv_scale;  // may be null
  float* found_inf;        // may be null
  float* partials;

  template <typename T>
  __device__ void run(T* data, int64_t count, int64_t block) const {
    using A = opmath_t<T>;
    const A inv = inv_scale != nullptr ? static_cast<A>(*inv_scale) : A(1);
    A sum = A(0);
    auto accumulate = [&](T g) {
      sum = square_accumulate(sum, static_cast<A>(g) * inv);
      return g;
    };
    for_each_element<false>(data, count, accumulate);
    const A total = block_sum(sum);
    if (threadIdx.x == 0) partials[block] = static_cast<float>(total);
    // A finite sum proves every element finite; only a non-finite one needs a closer look.
    if (found_inf != nullptr && !is_finite_value(total)) {
      bool nonfinite = false;
      auto check = [&](T g) {
        nonfinite |= !is_finite_value(static_cast<A>(g));
        return g;
      };
      for_each_element<false>(data, count, check);
      if (nonfinite) *found_inf = 1.0f;
    }
  }
};

struct UnscaleCheckNormOp {
  float* found_inf;
  const float* inv_scale;
  float* partials;

  template <typename T>
  __device__ void run(T* data, int64_t count, int64_t block) const {
    using A = opmath_t<T>;
    const Unscale<T> unscale{static_cast<A>(*inv_scale)};
    A sum = A(0);
    A probe = A(0);
    auto f = [&](T g) {
      probe += nonfinite_probe(static_cast<A>(g));
      const T u = unscale(g);
      sum = square_accumulate(sum, static_cast<A>(u));
      return u;
    };
    for_each_element<true>(data, count, f);
    if (!is_finite_value(probe)) *found_inf = 1.0f;
    const A total = block_sum(sum);
    if (threadIdx.x == 0) partials[block] = static_cast<float>(total);
  }
};

// Per-tensor block ranges for the per-tensor stage, passed as kernel parameters (no host-to-device copy).
struct TensorRanges {
  int64_t first_block[kMaxTensorsPerNormLaunch];
  int32_t num_chunks[kMaxTensorsPerNormLaunch];
  int32_t first_tensor;
  int32_t count;
};

#if FASTAMP_LARGE_KERNEL_PARAMS
static_assert(sizeof(TensorRanges) <= 32764, "TensorRanges exceeds the 32 KB kernel parameter limit");
#else
static_assert(sizeof(TensorRanges) <= 4096, "TensorRanges exceeds the 4 KB kernel parameter limit");
#endif

// One warp per tensor: lanes stride over the tensor's partials in order, then a fixed shuffle tree;
// lane 0 writes the tensor's norm.
__global__ void per_tensor_norms_kernel(const FASTAMP_GRID_CONSTANT TensorRanges ranges, const float* partials,
                                        float* per_tensor_norms) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= ranges.count) return;  // uniform per warp
  double sum = 0.0;
  const int64_t first = ranges.first_block[warp];
  for (int64_t b = lane; b < ranges.num_chunks[warp]; b += 32) sum += static_cast<double>(partials[first + b]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0) per_tensor_norms[ranges.first_tensor + warp] = static_cast<float>(sqrt(sum));
}

// One block: total = sqrt(sum of the partials) in fp64, in one fixed order whether or not per-tensor
// norms were asked for; with a clip (clip.coef not null), its coefficient and factor.
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const float* partials, int64_t n, float* total_out, const ClipFold clip) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += static_cast<double>(partials[i]);
  const double total = block_sum(sum);
  if (threadIdx.x == 0) {
    const float norm = static_cast<float>(sqrt(total));
    *total_out = norm;
    if (clip.coef != nullptr) {
      const float coef = clip_coefficient<float>(norm, clip.max_norm, clip.eps);
      *clip.coef = coef;
      *clip.factor = clip.inv_scale != nullptr ? *clip.inv_scale * coef : coef;
    }
  }
}

}  // namespace

void launch_sum_squares(const std::vector<DeviceTensor>& tensors, const MultiTensorPlan& plan, const float* inv_scale,
                        float* found_inf, float* partials, cudaStream_t stream) {
  multi_tensor_apply(tensors, plan, GradNormOp{inv_scale, found_inf, partials}, stream);
}

void launch_unscale_sum_squares(const std::vector<DeviceTensor>& tensors, const MultiTensorPlan& plan, float* found_inf,
                                const float* inv_scale, float* partials, cudaStream_t stream) {
  multi_tensor_apply(tensors, plan, UnscaleCheckNormOp{found_inf, inv_scale, partials}, stream);
}

void launch_finish_norms(const float* partials, const MultiTensorPlan& plan, float* total_out, float* per_tensor_out,
                         const ClipFold* clip, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(plan.first_block.size());
  for (int64_t start = 0; per_tensor_out != nullptr && start < n; start += kMaxTensorsPerNormLaunch) {
    TensorRanges ranges;
    ranges.first_tensor = static_cast<int32_t>(start);
    ranges.count = static_cast<int32_t>(std::min<int64_t>(kMaxTensorsPerNormLaunch, n - start));
    for (int32_t i = 0; i < ranges.count; ++i) {
      ranges.first_block[i] = plan.first_block[start + i];
      ranges.num_chunks[i] = static_cast<int32_t>(plan.num_chunks[start + i]);
    }
    constexpr int kWarpsPerBlock = 8;
    const unsigned blocks = static_cast<unsigned>((ranges.count + kWarpsPerBlock - 1) / kWarpsPerBlock);
    per_tensor_norms_kernel<<<blocks, kWarpsPerBlock * 32, 0, stream>>>(ranges, partials, per_tensor_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const ClipFold fold = clip != nullptr ? *clip : ClipFold{0.0, 0.0, nullptr, nullptr, nullptr};
  finish_kernel<<<1, kFinishThreads, 0, stream>>>(partials, plan.total_blocks, total_out, fold);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastamp::cuda
