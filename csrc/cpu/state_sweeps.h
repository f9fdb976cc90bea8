// The two later-pass sweeps of a smooth activation whose σ', σ'' are recomputed from one
// kept tensor (its output y in smooth_output.cpp, its pre-activation z in smooth.cpp):
//   chain / backward:  out = σ' ⊙ t (+ s)
//   tangent:           (σ' ⊙ r, σ'' ⊙ u ⊙ r)
// `derivs` maps one kept value to a struct with fields d1 = σ' and d2 = σ''.
#pragma once

#include <ATen/Parallel.h>

#include <tuple>

#include "kernels.h"

namespace gradreg {

constexpr int64_t kStateSweepGrain = 8192;

// Each instantiation stays a function of its own (one loop pair per activation kind).
#if defined(__GNUC__)
#define GRADREG_OWN_FUNCTION __attribute__((noinline))
#else
#define GRADREG_OWN_FUNCTION
#endif

inline void check_state_operand(const at::Tensor& kept, const at::Tensor& t, const char* what) {
  check_f32(t, what);
  TORCH_CHECK(t.numel() == kept.numel(), what, ": operand sizes differ (", t.numel(), " vs ",
              kept.numel(), ")");
}

template <typename Derivs>
GRADREG_OWN_FUNCTION at::Tensor state_mul_add(const at::Tensor& kept, const at::Tensor& t,
                                         const c10::optional<at::Tensor>& s, Derivs derivs,
                                         const char* what) {
  check_f32(kept, what);
  check_state_operand(kept, t, what);
  if (s.has_value()) check_state_operand(kept, *s, what);
  auto out = at::empty_like(t);
  const float *kp = kept.data_ptr<float>(), *tp = t.data_ptr<float>();
  const float* sp = s.has_value() ? s->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, kept.numel(), kStateSweepGrain, [&](int64_t i0, int64_t i1) {
    if (sp) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        const auto d = derivs(kp[i]);
        op[i] = d.d1 * tp[i] + sp[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        const auto d = derivs(kp[i]);
        op[i] = d.d1 * tp[i];
      }
    }
  });
  return out;
}

template <typename Derivs>
GRADREG_OWN_FUNCTION std::tuple<at::Tensor, at::Tensor> state_tangent(
    const at::Tensor& kept, const at::Tensor& r, const at::Tensor& u, Derivs derivs,
    const char* what) {
  check_f32(kept, what);
  check_state_operand(kept, r, what);
  check_state_operand(kept, u, what);
  auto out = at::empty_like(r), s = at::empty_like(r);
  const float *kp = kept.data_ptr<float>(), *rp = r.data_ptr<float>(), *up = u.data_ptr<float>();
  float *op = out.data_ptr<float>(), *sp = s.data_ptr<float>();
  at::parallel_for(0, kept.numel(), kStateSweepGrain, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const auto d = derivs(kp[i]);
      op[i] = d.d1 * rp[i];
      sp[i] = d.d2 * up[i] * rp[i];
    }
  });
  return {out, s};
}

}  // namespace gradreg
