// Element storage of the kernels that read or write bfloat16 (CPU autocast): every value is
// computed in float32; a bf16 operand is widened on load and rounded to nearest-even on store,
// as torch's own bf16 kernels do.
//   to_f32 / from_f32:  one element
//   load16 / store16:   16 elements as one AVX-512 float32 register
// bf16 → float32 is exact (the top 16 bits of a float); float32 → bf16 uses the AVX512_BF16
// instruction where the CPU has it (-march=native), else the same rounding in integer lanes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
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
