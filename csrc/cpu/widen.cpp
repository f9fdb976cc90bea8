// widened_sum: a + b as a new float32 tensor, each operand float32 or bf16 (read widened).
// Under CPU autocast a Linear's weight gradient is the sum of two bf16 products (the tangent
// pass's dᵀ r and the backward's z̄ᵀ a); this one sweep gives the float32 gradient, where a
// cast and an add would pass over the gradient three times.
#include <ATen/Parallel.h>

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

}  // namespace

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
