// The two later-pass sweeps of a smooth activation whose σ', σ'' are recomputed from one
// kept tensor (its output y in smooth_output.cpp, its pre-activation z in smooth.cpp):
//   chain / backward:  out = σ' ⊙ t (+ s)
//   tangent:           (σ' ⊙ r, σ'' ⊙ u ⊙ r)
// `derivs` maps one kept value to a struct with fields d1 = σ' and d2 = σ''.
// All operands and results share the kept tensor's dtype: float32, or bf16 under CPU autocast
// (read widened, computed in float32, stored rounded: lanes.h).
#pragma once

#include <ATen/Parallel.h>

#include <tuple>
#include <type_traits>

#include "kernels.h"
#include "lanes.h"

namespace gradreg {

constexpr int64_t kStateSweepGrain = 8192;

// Each instantiation stays a function of its own (one loop pair per activation kind).
#if defined(__GNUC__)
#define GRADREG_OWN_FUNCTION __attribute__((noinline))
#else
#define GRADREG_OWN_FUNCTION
#endif

inline void check_state_operand(const at::Tensor& kept, const at::Tensor& t, const char* what) {
  check_f32_or_bf16(t, what);
  TORCH_CHECK(t.scalar_type() == kept.scalar_type(), what, ": operand dtype ", t.scalar_type(),
              " differs from the kept tensor's ", kept.scalar_type());
  TORCH_CHECK(t.numel() == kept.numel(), what, ": operand sizes differ (", t.numel(), " vs ",
              kept.numel(), ")");
}

template <typename T, typename Derivs>
GRADREG_OWN_FUNCTION void mul_add_sweep(const T* __restrict kp, const T* __restrict tp,
                                        const T* __restrict sp, T* __restrict op, int64_t n,
                                        Derivs derivs) {
  at::parallel_for(0, n, kStateSweepGrain, [&](int64_t i0, int64_t i1) {
    if (sp) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        const auto d = derivs(to_f32(kp[i]));
        op[i] = from_f32<T>(d.d1 * to_f32(tp[i]) + to_f32(sp[i]));
      }
    } else {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        const auto d = derivs(to_f32(kp[i]));
        op[i] = from_f32<T>(d.d1 * to_f32(tp[i]));
      }
    }
  });
}

// out: where the result goes (a contiguous block of a buffer), or undefined: a new tensor
template <typename Derivs>
at::Tensor state_mul_add(const at::Tensor& kept, const at::Tensor& t,
                         const c10::optional<at::Tensor>& s, Derivs derivs, const char* what,
                         at::Tensor out = at::Tensor()) {
  check_f32_or_bf16(kept, what);
  check_state_operand(kept, t, what);
  if (s.has_value()) check_state_operand(kept, *s, what);
  if (out.defined()) {
    check_state_operand(kept, out, what);
  } else {
    out = at::empty_like(t);
  }
  with_values(kept, [&](const auto* kp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    mul_add_sweep<T>(kp, t.const_data_ptr<T>(),
                     s.has_value() ? s->const_data_ptr<T>() : nullptr,
                     out.mutable_data_ptr<T>(), kept.numel(), derivs);
  });
  return out;
}

template <typename T, typename Derivs>
GRADREG_OWN_FUNCTION void tangent_sweep(const T* __restrict kp, const T* __restrict rp,
                                        const T* __restrict up, T* __restrict op,
                                        T* __restrict sp, int64_t n, Derivs derivs) {
  at::parallel_for(0, n, kStateSweepGrain, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const auto d = derivs(to_f32(kp[i]));
      const float r = to_f32(rp[i]);
      op[i] = from_f32<T>(d.d1 * r);
      sp[i] = from_f32<T>(d.d2 * to_f32(up[i]) * r);
    }
  });
}

template <typename Derivs>
std::tuple<at::Tensor, at::Tensor> state_tangent(const at::Tensor& kept, const at::Tensor& r,
                                                 const at::Tensor& u, Derivs derivs,
                                                 const char* what,
                                                 at::Tensor out = at::Tensor()) {
  check_f32_or_bf16(kept, what);
  check_state_operand(kept, r, what);
  check_state_operand(kept, u, what);
  if (out.defined()) {
    check_state_operand(kept, out, what);
  } else {
    out = at::empty_like(r);
  }
  auto s = at::empty_like(r);
  with_values(kept, [&](const auto* kp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    tangent_sweep<T>(kp, r.const_data_ptr<T>(), u.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
                     s.mutable_data_ptr<T>(), kept.numel(), derivs);
  });
  return {out, s};
}

}  // namespace gradreg
