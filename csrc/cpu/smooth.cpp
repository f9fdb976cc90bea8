// Smooth activations whose σ', σ'' are recomputed from the pre-activation z, which the passes
// keep: smooth_value gives σ(z); z_mul_add (chain σ'⊙d, backward σ'⊙ā + s) and z_tangent
// (σ'⊙r, σ''⊙u⊙r) recompute σ'(z), σ''(z) inside their sweep (one exp each, or an exp and a
// log1p for Softplus). One kept tensor instead of σ' and σ'' from the forward, and each later
// sweep reads one operand less: at B = 256 the MLP step is as fast or faster that way. The
// kinds whose σ', σ'' are functions of the output keep y instead (smooth_output.cpp). Kind
// codes: csrc/common/activation_codes.h (gradreg_kernels/activation_table.py); derivatives follow rules/activation_math.py.
#include <ATen/Parallel.h>

#include <cmath>

#include "../common/activation_codes.h"
#include "fastmath.h"
#include "kernels.h"
#include "lanes.h"
#include "state_sweeps.h"

namespace gradreg {
namespace {

constexpr int64_t kGrain = 8192;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluC = 0.044715f;

using namespace act_code;  // the activation codes (activation_codes.h, from the Python table)

struct Derivs {
  float v, d1, d2;
};

// Branch-free forms (signs of z are random, so a branch per element would mispredict).
GRADREG_ELEMENT float sigmoid_of(float x) { return 1.f / (1.f + fast_exp(-x)); }

GRADREG_ELEMENT Derivs softplus(float z, float beta, float threshold) {
  const float bz = z * beta;
  const float s = sigmoid_of(bz);
  const float v = (max_f(bz, 0.f) + fast_log1p(fast_exp(-std::fabs(bz)))) / beta;
  const float lin = static_cast<float>(bz > threshold);  // torch's linear region
  return {lin * z + (1.f - lin) * v, lin + (1.f - lin) * s, (1.f - lin) * beta * s * (1.f - s)};
}

// tanh x and 1 − tanh² x from E = e^{2x}: t = (E − 1)/(E + 1), 1 − t² = 4E/(E + 1)²
// (no cancellation where |t| → 1); |2x| is clamped at 40, where t = ±1 in float and
// 1 − t² is 0 as torch computes it (so that z (1 − t²) vanishes at huge z, as torch's).
struct TanhPair {
  float t, g;
};

GRADREG_ELEMENT TanhPair tanh_pair(float x) {
  const float e = fast_exp(min_f(max_f(2.f * x, -40.f), 40.f));
  const float inv = 1.f / (e + 1.f);
  const float g = std::fabs(x) >= 20.f ? 0.f : 4.f * e * inv * inv;
  return {(e - 1.f) * inv, g};
}

GRADREG_ELEMENT Derivs tanh_(float z) {
  const TanhPair p = tanh_pair(z);
  return {p.t, p.g, -2.f * p.t * p.g};
}

GRADREG_ELEMENT Derivs sigmoid(float z) {
  const float s = sigmoid_of(z);
  const float g = s * (1.f - s);
  return {s, g, g * (1.f - 2.f * s)};
}

GRADREG_ELEMENT Derivs gelu(float z) {
  const NormalCdfPdf n = fast_normal_cdf_pdf(z);  // vectorizes, unlike std::erf
  return {z * n.cdf, n.cdf + z * n.pdf, n.pdf * (2.f - z * z)};
}

GRADREG_ELEMENT Derivs gelu_tanh(float z) {
  const TanhPair p = tanh_pair(kSqrt2OverPi * (z + kGeluC * z * z * z));
  const float t = p.t, g = p.g;
  const float du = kSqrt2OverPi * (1.f + 3.f * kGeluC * z * z);
  const float ddu = 6.f * kSqrt2OverPi * kGeluC * z;
  // g (z ...) first: where g = 0 the products stay 0 until du itself overflows (torch: NaN)
  const float gz = g * z;
  return {0.5f * z * (1.f + t), 0.5f * (1.f + t) + 0.5f * gz * du,
          g * du + 0.5f * gz * ddu - gz * t * du * du};
}

GRADREG_ELEMENT Derivs elu(float z, float alpha) {
  const float pos = static_cast<float>(z > 0.f);
  const float e = alpha * fast_exp(min_f(z, 0.f));
  return {pos * z + (1.f - pos) * (e - alpha), pos + (1.f - pos) * e, (1.f - pos) * e};
}

// σ = z s, s = sigmoid(z): σ' = s + z s (1 − s), σ'' = s (1 − s) (2 + z (1 − 2 s))
GRADREG_ELEMENT Derivs silu(float z) {
  const float s = sigmoid_of(z);
  const float g = s * (1.f - s);
  return {z * s, s + z * g, g * (2.f + z * (1.f - 2.f * s))};
}

// σ = z t, t = tanh(softplus(z)), s = sigmoid(z), g = 1 − t²:
// σ' = t + z s g, σ'' = s g (2 + z (1 − s − 2 t s)).
// All from w = e^z, with no log and no cancellation: (1 + w)² = n + 1 for n = w (w + 2), so
// t = n/(n + 2), g = 4 (n + 1)/(n + 2)², s = w/(1 + w); for z above 20, t = s = 1 in float and
// g ≈ 4 e^{−2z} is below 2e-17 and taken as 0, as torch's 1 − t² is (w is clamped there so
// that n stays finite).
GRADREG_ELEMENT Derivs mish(float z) {
  const float w = fast_exp(min_f(z, 20.f));
  const float n = w * (w + 2.f);
  const float inv = 1.f / (n + 2.f);
  const float t = n * inv;
  const float g = z > 20.f ? 0.f : 4.f * (n + 1.f) * inv * inv;
  const float s = w / (1.f + w);
  const float sg = s * g;
  return {z * t, t + z * sg, sg * (2.f + z * (1.f - s - 2.f * t * s))};
}

// σ = z relu6(z + 3)/6: σ' = 0 below −3, z/3 + 1/2 on [−3, 3] (torch's convention at both
// ends), 1 above; σ'' = 1/3 strictly inside (−3, 3)
GRADREG_ELEMENT Derivs hardswish(float z) {
  const float lo = static_cast<float>(z < -3.f), hi = static_cast<float>(z > 3.f);
  const float mid = 1.f - lo - hi;
  const float inside = static_cast<float>(z > -3.f) * static_cast<float>(z < 3.f);
  return {hi * z + mid * z * (z + 3.f) * (1.f / 6.f), hi + mid * (z * (1.f / 3.f) + 0.5f),
          inside * (1.f / 3.f)};
}

template <typename T, typename F>
void value_sweep(const T* z, T* y, int64_t n, F f) {
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    const T* __restrict zr = z;
    T* __restrict yw = y;
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      yw[i] = from_f32<T>(f(to_f32(zr[i])).v);  // the derivatives are dead code
    }
  });
}

