// Piecewise-linear steps with a packed bit mask: ReLU / LeakyReLU (σ' ∈ {1, slope}) and
// Dropout (m ∈ {0, 1/(1-p)}). Forward saves 1 bit per element (bit i%8 of byte i/8); every
// later pass is out = bit ? t·hi : t·lo in one sweep, a select as torch's backward is: with
// lo = 0 an off element is exactly 0 even where t is NaN or ±inf. The bit at a NaN z is
// torch's choice: ReLU's backward reads its output (NaN <= 0 is false: on), LeakyReLU's
// reads z > 0 (false: the slope). With AVX-512 a 16-lane compare gives 16 mask bits at
// once and a masked blend applies them, with AVX2 an 8-lane compare gives one byte
// (movemask) and the byte widened to 8 lanes selects; elsewhere the selects are arithmetic,
// not branches (the bits are random: a mispredicted branch per element would cost more
// than the whole sweep). Operands and results are float32 or bfloat16, each its own
// (lanes.h): under CPU autocast a sweep reads a float32 δ and writes the bf16 operand of the
// next product, with no conversion pass between them.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "lanes.h"

namespace gradreg {
namespace {

constexpr int64_t kGrainGroups = 1024;  // 16k elements per task

at::Tensor empty_bits(int64_t n, const at::Tensor& like) {
  return at::empty({(n + 7) / 8}, like.options().dtype(at::kByte));
}

// Elements [16 g0, min(16 g1, n)) of y = max(z, 0) + lo·min(z, 0) and their bits: !(z <= 0)
// for ReLU (lo = 0), z > 0 for LeakyReLU. y at a non-finite z is fixed up by the caller;
// returns whether every z of the range is finite (Σ (z − z) is NaN as soon as one is not:
// the check rides on the sweep instead of costing one of its own).
template <typename TI, typename TO>
bool mask_forward_range(const TI* __restrict z, TO* __restrict y, uint8_t* __restrict bits,
                        float lo, int64_t g0, int64_t g1, int64_t n) {
  int64_t i = g0 * 16;
  const int64_t end = std::min(g1 * 16, n);
  float finite = 0.f;
#if defined(__AVX512F__)
  const __m512 zero = _mm512_setzero_ps(), l = _mm512_set1_ps(lo);
  const bool relu = lo == 0.f;
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= end; i += 16) {
    const __m512 v = load16(z + i);
    acc = _mm512_add_ps(acc, _mm512_sub_ps(v, v));
    const __mmask16 m = relu ? _mm512_cmp_ps_mask(v, zero, _CMP_NLE_UQ)
                             : _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
    store16(y + i, _mm512_mask_blend_ps(m, _mm512_mul_ps(v, l), v));
    const uint16_t mb = static_cast<uint16_t>(m);
    std::memcpy(bits + i / 8, &mb, 2);
  }
  finite = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
  const __m256 zero = _mm256_setzero_ps(), l = _mm256_set1_ps(lo);
  const bool relu = lo == 0.f;
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= end; i += 8) {
    const __m256 v = load8(z + i);
    acc = _mm256_add_ps(acc, _mm256_sub_ps(v, v));
    const __m256 m = relu ? _mm256_cmp_ps(v, zero, _CMP_NLE_UQ)
                          : _mm256_cmp_ps(v, zero, _CMP_GT_OQ);
    store8(y + i, _mm256_blendv_ps(_mm256_mul_ps(v, l), v, m));
    bits[i / 8] = static_cast<uint8_t>(_mm256_movemask_ps(m));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float f : lanes) finite += f;
#endif
  for (; i < end; i += 8) {
    uint8_t byte = 0;
    const int64_t m = std::min<int64_t>(8, end - i);
    for (int64_t k = 0; k < m; ++k) {
      const float v = to_f32(z[i + k]);
      finite += v - v;
      y[i + k] = from_f32<TO>(std::fmax(v, 0.f) + lo * std::fmin(v, 0.f));
      const bool on = lo == 0.f ? !(v <= 0.f) : v > 0.f;
      byte |= static_cast<uint8_t>(on) << k;
    }
    bits[i / 8] = byte;
  }
  return !std::isnan(finite);
}

