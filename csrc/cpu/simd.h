// Explicitly vectorized chunk loops for fp32, bf16 and fp16 elements (fp64 uses the generic loops in
// multi_tensor_cpu.h). Written with GCC/Clang vector extensions, so the same source compiles to SSE2
// everywhere and, through the *_avx2 entry points, to AVX2+FMA where the CPU has it (chosen at run time:
// the extension stays portable). Auto-vectorization of the generic loops reached only ~2 G elements/s
// per core, far below memory bandwidth; these reach it.
//
// Per-element math is that of csrc/functors.h: g * inv_scale in fp32 rounded once (bf16 with
// round-to-nearest-even exactly as c10::BFloat16, fp16 through c10::Half), x - x as the finiteness
// probe. Sums use 4 x 8 fp32 accumulators per 1024-element sub-block, reduced in a fixed order, and
// sub-block sums are added in fp64: the result depends only on the data (and on the instruction set).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../functors.h"

#if defined(__GNUC__) || defined(__clang__)
#define FASTAMP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTAMP_ALWAYS_INLINE inline
#endif

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define FASTAMP_HAVE_AVX2_PATH 1
#define FASTAMP_AVX2_TARGET __attribute__((target("avx2,fma")))
#else
#define FASTAMP_HAVE_AVX2_PATH 0
#define FASTAMP_AVX2_TARGET
#endif

namespace fastamp::cpu::simd {

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

constexpr int64_t kSubBlock = 1024;
constexpr int kWidth = 8;

FASTAMP_ALWAYS_INLINE f32x8 splat(float v) { return f32x8{v, v, v, v, v, v, v, v}; }

// 8 elements of T <-> 8 fp32 values.
template <typename T> struct Lanes;

template <> struct Lanes<float> {
  static FASTAMP_ALWAYS_INLINE f32x8 load(const float* p) {
    f32x8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static FASTAMP_ALWAYS_INLINE void store(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }
};

template <> struct Lanes<c10::BFloat16> {
  static FASTAMP_ALWAYS_INLINE f32x8 load(const c10::BFloat16* p) {
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    f32x8 v;
    std::memcpy(&v, &w, sizeof(v));
    return v;
  }
  // Round to nearest even, NaN -> 0x7FC0: c10::BFloat16's conversion, eight at a time.
  static FASTAMP_ALWAYS_INLINE void store(c10::BFloat16* p, f32x8 v) {
    u32x8 u;
    std::memcpy(&u, &v, sizeof(u));
    const u32x8 rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    const u32x8 nan_mask = (u32x8)(v != v);
    const u32x8 result = (rounded & ~nan_mask) | (0x7FC0u & nan_mask);
    const u16x8 h = __builtin_convertvector(result, u16x8);
    std::memcpy(p, &h, sizeof(h));
  }
};

template <> struct Lanes<c10::Half> {
  static FASTAMP_ALWAYS_INLINE f32x8 load(const c10::Half* p) {
    f32x8 v;
    for (int j = 0; j < kWidth; ++j) v[j] = static_cast<float>(p[j]);
    return v;
  }
  static FASTAMP_ALWAYS_INLINE void store(c10::Half* p, f32x8 v) {
    for (int j = 0; j < kWidth; ++j) p[j] = static_cast<c10::Half>(v[j]);
  }
};

FASTAMP_ALWAYS_INLINE float reduce(f32x8 a0, f32x8 a1, f32x8 a2, f32x8 a3) {
  const f32x8 s = (a0 + a1) + (a2 + a3);
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

// Sum of (g * inv_scale)^2 over [0, count).
template <typename T>
FASTAMP_ALWAYS_INLINE double sum_squares(const T* data, int64_t count, float inv_scale) {
  const f32x8 inv = splat(inv_scale);
  double total = 0.0;
  for (int64_t base = 0; base < count; base += kSubBlock) {
    const int64_t end = count < base + kSubBlock ? count : base + kSubBlock;
    f32x8 a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = base;
    for (; i + 4 * kWidth <= end; i += 4 * kWidth) {
      const f32x8 x0 = Lanes<T>::load(data + i) * inv;
      const f32x8 x1 = Lanes<T>::load(data + i + 8) * inv;
      const f32x8 x2 = Lanes<T>::load(data + i + 16) * inv;
      const f32x8 x3 = Lanes<T>::load(data + i + 24) * inv;
      a0 += x0 * x0;
      a1 += x1 * x1;
      a2 += x2 * x2;
      a3 += x3 * x3;
    }
    float tail = 0.f;
    for (; i < end; ++i) tail = square_accumulate(tail, static_cast<float>(data[i]) * inv_scale);
    total += static_cast<double>(reduce(a0, a1, a2, a3) + tail);
  }
  return total;
}

// g *= inv_scale in place (inv_scale == 1 writes nothing, keeping every bit, as PyTorch does); returns
// whether any original element was non-finite. With sum_out, also the sum of squares of the written
// values (as rounded to T).
template <typename T, bool kNorm>
FASTAMP_ALWAYS_INLINE bool unscale(T* data, int64_t count, float inv_scale, double* sum_out) {
  const f32x8 inv = splat(inv_scale);
  const bool write = inv_scale != 1.0f;
  f32x8 probe = splat(0.f);
  float probe_tail = 0.f;
  double total = 0.0;
  for (int64_t base = 0; base < count; base += kSubBlock) {
    const int64_t end = count < base + kSubBlock ? count : base + kSubBlock;
    f32x8 a0 = splat(0.f), a1 = a0;
    int64_t i = base;
    for (; i + 2 * kWidth <= end; i += 2 * kWidth) {
      f32x8 x0 = Lanes<T>::load(data + i);
      f32x8 x1 = Lanes<T>::load(data + i + 8);
      probe += (x0 - x0) + (x1 - x1);
      if (write) {
        x0 *= inv;
        x1 *= inv;
        Lanes<T>::store(data + i, x0);
        Lanes<T>::store(data + i + 8, x1);
        if (kNorm && !std::is_same<T, float>::value) {  // the norm is of the values as rounded to T
          x0 = Lanes<T>::load(data + i);
          x1 = Lanes<T>::load(data + i + 8);
        }
      }
      if (kNorm) {
        a0 += x0 * x0;
        a1 += x1 * x1;
      }
    }
    float tail = 0.f;
    const Unscale<T> unscale_one{inv_scale};
    for (; i < end; ++i) {
      const T g = data[i];
      probe_tail += nonfinite_probe(static_cast<float>(g));
      const T u = write ? unscale_one(g) : g;
      if (write) data[i] = u;
      if (kNorm) tail = square_accumulate(tail, static_cast<float>(u));
    }
    if (kNorm) total += static_cast<double>(reduce(a0, a1, splat(0.f), splat(0.f)) + tail);
  }
  if (kNorm) *sum_out = total;
  return !is_finite_value(reduce(probe, splat(0.f), splat(0.f), splat(0.f)) + probe_tail);
}

// t *= factor in place, in fp32, rounded once.
template <typename T>
FASTAMP_ALWAYS_INLINE void scale(T* data, int64_t count, float factor) {
  const f32x8 f = splat(factor);
  int64_t i = 0;
  for (; i + 2 * kWidth <= count; i += 2 * kWidth) {
    Lanes<T>::store(data + i, Lanes<T>::load(data + i) * f);
    Lanes<T>::store(data + i + 8, Lanes<T>::load(data + i + 8) * f);
  }
  const Scale<T> scale_one{factor};
  for (; i < count; ++i) data[i] = scale_one(data[i]);
}

// Entry points: a portable build and an AVX2+FMA build of each loop.
#define FASTAMP_SIMD_ENTRY_POINTS(SUFFIX, ATTRIBUTE)                                                         \
  template <typename T>                                                                                      \
  ATTRIBUTE double sum_squares_##SUFFIX(const T* data, int64_t count, float inv_scale) {                    \
    return sum_squares(data, count, inv_scale);                                                              \
  }                                                                                                          \
  template <typename T, bool kNorm>                                                                          \
  ATTRIBUTE bool unscale_##SUFFIX(T* data, int64_t count, float inv_scale, double* sum_out) {               \
    return unscale<T, kNorm>(data, count, inv_scale, sum_out);                                               \
  }                                                                                                          \
  template <typename T>                                                                                      \
  ATTRIBUTE void scale_##SUFFIX(T* data, int64_t count, float factor) {                                      \
    scale(data, count, factor);                                                                              \
  }

