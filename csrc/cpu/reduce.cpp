// Whole-tensor reductions of the step's scalars, in one sweep each with no temporary:
//   sum_squares: Σ t² (the penalty ‖g‖² summed over the batch), accumulated in double;
//   all_finite:  whether no value is NaN or ±inf (the input check), as Σ (t − t), which is
//                0 for finite values and NaN as soon as one value is not;
//   all_finite_many: the same over a list of small tensors (the parameters) in one call and
//                one thread (a task per tensor would cost more than its sweep).
// sum_squares and all_finite read float32 or bf16 (an autocast step's g), summing in float.
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "chunks.h"
#include "kernels.h"
#include "lanes.h"

namespace gradreg {
namespace {

constexpr int64_t kGrain = 1 << 16;  // values per task: below, one thread sweeps it all


}  // namespace

// Σ term(t) over [b, e) (term: t² or t − t): float32 in a simd loop; bf16 widened 16 lanes
// at a time (lanes.h: the element-wise widening does not vectorize inside a reduction).
// term takes a float or a 16-lane vector (GCC vector arithmetic serves both).
template <typename T, typename Term>
float sum_range(const T* __restrict p, int64_t b, int64_t e, Term term) {
  float s = 0.f;
  int64_t i = b;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, bf16>) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; i + 32 <= e; i += 32) {
      acc0 += term(load16(p + i));
      acc1 += term(load16(p + i + 16));
    }
    s = _mm512_reduce_add_ps(acc0 + acc1);
  }
#endif
#pragma omp simd reduction(+ : s)
  for (int64_t j = i; j < e; ++j) s += term(to_f32(p[j]));
  return s;
}

// Σ term(t) over the whole tensor, float sums per chunk added in double
template <typename Term>
double tensor_sum(const at::Tensor& t, Term term) {
  check_f32_or_bf16(t, "t");
  return with_values(t, [&](const auto* p) {
    return chunked_sum(t.numel(), kGrain, [p, term](int64_t b, int64_t e) {
      return static_cast<double>(sum_range(p, b, e, term));
    });
  });
}

at::Tensor sum_squares(const at::Tensor& t) {
  const double total = tensor_sum(t, [](auto v) { return v * v; });
  return at::scalar_tensor(total, t.options().dtype(at::kFloat));
}

bool all_finite(const at::Tensor& t) {
  return !std::isnan(tensor_sum(t, [](auto v) { return v - v; }));
}

bool all_finite_many(const std::vector<at::Tensor>& ts) {
  float s = 0.f;
  for (const auto& t : ts) {
    check_f32(t, "t");
    const float* p = t.data_ptr<float>();
    const int64_t n = t.numel();
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += p[i] - p[i];
  }
  return !std::isnan(s);
}

}  // namespace gradreg