template <typename TI, typename TO>
void mask_apply_range(const uint8_t* __restrict bits, const TI* __restrict t,
                      TO* __restrict out, float hi, float lo, int64_t g0, int64_t g1,
                      int64_t n) {
  int64_t i = g0 * 16;
  const int64_t end = std::min(g1 * 16, n);
#if defined(__AVX512F__)
  const __m512 h = _mm512_set1_ps(hi), l = _mm512_set1_ps(lo);
  for (; i + 16 <= end; i += 16) {
    uint16_t mb;
    std::memcpy(&mb, bits + i / 8, 2);
    const __m512 v = load16(t + i);
    const __mmask16 m = static_cast<__mmask16>(mb);
    const __m512 off = lo == 0.f ? _mm512_setzero_ps() : _mm512_mul_ps(v, l);
    store16(out + i, _mm512_mask_blend_ps(m, off, _mm512_mul_ps(v, h)));
  }
#elif defined(__AVX2__)
  const __m256 h = _mm256_set1_ps(hi), l = _mm256_set1_ps(lo);
  for (; i + 8 <= end; i += 8) {
    const __m256 v = load8(t + i);
    const __m256 off = lo == 0.f ? _mm256_setzero_ps() : _mm256_mul_ps(v, l);
    store8(out + i, _mm256_blendv_ps(off, _mm256_mul_ps(v, h), byte_mask8(bits[i / 8])));
  }
#endif
  for (; i < end; ++i) {
    const bool on = (bits[i >> 3] >> (i & 7)) & 1;
    const float v = to_f32(t[i]);
    const float off = lo == 0.f ? 0.f : v * lo;
    out[i] = from_f32<TO>(on ? v * hi : off);
  }
}

}  // namespace

std::tuple<at::Tensor, bool> mask_forward_out(const at::Tensor& z, double lo, at::Tensor& y) {
  check_f32_or_bf16(z, "z");
  check_f32_or_bf16(y, "mask_forward's result");
  const int64_t n = z.numel();
  TORCH_CHECK(y.numel() == n, "mask_forward: the result holds ", y.numel(), " values, z ", n);
  auto bits = empty_bits(n, z);
  uint8_t* bp = bits.data_ptr<uint8_t>();
  const float l = static_cast<float>(lo);
  std::atomic<bool> finite{true};
  with_storage(z, y, [&](const auto* zp, auto* yp) {
    at::parallel_for(0, (n + 15) / 16, kGrainGroups, [&](int64_t g0, int64_t g1) {
      if (!mask_forward_range(zp, yp, bp, l, g0, g1, n)) finite = false;
    });
  });
  return {bits, finite.load()};
}

std::tuple<at::Tensor, at::Tensor, bool> mask_forward(const at::Tensor& z, double lo,
                                                      c10::optional<at::ScalarType> out_dtype) {
  auto y = at::empty_like(z, z.options().dtype(out_dtype.value_or(z.scalar_type())));
  auto [bits, finite] = mask_forward_out(z, lo, y);
  return {y, bits, finite};
}

void mask_apply_out(const at::Tensor& bits, const at::Tensor& t, double hi, double lo,
                    at::Tensor& out) {
  check_f32_or_bf16(t, "t");
  check_f32_or_bf16(out, "mask_apply's result");
  const int64_t n = t.numel();
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.numel() == (n + 7) / 8,
              "mask_apply: bit mask does not match a tensor of ", n, " elements");
  TORCH_CHECK(out.numel() == n, "mask_apply: the result holds ", out.numel(), " values, t ", n);
  const uint8_t* bp = bits.data_ptr<uint8_t>();
  const float h = static_cast<float>(hi), l = static_cast<float>(lo);
  with_storage(t, out, [&](const auto* tp, auto* op) {
    at::parallel_for(0, (n + 15) / 16, kGrainGroups, [&](int64_t g0, int64_t g1) {
      mask_apply_range(bp, tp, op, h, l, g0, g1, n);
    });
  });
}

at::Tensor mask_apply(const at::Tensor& bits, const at::Tensor& t, double hi, double lo,
                      c10::optional<at::ScalarType> out_dtype) {
  auto out = at::empty_like(t, t.options().dtype(out_dtype.value_or(t.scalar_type())));
  mask_apply_out(bits, t, hi, lo, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> dropout_forward(const at::Tensor& a, const at::Tensor& keep,
                                                   double scale) {
  // y = a ⊙ keep · scale; bit = keep (keep: a 0/1 tensor of a's size); y in a's dtype
  check_f32_or_bf16(a, "a");
  TORCH_CHECK(keep.numel() == a.numel(), "dropout_forward: keep mask size mismatch");
  auto k8 = keep.to(at::kByte).contiguous();
  const int64_t n = a.numel();
  auto y = at::empty_like(a);
  auto bits = empty_bits(n, a);
  const uint8_t* kp = k8.data_ptr<uint8_t>();
  uint8_t* bp = bits.data_ptr<uint8_t>();
  const float s = static_cast<float>(scale);
  with_storage(a, y, [&](const auto* ap, auto* yp) {
    using TO = std::remove_pointer_t<decltype(yp)>;
    at::parallel_for(0, (n + 15) / 16, kGrainGroups, [&](int64_t g0, int64_t g1) {
      const int64_t end = std::min(g1 * 16, n);
      for (int64_t i = g0 * 16; i < end; i += 8) {
        uint8_t byte = 0;
        const int64_t m = std::min<int64_t>(8, end - i);
        for (int64_t k = 0; k < m; ++k) {
          const uint8_t on = kp[i + k] != 0;
          yp[i + k] = from_f32<TO>(to_f32(ap[i + k]) * (s * static_cast<float>(on)));
          byte |= static_cast<uint8_t>(on << k);
        }
        bp[i / 8] = byte;
      }
    });
  });
  return {y, bits};
}

}  // namespace gradreg