FASTAMP_SIMD_ENTRY_POINTS(portable, )
#if FASTAMP_HAVE_AVX2_PATH
FASTAMP_SIMD_ENTRY_POINTS(avx2, FASTAMP_AVX2_TARGET)
#endif
#undef FASTAMP_SIMD_ENTRY_POINTS

// FASTAMP_CPU_PORTABLE=1 forces the portable loops (tests use it to cover both paths on one machine).
inline bool use_avx2() {
#if FASTAMP_HAVE_AVX2_PATH
  static const bool available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                std::getenv("FASTAMP_CPU_PORTABLE") == nullptr;
  return available;
#else
  return false;
#endif
}

template <typename T>
double dispatch_sum_squares(const T* data, int64_t count, float inv_scale) {
#if FASTAMP_HAVE_AVX2_PATH
  if (use_avx2()) return sum_squares_avx2(data, count, inv_scale);
#endif
  return sum_squares_portable(data, count, inv_scale);
}

template <typename T, bool kNorm>
bool dispatch_unscale(T* data, int64_t count, float inv_scale, double* sum_out) {
#if FASTAMP_HAVE_AVX2_PATH
  if (use_avx2()) return unscale_avx2<T, kNorm>(data, count, inv_scale, sum_out);
#endif
  return unscale_portable<T, kNorm>(data, count, inv_scale, sum_out);
}

template <typename T>
void dispatch_scale(T* data, int64_t count, float factor) {
#if FASTAMP_HAVE_AVX2_PATH
  if (use_avx2()) return scale_avx2(data, count, factor);
#endif
  scale_portable(data, count, factor);
}

}  // namespace fastamp::cpu::simd
