// The per-element and per-scalar math of every fastamp op. Written once, __host__ __device__, so that
// the C++ CPU kernels and the CUDA kernels compute exactly the same thing, rounding included.
#pragma once

// -ffast-math / -Ofast let the compiler assume no inf or nan: the x - x probe folds to 0 and "a finite
// sum means finite elements" stops holding, so overflow detection would vanish without a word. Every
// kernel source includes this header, CPU and CUDA host code alike.
#if defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__
#error \
    "fastamp: built with -ffast-math or -Ofast (__FINITE_MATH_ONLY__), which removes the kernels' inf/nan checks; remove those flags (CFLAGS, CXXFLAGS, extra_compile_args) and rebuild"
#endif

#include <cmath>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__CUDACC__)
#define FASTAMP_HD __host__ __device__ __forceinline__
#else
#define FASTAMP_HD inline
#endif

namespace fastamp {

// Arithmetic type of an element type: fp32 for fp32/fp16/bf16 (rounding once on the way back), fp64
// for fp64. Matches ATen's opmath_type.
template <typename T> struct OpMath {
  using type = float;
};
template <> struct OpMath<double> {
  using type = double;
};
template <typename T> using opmath_t = typename OpMath<T>::type;

// Nonzero-free probe of finiteness: x - x is +0 for every finite x and NaN for +-inf and NaN. Adding
// probes costs one add per element and needs no branch, so it vectorizes; a NaN sum means "look closer".
template <typename A> FASTAMP_HD A nonfinite_probe(A x) { return x - x; }

template <typename A> FASTAMP_HD bool is_finite_value(A x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// g * inv_scale computed in opmath and rounded once to the element type. Multiplying by exactly 1 is
// skipped, as PyTorch's _amp_foreach_non_finite_check_and_unscale_ does, so NaN payloads survive.
template <typename T> struct Unscale {
  opmath_t<T> inv_scale;
  FASTAMP_HD opmath_t<T> value(T g) const {
    const opmath_t<T> x = static_cast<opmath_t<T>>(g);
    return inv_scale == opmath_t<T>(1) ? x : x * inv_scale;
  }
  FASTAMP_HD T operator()(T g) const { return static_cast<T>(value(g)); }
};

// t * factor in opmath, rounded once. Used by scale_ (unscale and clip folded into one factor).
template <typename T> struct Scale {
  opmath_t<T> factor;
  FASTAMP_HD T operator()(T t) const { return static_cast<T>(static_cast<opmath_t<T>>(t) * factor); }
};

template <typename A> FASTAMP_HD A square_accumulate(A acc, A x) { return acc + x * x; }

// min(1, max_norm / (total_norm + eps)), computed as PyTorch's clip_grad_norm_ does
// (reciprocal, then multiply, then clamp with NaN propagating), in the norm's precision.
template <typename A> FASTAMP_HD A clip_coefficient(A total_norm, double max_norm, double eps) {
  const A denom = total_norm + static_cast<A>(eps);
  const A coef = (A(1) / denom) * static_cast<A>(max_norm);
  return (coef > A(1)) ? A(1) : coef;  // NaN compares false and propagates, like torch.clamp
}

// One dynamic loss-scale update, in double like torch._amp_update_scale_, plus hysteresis and bounds.
// hysteresis_tracker holds how many more consecutive overflows are tolerated before backing off; it is
// refilled to `hysteresis` by every step without overflow. With hysteresis == 1, min_scale == 0 and
// max_scale == inf this is torch._amp_update_scale_ exactly. Its ten arguments travel as one ScaleUpdate.
struct ScaleUpdate {
  // The state, updated in place (hysteresis_tracker may be null), and the flag that drives it.
  float* scale;
  int32_t* growth_tracker;
  int32_t* hysteresis_tracker;
  const float* found_inf;
  // The policy.
  double growth_factor;
  double backoff_factor;
  int64_t growth_interval;
  int64_t hysteresis;
  double min_scale;
  double max_scale;
};

FASTAMP_HD void update_scale_step(const ScaleUpdate& u) {
  float* scale = u.scale;
  int32_t* growth_tracker = u.growth_tracker;
  int32_t* hysteresis_tracker = u.hysteresis_tracker;
  const double growth_factor = u.growth_factor, backoff_factor = u.backoff_factor;
  const double min_scale = u.min_scale, max_scale = u.max_scale;
  const int64_t growth_interval = u.growth_interval, hysteresis = u.hysteresis;
  if (*u.found_inf != 0.0f) {
    *growth_tracker = 0;
    if (hysteresis_tracker != nullptr) {
      *hysteresis_tracker -= 1;
      if (*hysteresis_tracker > 0) return;  // tolerated: keep the scale
    }
    double backed_off = static_cast<double>(*scale) * backoff_factor;
    if (backed_off < min_scale) backed_off = min_scale;
    *scale = static_cast<float>(backed_off);
  } else {
    const int32_t successful = *growth_tracker + 1;
    if (successful == growth_interval) {
      double grown = static_cast<double>(*scale) * growth_factor;
      if (grown > max_scale) grown = max_scale;
      const float new_scale = static_cast<float>(grown);
      if (is_finite_value(new_scale)) *scale = new_scale;
      *growth_tracker = 0;
    } else {
      *growth_tracker = successful;
    }
    if (hysteresis_tracker != nullptr) *hysteresis_tracker = static_cast<int32_t>(hysteresis);
  }
}

}  // namespace fastamp
