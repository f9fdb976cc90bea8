// Element storage of the kernels that read or write bfloat16 (CPU autocast): every value is
// computed in float32; a bf16 operand is widened on load and rounded to nearest-even on store,
// as torch's own bf16 kernels do.
//   to_f32 / from_f32:  one element
//   load16 / store16:   16 elements as one AVX-512 float32 register
//   load8 / store8:     8 elements as one AVX2 float32 register (CPUs without AVX-512)
// bf16 → float32 is exact (the top 16 bits of a float); float32 → bf16 uses the AVX512_BF16
// instruction where the CPU has it (-march=native), else the same rounding in integer lanes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace gradreg {

using bf16 = c10::BFloat16;

inline float to_f32(float v) { return v; }
// the bits moved up by hand (c10's conversion does not vectorize inside simd loops)
inline float to_f32(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T from_f32(float v);
template <>
inline float from_f32<float>(float v) { return v; }
// round to nearest even, a NaN kept quiet; in integer arithmetic that vectorizes inside simd
// loops (c10's conversion does not, and costs 10x the sweep)
template <>
inline bf16 from_f32<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t r = v != v ? ((u >> 16) | 0x40u) : rounded;
  return bf16(static_cast<uint16_t>(r), bf16::from_bits());
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

inline void store16(bf16* p, __m512 v) {
#if defined(__AVX512BF16__)
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  // x + 0x7fff + (bit 16 of x), top half; a NaN keeps its top half with the quiet bit set
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(
      r, nan, _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40)));
  const __m256i h = _mm512_cvtepi32_epi16(r);
#endif
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}
#endif

#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// the rounding of from_f32<bf16> in eight integer lanes
inline void store8(bf16* p, __m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i top = _mm256_srli_epi32(x, 16);
  const __m256i lsb = _mm256_and_si256(top, _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i q = _mm256_blendv_epi8(r, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
  // every lane holds a value below 2^16: the unsigned pack keeps it
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}

// the 8 bits of `byte` as an 8-lane select mask (lane k on where bit k is set)
inline __m256 byte_mask8(uint8_t byte) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_and_si256(_mm256_set1_epi32(byte), sel);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, sel));
}
#endif

// f(ptr) with t's element type (float32 or bf16).
template <typename F>
auto with_values(const at::Tensor& t, F f) {
  return t.scalar_type() == at::kBFloat16 ? f(t.const_data_ptr<bf16>())
                                          : f(t.const_data_ptr<float>());
}

// f(in_ptr, out_ptr) for two tensors of one element type (float32 or bf16).
template <typename F>
void with_same_storage(const at::Tensor& in, at::Tensor& out, F f) {
  TORCH_CHECK(in.scalar_type() == out.scalar_type(), "operand and result dtypes differ");
  if (in.scalar_type() == at::kBFloat16) {
    f(in.const_data_ptr<bf16>(), out.mutable_data_ptr<bf16>());
  } else {
    f(in.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  }
}

// f(in_ptr, out_ptr) with the two tensors' element types (each float32 or bf16).
template <typename F>
void with_storage(const at::Tensor& in, at::Tensor& out, F f) {
  const bool in16 = in.scalar_type() == at::kBFloat16;
  const bool out16 = out.scalar_type() == at::kBFloat16;
  if (in16 && out16) {
    f(in.const_data_ptr<bf16>(), out.mutable_data_ptr<bf16>());
  } else if (in16) {
    f(in.const_data_ptr<bf16>(), out.mutable_data_ptr<float>());
  } else if (out16) {
    f(in.const_data_ptr<float>(), out.mutable_data_ptr<bf16>());
  } else {
    f(in.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  }
}

}  // namespace gradreg
