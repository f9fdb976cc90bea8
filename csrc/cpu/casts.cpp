// The dtype conversions of a CPU autocast step, each fused with the sweep that needs it:
//   widened_sum:          a + b as a new float32 tensor, each operand float32 or bf16. A
//                         Linear's weight gradient is the sum of two bf16 products (the
//                         tangent pass's dᵀ r and the backward's z̄ᵀ a); one sweep gives the
//                         float32 gradient, where a cast and an add would pass over it 3 times.
//   narrowed_all_finite:  bf16 copies of float32 tensors (the weights the products read) and
//                         whether every value is finite (the parameter check), in one read.
//   widened / narrow_into: one tensor's float32 copy of bf16 values / bf16 copy of float32
//                         values into a given contiguous block (a Linear chain's gradient
//                         and input); AVX-512 sweeps, where ATen's conversion copy runs its
//                         AVX2 kernel at several times their cost inside a step.
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "chunks.h"
#include "kernels.h"
#include "lanes.h"

namespace gradreg {

namespace {

constexpr int64_t kGrain = 1 << 14;

template <typename TA, typename TB>
void sum_sweep(const TA* __restrict a, const TB* __restrict b, float* __restrict out,
               int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) out[i] = to_f32(a[i]) + to_f32(b[i]);
  });
}

// dst = bf16(src) over [b, e), and Σ (v − v) (NaN as soon as one value is not finite)
float narrow_range(const float* __restrict src, bf16* __restrict dst, int64_t b, int64_t e) {
  float s = 0.f;
  int64_t i = b;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= e; i += 16) {
    const __m512 v = _mm512_loadu_ps(src + i);
    acc = _mm512_add_ps(acc, _mm512_sub_ps(v, v));
    store16(dst + i, v);
  }
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < e; ++i) {
    s += src[i] - src[i];
    dst[i] = from_f32<bf16>(src[i]);
  }
  return s;
}

void widen_range(const bf16* __restrict src, float* __restrict dst, int64_t b, int64_t e) {
  int64_t i = b;
#if defined(__AVX512F__)
  for (; i + 16 <= e; i += 16) store16(dst + i, load16(src + i));
#endif
  for (; i < e; ++i) dst[i] = to_f32(src[i]);
}

}  // namespace

at::Tensor widened(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(),
              "widened: t must be a contiguous bf16 CPU tensor");
  auto out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const bf16* sp = t.const_data_ptr<bf16>();
  float* dp = out.mutable_data_ptr<float>();
  at::parallel_for(0, t.numel(), kGrain,
                   [&](int64_t b, int64_t e) { widen_range(sp, dp, b, e); });
  return out;
}

bool narrow_into(const at::Tensor& src, at::Tensor& dst) {
  check_f32(src, "src");
  TORCH_CHECK(dst.scalar_type() == at::kBFloat16 && dst.is_contiguous() &&
                  dst.numel() == src.numel(),
              "narrow_into: dst must be a contiguous bf16 tensor of src's size");
  const float* sp = src.const_data_ptr<float>();
  bf16* dp = dst.mutable_data_ptr<bf16>();
  const double s = chunked_sum(src.numel(), kGrain, [sp, dp](int64_t b, int64_t e) {
    return static_cast<double>(narrow_range(sp, dp, b, e));
  });
  return !std::isnan(s);
}

std::tuple<std::vector<at::Tensor>, bool> narrowed_all_finite(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  bool finite = true;
  for (const auto& t : ts) {
    check_f32(t, "t");
    auto c = at::empty(t.sizes(), t.options().dtype(at::kBFloat16));
    finite = narrow_into(t, c) && finite;
    out.push_back(c);
  }
  return {out, finite};
}

at::Tensor widened_sum(const at::Tensor& a, const at::Tensor& b) {
  check_f32_or_bf16(a, "a");
  check_f32_or_bf16(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes(), "widened_sum: operand shapes differ (", a.sizes(), " vs ",
              b.sizes(), ")");
  auto out = at::empty(a.sizes(), a.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  with_values(a, [&](const auto* ap) {
    with_values(b, [&](const auto* bp) { sum_sweep(ap, bp, op, a.numel()); });
  });
  return out;
}

}  // namespace gradreg
