// Explicitly vectorized chunk loops for fp32, bf16 and fp16 elements (fp64 uses the generic loops in
// multi_tensor_cpu.h). The loops (simd_loops.inc) are written with GCC vector extensions and compiled
// twice: portable (SSE2) and, with GCC on x86, for AVX2+FMA+F16C, chosen at run time, so the extension
// stays portable. Auto-vectorization of the generic loops reached only ~2 G elements/s per core, far
// below memory bandwidth; these reach it.
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

// The AVX2 path is compiled with `#pragma GCC target` (GCC only; other compilers get the portable path).
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTAMP_HAVE_AVX2_PATH 1
#include <immintrin.h>
#else
#define FASTAMP_HAVE_AVX2_PATH 0
#endif

namespace fastamp::cpu::simd {

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

constexpr int64_t kSubBlock = 1024;
constexpr int kWidth = 8;

FASTAMP_ALWAYS_INLINE f32x8 splat(float v) { return f32x8{v, v, v, v, v, v, v, v}; }

// Instruction sets the loops are built for.
struct Portable {};
struct Avx2 {};  // AVX2 + FMA + F16C

// 8 elements of T <-> 8 fp32 values, in plain C++ (GCC vector extensions).
template <typename T> struct PortableLanes;

template <> struct PortableLanes<float> {
  static FASTAMP_ALWAYS_INLINE f32x8 load(const float* p) {
    f32x8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static FASTAMP_ALWAYS_INLINE void store(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }
};

template <> struct PortableLanes<c10::BFloat16> {
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

template <> struct PortableLanes<c10::Half> {
  static FASTAMP_ALWAYS_INLINE f32x8 load(const c10::Half* p) {
    f32x8 v;
    for (int j = 0; j < kWidth; ++j) v[j] = static_cast<float>(p[j]);
    return v;
  }
  static FASTAMP_ALWAYS_INLINE void store(c10::Half* p, f32x8 v) {
    for (int j = 0; j < kWidth; ++j) p[j] = static_cast<c10::Half>(v[j]);
  }
};

template <typename T, typename Isa> struct Lanes : PortableLanes<T> {
  // 16 elements from two vectors; specializations may store them in one go.
  static FASTAMP_ALWAYS_INLINE void store2(T* p, f32x8 v0, f32x8 v1) {
    PortableLanes<T>::store(p, v0);
    PortableLanes<T>::store(p + kWidth, v1);
  }
};

#if FASTAMP_HAVE_AVX2_PATH
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The compiler turns the portable fp16 conversions into scalar code and the bf16 narrowing into a long
// shuffle sequence: ~20x and ~2x slower than memory. F16C converts 8 halves per instruction (round to
// nearest even, as c10::Half; NaNs stay NaN) and one pack narrows 8 bf16 results.
template <> struct Lanes<c10::Half, Avx2> {
  static FASTAMP_ALWAYS_INLINE f32x8 load(const c10::Half* p) {
    return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static FASTAMP_ALWAYS_INLINE void store(c10::Half* p, f32x8 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
  }
  static FASTAMP_ALWAYS_INLINE void store2(c10::Half* p, f32x8 v0, f32x8 v1) {
    store(p, v0);
    store(p + kWidth, v1);
  }
};

template <> struct Lanes<c10::BFloat16, Avx2> {
  static FASTAMP_ALWAYS_INLINE f32x8 load(const c10::BFloat16* p) {
    const __m256i w =
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
    return (f32x8)_mm256_castsi256_ps(w);
  }
  // Round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's conversion), as 32-bit lanes <= 0xFFFF.
  static FASTAMP_ALWAYS_INLINE __m256i round(f32x8 v) {
    const __m256 x = (__m256)v;
    const __m256i u = _mm256_castps_si256(x);
    __m256i t = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(t, _mm256_set1_epi32(0x7FFF)), u), 16);
    const __m256 ordered = _mm256_cmp_ps(x, x, _CMP_ORD_Q);
    return _mm256_blendv_epi8(_mm256_set1_epi32(0x7FC0), t, _mm256_castps_si256(ordered));
  }
  // The unsigned-saturating packs are exact because every lane is <= 0xFFFF.
  static FASTAMP_ALWAYS_INLINE void store(c10::BFloat16* p, f32x8 v) {
    const __m256i r = round(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  static FASTAMP_ALWAYS_INLINE void store2(c10::BFloat16* p, f32x8 v0, f32x8 v1) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(round(v0), round(v1)), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
};
#pragma GCC pop_options
#endif

FASTAMP_ALWAYS_INLINE float reduce(f32x8 a0, f32x8 a1, f32x8 a2, f32x8 a3) {
  const f32x8 s = (a0 + a1) + (a2 + a3);
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

namespace portable {
using Isa = Portable;
#include "simd_loops.inc"
}  // namespace portable

#if FASTAMP_HAVE_AVX2_PATH
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
using Isa = Avx2;
#include "simd_loops.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

// FASTAMP_CPU_PORTABLE=1 forces the portable loops (tests use it to cover both paths on one machine).
inline bool use_avx2() {
#if FASTAMP_HAVE_AVX2_PATH
  static const bool available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c") && std::getenv("FASTAMP_CPU_PORTABLE") == nullptr;
  return available;
#else
  return false;
#endif
}

template <typename T>
double dispatch_sum_squares(const T* data, int64_t count, float inv_scale) {
#if FASTAMP_HAVE_AVX2_PATH
  if (use_avx2()) return avx2::sum_squares_entry(data, count, inv_scale);
#endif
  return portable::sum_squares_entry(data, count, inv_scale);
}

template <typename T, bool kNorm>
bool dispatch_unscale(T* data, int64_t count, float inv_scale, double* sum_out) {
#if FASTAMP_HAVE_AVX2_PATH
  if (use_avx2()) return avx2::unscale_entry<T, kNorm>(data, count, inv_scale, sum_out);
#endif
  return portable::unscale_entry<T, kNorm>(data, count, inv_scale, sum_out);
}

template <typename T>
void dispatch_scale(T* data, int64_t count, float factor) {
#if FASTAMP_HAVE_AVX2_PATH
  if (use_avx2()) return avx2::scale_entry(data, count, factor);
#endif
  portable::scale_entry(data, count, factor);
}

}  // namespace fastamp::cpu::simd
