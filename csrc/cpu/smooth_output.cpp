// Smooth activations whose derivatives are functions of their output y = σ(z), so that the
// passes keep y (which the next layer keeps anyway) instead of σ'(z) and σ''(z):
//   softplus (β > 0):  s = 1 − e^{−βy} = sigmoid(βz),  σ' = s,       σ'' = β s (1 − s)
//                      (σ' = 1, σ'' = 0 in torch's linear region βy > threshold)
//   tanh:              σ' = 1 − y²,                    σ'' = −2 y σ'
//   sigmoid:           σ' = y (1 − y),                 σ'' = σ' (1 − 2y)
//   elu (α > 0):       y > 0: σ' = 1, σ'' = 0;  else σ' = σ'' = y + α  (= α e^z)
// Kind codes: csrc/common/activation_codes.h (gradreg_kernels/activation_table.py).
#include <ATen/Parallel.h>

#include "../common/activation_codes.h"
#include "fastmath.h"
#include "kernels.h"
#include "state_sweeps.h"

namespace gradreg {
namespace {

using namespace act_code;  // the activation codes (activation_codes.h, from the Python table)

struct D12 {
  float d1, d2;
};

// 1 − e^{−x} for x ≥ 0 with its relative accuracy kept near 0 (where 1 − e^{−x} cancels):
// the series x (1 − x/2 + x²/6 − x³/24 + x⁴/120) below 0.1, as a select so loops vectorize.
GRADREG_ELEMENT float one_minus_exp_neg(float x) {
  const float series = x * (1.f - x * (0.5f - x * (1.f / 6.f - x * (1.f / 24.f - x / 120.f))));
  const float direct = 1.f - fast_exp(-x);
  return x < 0.1f ? series : direct;
}

GRADREG_ELEMENT D12 softplus_d(float y, float beta, float threshold) {
  const float by = beta * y;
  const float s = one_minus_exp_neg(by);
  const float lin = static_cast<float>(by > threshold);
  return {lin + (1.f - lin) * s, (1.f - lin) * beta * s * (1.f - s)};
}

GRADREG_ELEMENT D12 tanh_d(float y) {
  const float g = 1.f - y * y;
  return {g, -2.f * y * g};
}

GRADREG_ELEMENT D12 sigmoid_d(float y) {
  const float g = y * (1.f - y);
  return {g, g * (1.f - 2.f * y)};
}

GRADREG_ELEMENT D12 elu_d(float y, float alpha) {
  const float neg = static_cast<float>(!(y > 0.f));
  const float e = neg * (y + alpha);
  return {(1.f - neg) + e, e};
}

// Runs body(derivs) with derivs the kind's y ↦ (σ', σ'') functor (one loop instance per kind).
template <typename Body>
void with_kind(int64_t kind, double p0, double p1, const char* what, Body&& body) {
  const float a = static_cast<float>(p0), b = static_cast<float>(p1);
  switch (kind) {
    case kSoftplus:
      body([=](float y) GRADREG_ELEMENT_LAMBDA { return softplus_d(y, a, b); });
      break;
    case kTanh: body([](float y) GRADREG_ELEMENT_LAMBDA { return tanh_d(y); }); break;
    case kSigmoid: body([](float y) GRADREG_ELEMENT_LAMBDA { return sigmoid_d(y); }); break;
    case kElu: body([=](float y) GRADREG_ELEMENT_LAMBDA { return elu_d(y, a); }); break;
    default: TORCH_CHECK(false, what, ": no derivatives from the output for kind ", kind);
  }
}

}  // namespace

at::Tensor output_mul_add(const at::Tensor& y, const at::Tensor& t,
                          const c10::optional<at::Tensor>& s, int64_t kind, double p0,
                          double p1) {
  // σ'(y) ⊙ t (+ s): the chain and the backward step
  at::Tensor out;
  with_kind(kind, p0, p1, "output_mul_add",
            [&](auto derivs) { out = state_mul_add(y, t, s, derivs, "output_mul_add"); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> output_tangent(const at::Tensor& y, const at::Tensor& r,
                                                  const at::Tensor& u, int64_t kind, double p0,
                                                  double p1) {
  // (σ'(y) ⊙ r, σ''(y) ⊙ u ⊙ r)
  std::tuple<at::Tensor, at::Tensor> out;
  with_kind(kind, p0, p1, "output_tangent",
            [&](auto derivs) { out = state_tangent(y, r, u, derivs, "output_tangent"); });
  return out;
}

void output_mul_add_into(const at::Tensor& y, const at::Tensor& t,
                         const c10::optional<at::Tensor>& s, int64_t kind, double p0, double p1,
                         at::Tensor& out) {
  with_kind(kind, p0, p1, "output_mul_add",
            [&](auto derivs) { state_mul_add(y, t, s, derivs, "output_mul_add", out); });
}

at::Tensor output_tangent_into(const at::Tensor& y, const at::Tensor& r, const at::Tensor& u,
                               int64_t kind, double p0, double p1, at::Tensor& out) {
  at::Tensor s;
  with_kind(kind, p0, p1, "output_tangent", [&](auto derivs) {
    s = std::get<1>(state_tangent(y, r, u, derivs, "output_tangent", out));
  });
  return s;
}

}  // namespace gradreg
