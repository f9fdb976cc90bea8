// Piecewise-linear steps with a packed bit mask: ReLU / LeakyReLU (σ' ∈ {1, slope}) and
// Dropout (m ∈ {0, 1/(1-p)}). Forward saves 1 bit per element; every later pass is
// out = t ⊙ (bit ? hi : lo) in one sweep.
#include <ATen/Parallel.h>

#include <cstring>

#include "kernels.h"

namespace gradreg {
namespace {

constexpr int64_t kGrainBytes = 2048;  // 16k elements per task

at::Tensor empty_bits(int64_t n, const at::Tensor& like) {
  return at::empty({(n + 7) / 8}, like.options().dtype(at::kByte));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mask_forward(const at::Tensor& z, double lo) {
  // y = z > 0 ? z : lo · z;  bit = z > 0
  check_f32(z, "z");
  const int64_t n = z.numel();
  auto y = at::empty_like(z);
  auto bits = empty_bits(n, z);
  const float* zp = z.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  uint8_t* bp = bits.data_ptr<uint8_t>();
  const float l = static_cast<float>(lo);
  at::parallel_for(0, (n + 7) / 8, kGrainBytes, [&](int64_t b0, int64_t b1) {
    const int64_t e1 = std::min(b1 * 8, n);
    for (int64_t i = b0 * 8; i < e1; ++i) {
      const float v = zp[i];
      yp[i] = v > 0.f ? v : l * v;
    }
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t byte = 0;
      const int64_t base = b * 8;
      const int64_t m = std::min<int64_t>(8, n - base);
      for (int64_t k = 0; k < m; ++k) byte |= static_cast<uint8_t>(zp[base + k] > 0.f) << k;
      bp[b] = byte;
    }
  });
  return {y, bits};
}

at::Tensor mask_apply(const at::Tensor& bits, const at::Tensor& t, double hi, double lo) {
  // out = t ⊙ (bit ? hi : lo)
  check_f32(t, "t");
  const int64_t n = t.numel();
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.numel() == (n + 7) / 8,
              "mask_apply: bit mask does not match a tensor of ", n, " elements");
  auto out = at::empty_like(t);
  const float* tp = t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const uint8_t* bp = bits.data_ptr<uint8_t>();
  const float h = static_cast<float>(hi), l = static_cast<float>(lo);
  at::parallel_for(0, (n + 7) / 8, kGrainBytes, [&](int64_t b0, int64_t b1) {
    const int64_t e1 = std::min(b1 * 8, n);
#pragma omp simd
    for (int64_t i = b0 * 8; i < e1; ++i) {
      const bool on = (bp[i >> 3] >> (i & 7)) & 1;
      op[i] = tp[i] * (on ? h : l);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dropout_forward(const at::Tensor& a, const at::Tensor& keep,
                                                   double scale) {
  // y = a ⊙ keep · scale; bit = keep (keep: a 0/1 tensor of a's shape, any integer/float)
  check_f32(a, "a");
  TORCH_CHECK(keep.numel() == a.numel(), "dropout_forward: keep mask size mismatch");
  auto k8 = keep.to(at::kByte).contiguous();
  const int64_t n = a.numel();
  auto y = at::empty_like(a);
  auto bits = empty_bits(n, a);
  const float* ap = a.data_ptr<float>();
  const uint8_t* kp = k8.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  uint8_t* bp = bits.data_ptr<uint8_t>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, (n + 7) / 8, kGrainBytes, [&](int64_t b0, int64_t b1) {
    const int64_t e1 = std::min(b1 * 8, n);
#pragma omp simd
    for (int64_t i = b0 * 8; i < e1; ++i) yp[i] = kp[i] ? ap[i] * s : 0.f;
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t byte = 0;
      const int64_t base = b * 8;
      const int64_t m = std::min<int64_t>(8, n - base);
      for (int64_t k = 0; k < m; ++k) byte |= static_cast<uint8_t>(kp[base + k] != 0) << k;
      bp[b] = byte;
    }
  });
  return {y, bits};
}

}  // namespace gradreg
