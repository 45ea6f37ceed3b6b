// extern "C" entry points over csrc/cuda/launch.h for the emulated build, called through ctypes on CPU
// tensors' memory. Each does what csrc/cuda/ops.cpp does around the same launches (the plan with the
// CUDA launch limits, the workspace, the two norm stages), minus ATen: the Python side validates and
// makes the tensors dense. A launch error comes back as a nonzero return and emu_error().
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "csrc/cuda/launch.h"
#include "csrc/cuda/multi_tensor_apply.cuh"

using namespace fastamp::cuda;

#if defined(__SANITIZE_THREAD__)
// Many threads store the same 1.0 to found_inf, as in PyTorch's own kernel: benign on a GPU, a race to
// ThreadSanitizer. Declared benign for that one flag only, so that every other race still reports.
extern "C" void AnnotateBenignRaceSized(const char* file, int line, const volatile void* mem, long size,
                                        const char* description);
#define EMU_BENIGN_FLAG(p) \
  if ((p) != nullptr) AnnotateBenignRaceSized(__FILE__, __LINE__, (p), sizeof(float), "found_inf = 1 from many threads")
#else
#define EMU_BENIGN_FLAG(p) (void)(p)
#endif

namespace {

thread_local std::string g_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}

struct List {
  std::vector<DeviceTensor> tensors;
  fastamp::MultiTensorPlan plan;
  List(void** data, const int64_t* numel, const int* dtype, int n) {
    std::vector<int64_t> numels(numel, numel + n);
    for (int i = 0; i < n; ++i) tensors.push_back({data[i], numel[i], static_cast<DType>(dtype[i])});
    plan = fastamp::plan_multi_tensor(numels, kChunkSize, kMaxTensorsPerLaunch, kMaxBlocksPerLaunch);
  }
};

// Partials start as NaN, so that a block that never writes its partial shows in the total.
std::vector<float> partials_for(const List& list) {
  return std::vector<float>(static_cast<size_t>(list.plan.total_blocks), std::numeric_limits<float>::quiet_NaN());
}

// What csrc/cuda/ops.cpp's norms() does: stage one (`launch_stage_one(list, partials)`) into a partials
// workspace, then the fixed-order finish; an empty list without a clip launches nothing, as there.
template <typename StageOne>
void norms(void** data, const int64_t* numel, const int* dtype, int n, float* found_inf, float* total,
           float* per_tensor, const ClipFold* clip, const StageOne& launch_stage_one) {
  if (n == 0 && clip == nullptr) {
    *total = 0.0f;
    return;
  }
  EMU_BENIGN_FLAG(found_inf);
  List list(data, numel, dtype, n);
  std::vector<float> partials = partials_for(list);
  launch_stage_one(list, partials.data());
  launch_finish_norms(partials.data(), list.plan, total, per_tensor, clip, nullptr);
}

}  // namespace

extern "C" {

const char* emu_error() { return g_error.c_str(); }
int emu_block_threads() { return kBlockThreads; }
long long emu_chunk_size() { return kChunkSize; }
int emu_max_tensors_per_launch() { return kMaxTensorsPerLaunch; }
int emu_max_blocks_per_launch() { return kMaxBlocksPerLaunch; }

int emu_unscale_check(void** data, const int64_t* numel, const int* dtype, int n, float* found_inf,
                      const float* inv_scale) {
  return guarded([&] {
    EMU_BENIGN_FLAG(found_inf);
    List list(data, numel, dtype, n);
    launch_unscale_check(list.tensors, list.plan, found_inf, inv_scale, nullptr);
  });
}

int emu_grad_norm(void** data, const int64_t* numel, const int* dtype, int n, const float* inv_scale, float* found_inf,
                  float* total, float* per_tensor) {
  return guarded([&] {
    norms(data, numel, dtype, n, found_inf, total, per_tensor, nullptr, [&](const List& list, float* partials) {
      launch_sum_squares(list.tensors, list.plan, inv_scale, found_inf, partials, nullptr);
    });
  });
}

int emu_unscale_check_norm(void** data, const int64_t* numel, const int* dtype, int n, float* found_inf,
                           const float* inv_scale, float* total, float* per_tensor) {
  return guarded([&] {
    norms(data, numel, dtype, n, found_inf, total, per_tensor, nullptr, [&](const List& list, float* partials) {
      launch_unscale_sum_squares(list.tensors, list.plan, found_inf, inv_scale, partials, nullptr);
    });
  });
}

int emu_clip_norm(void** data, const int64_t* numel, const int* dtype, int n, double max_norm, const float* inv_scale,
                  float* found_inf, float* total, float* per_tensor, float* coef, float* factor, double eps) {
  return guarded([&] {
    const ClipFold clip{max_norm, eps, inv_scale, coef, factor};
    norms(data, numel, dtype, n, found_inf, total, per_tensor, &clip, [&](const List& list, float* partials) {
      launch_sum_squares(list.tensors, list.plan, inv_scale, found_inf, partials, nullptr);
    });
  });
}

int emu_scale(void** data, const int64_t* numel, const int* dtype, int n, const float* factor, const float* found_inf) {
  return guarded([&] {
    List list(data, numel, dtype, n);
    launch_scale(list.tensors, list.plan, factor, found_inf, nullptr);
  });
}

int emu_clip_coef(const void* total_norm, void* coef, int fp64, double max_norm, double eps) {
  return guarded([&] { launch_clip_coef(total_norm, coef, fp64 != 0, max_norm, eps, nullptr); });
}

int emu_update_scale(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker, const float* found_inf,
                     double growth_factor, double backoff_factor, long long growth_interval, long long hysteresis,
                     double min_scale, double max_scale) {
  return guarded([&] {
    launch_update_scale(fastamp::ScaleUpdate{scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor,
                                             backoff_factor, growth_interval, hysteresis, min_scale, max_scale},
                        nullptr);
  });
}
}
