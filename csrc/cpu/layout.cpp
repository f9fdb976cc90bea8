// Layout for the weight-gradient product: [P_1; P_2; ...]ᵀ written straight into one
// (C, ΣN_k) buffer, blocked so reads and writes both stay in cache.
#include <ATen/Parallel.h>

#include <algorithm>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "kernels.h"

namespace gradreg {

namespace {

constexpr int64_t kTile = 16;

#ifdef __AVX512F__
// dst[j * ld_dst + i] = src[i * ld_src + j] for a full 16 × 16 tile, in registers; with
// `sums`, sums[j] += Σ_i src[i * ld_src + j].
inline void transpose_tile(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                           float* sums) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  if (sums) {
    __m512 s = _mm512_loadu_ps(sums);
    for (int i = 0; i < 16; ++i) s = _mm512_add_ps(s, r[i]);
    _mm512_storeu_ps(sums, s);
  }
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld_dst, r[i]);
}
constexpr bool kTileInRegisters = true;
#else
inline void transpose_tile(const float*, int64_t, float*, int64_t, float*) {}
constexpr bool kTileInRegisters = false;
#endif

// The rows [i0, i1) × columns [j0, j1) of one operand, element by element (edges, or no
// AVX-512).
inline void transpose_edge(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                           float* sums, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j) {
      const float v = src[i * ld_src + j];
      dst[j * ld_dst + i] = v;
      if (sums) sums[j] += v;
    }
}

// [P_1; P_2; ...]ᵀ into a new (C, ΣN_k) buffer; with `sums`, also Σ_n P_1[n, :] (C,).
at::Tensor transpose_into(const std::vector<at::Tensor>& parts, float* sums) {
  TORCH_CHECK(!parts.empty(), "transpose_cat: no operands");
  const int64_t c = parts[0].size(1);
  int64_t total = 0;
  for (const auto& p : parts) {
    check_f32(p, "transpose_cat operand");
    TORCH_CHECK(p.dim() == 2 && p.size(1) == c, "transpose_cat: operands must be (N_k, C)");
    total += p.size(0);
  }
  auto out = at::empty({c, total}, parts[0].options());
  float* op = out.data_ptr<float>();
  if (sums) std::fill(sums, sums + c, 0.f);
  int64_t col0 = 0;
  for (size_t k = 0; k < parts.size(); ++k) {
    const int64_t n = parts[k].size(0);
    const float* ip = parts[k].data_ptr<float>();
    float* sp = k == 0 ? sums : nullptr;
    float* dst = op + col0;
    // threads take strips of 16 input columns (16 output rows) each: disjoint sums and writes
    const int64_t strips = (c + kTile - 1) / kTile;
    at::parallel_for(0, strips, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n)),
                     [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t j0 = s * kTile, j1 = std::min(c, j0 + kTile);
        int64_t i = 0;
        if (kTileInRegisters && j1 - j0 == kTile)
          for (; i + kTile <= n; i += kTile)
            transpose_tile(ip + i * c + j0, c, dst + j0 * total + i, total, sp ? sp + j0 : nullptr);
        transpose_edge(ip, c, dst, total, sp, i, n, j0, j1);
      }
    });
    col0 += n;
  }
  return out;
}

}  // namespace

at::Tensor transpose_cat(const std::vector<at::Tensor>& parts) {
  return transpose_into(parts, nullptr);
}

std::tuple<at::Tensor, at::Tensor> transpose_cat_sum(const std::vector<at::Tensor>& parts) {
  TORCH_CHECK(!parts.empty(), "transpose_cat_sum: no operands");
  auto sums = at::empty({parts[0].size(1)}, parts[0].options());
  auto out = transpose_into(parts, sums.data_ptr<float>());
  return {out, sums};
}

}  // namespace gradreg