// Runs body(f) with f the kind's z ↦ (σ, σ', σ'') functor (one loop instance per kind).
template <typename Body>
void with_kind(int64_t kind, double p0, double p1, const char* what, Body&& body) {
  const float a = static_cast<float>(p0), b = static_cast<float>(p1);
  switch (kind) {
    case kSoftplus: body([=](float v) GRADREG_ELEMENT_LAMBDA { return softplus(v, a, b); }); break;
    case kTanh: body([](float v) GRADREG_ELEMENT_LAMBDA { return tanh_(v); }); break;
    case kSigmoid: body([](float v) GRADREG_ELEMENT_LAMBDA { return sigmoid(v); }); break;
    case kGelu: body([](float v) GRADREG_ELEMENT_LAMBDA { return gelu(v); }); break;
    case kGeluTanh: body([](float v) GRADREG_ELEMENT_LAMBDA { return gelu_tanh(v); }); break;
    case kElu: body([=](float v) GRADREG_ELEMENT_LAMBDA { return elu(v, a); }); break;
    case kSilu: body([](float v) GRADREG_ELEMENT_LAMBDA { return silu(v); }); break;
    case kMish: body([](float v) GRADREG_ELEMENT_LAMBDA { return mish(v); }); break;
    case kHardswish: body([](float v) GRADREG_ELEMENT_LAMBDA { return hardswish(v); }); break;
    default: TORCH_CHECK(false, what, ": unknown activation kind ", kind);
  }
}

}  // namespace

void smooth_value_into(const at::Tensor& z, int64_t kind, double p0, double p1, at::Tensor& y) {
  check_f32_or_bf16(z, "z");
  check_state_operand(z, y, "smooth_value's result");
  with_same_storage(z, y, [&](const auto* zp, auto* yp) {
    with_kind(kind, p0, p1, "smooth_value", [&](auto f) { value_sweep(zp, yp, z.numel(), f); });
  });
}

at::Tensor smooth_value(const at::Tensor& z, int64_t kind, double p0, double p1) {
  // y in z's dtype (float32, or bf16 under CPU autocast)
  check_f32_or_bf16(z, "z");
  auto y = at::empty_like(z);
  smooth_value_into(z, kind, p0, p1, y);
  return y;
}

at::Tensor z_mul_add(const at::Tensor& z, const at::Tensor& t, const c10::optional<at::Tensor>& s,
                     int64_t kind, double p0, double p1) {
  // σ'(z) ⊙ t (+ s), σ' recomputed from the kept pre-activation z (the chain and backward)
  at::Tensor out;
  with_kind(kind, p0, p1, "z_mul_add",
            [&](auto f) { out = state_mul_add(z, t, s, f, "z_mul_add"); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> z_tangent(const at::Tensor& z, const at::Tensor& r,
                                             const at::Tensor& u, int64_t kind, double p0,
                                             double p1) {
  // (σ'(z) ⊙ r, σ''(z) ⊙ u ⊙ r) from the kept pre-activation z
  std::tuple<at::Tensor, at::Tensor> out;
  with_kind(kind, p0, p1, "z_tangent",
            [&](auto f) { out = state_tangent(z, r, u, f, "z_tangent"); });
  return out;
}

void z_mul_add_into(const at::Tensor& z, const at::Tensor& t, const c10::optional<at::Tensor>& s,
                    int64_t kind, double p0, double p1, at::Tensor& out) {
  with_kind(kind, p0, p1, "z_mul_add",
            [&](auto f) { state_mul_add(z, t, s, f, "z_mul_add", out); });
}

at::Tensor z_tangent_into(const at::Tensor& z, const at::Tensor& r, const at::Tensor& u,
                          int64_t kind, double p0, double p1, at::Tensor& out) {
  at::Tensor s;
  with_kind(kind, p0, p1, "z_tangent",
            [&](auto f) { s = std::get<1>(state_tangent(z, r, u, f, "z_tangent", out)); });
  return s;
}

}  // namespace gradreg
