// Smooth activations: one forward sweep gives σ(z), σ'(z), σ''(z); later passes need only
// products: chain σ'⊙d, tangent (σ'⊙r, σ''⊙u⊙r), backward σ'⊙ā + s. smooth_value gives σ(z)
// alone, for the kinds whose derivatives come from the output (smooth_output.cpp) or are
// recomputed from the kept z in each later sweep (z_mul_add, z_tangent: SiLU, whose σ', σ''
// cost one exp, so one kept tensor replaces two). Kind codes follow
// gradreg_kernels/backends/cpu.py; derivatives follow rules/activation_math.py.
#include <ATen/Parallel.h>

#include <cmath>

#include "fastmath.h"
#include "kernels.h"
#include "state_sweeps.h"

namespace gradreg {
namespace {

constexpr int64_t kGrain = 8192;
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluC = 0.044715f;

enum Kind : int64_t {
  kSoftplus = 0, kTanh = 1, kSigmoid = 2, kGelu = 3, kGeluTanh = 4, kElu = 5, kSilu = 6
};

struct Derivs {
  float v, d1, d2;
};

// Branch-free forms (signs of z are random, so a branch per element would mispredict).
inline float sigmoid_of(float x) { return 1.f / (1.f + fast_exp(-x)); }

inline Derivs softplus(float z, float beta, float threshold) {
  const float bz = z * beta;
  const float s = sigmoid_of(bz);
  const float v = (max_f(bz, 0.f) + fast_log1p(fast_exp(-std::fabs(bz)))) / beta;
  const float lin = static_cast<float>(bz > threshold);  // torch's linear region
  return {lin * z + (1.f - lin) * v, lin + (1.f - lin) * s, (1.f - lin) * beta * s * (1.f - s)};
}

// tanh x and 1 − tanh² x from E = e^{2x}: t = (E − 1)/(E + 1), 1 − t² = 4E/(E + 1)²
// (no cancellation where |t| → 1); |2x| is clamped at 40, where t = ±1 in float.
struct TanhPair {
  float t, g;
};

inline TanhPair tanh_pair(float x) {
  const float e = fast_exp(min_f(max_f(2.f * x, -40.f), 40.f));
  const float inv = 1.f / (e + 1.f);
  return {(e - 1.f) * inv, 4.f * e * inv * inv};
}

inline Derivs tanh_(float z) {
  const TanhPair p = tanh_pair(z);
  return {p.t, p.g, -2.f * p.t * p.g};
}

inline Derivs sigmoid(float z) {
  const float s = sigmoid_of(z);
  const float g = s * (1.f - s);
  return {s, g, g * (1.f - 2.f * s)};
}

inline Derivs gelu(float z) {
  const float cdf = 0.5f * (1.f + std::erf(z * kInvSqrt2));
  const float pdf = fast_exp(-0.5f * z * z) * kInvSqrt2Pi;
  return {z * cdf, cdf + z * pdf, pdf * (2.f - z * z)};
}

inline Derivs gelu_tanh(float z) {
  const TanhPair p = tanh_pair(kSqrt2OverPi * (z + kGeluC * z * z * z));
  const float t = p.t, g = p.g;
  const float du = kSqrt2OverPi * (1.f + 3.f * kGeluC * z * z);
  const float ddu = 6.f * kSqrt2OverPi * kGeluC * z;
  return {0.5f * z * (1.f + t), 0.5f * (1.f + t) + 0.5f * z * g * du,
          g * (du + 0.5f * z * (ddu - 2.f * t * du * du))};
}

inline Derivs elu(float z, float alpha) {
  const float pos = static_cast<float>(z > 0.f);
  const float e = alpha * fast_exp(min_f(z, 0.f));
  return {pos * z + (1.f - pos) * (e - alpha), pos + (1.f - pos) * e, (1.f - pos) * e};
}

// σ = z s, s = sigmoid(z): σ' = s + z s (1 − s), σ'' = s (1 − s) (2 + z (1 − 2 s))
inline Derivs silu(float z) {
  const float s = sigmoid_of(z);
  const float g = s * (1.f - s);
  return {z * s, s + z * g, g * (2.f + z * (1.f - 2.f * s))};
}

template <typename F>
void sweep(const float* z, float* y, float* d1, float* d2, int64_t n, F f) {
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    const float* __restrict zr = z;
    float* __restrict yw = y;
    float* __restrict a = d1;
    float* __restrict b = d2;
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const Derivs r = f(zr[i]);
      yw[i] = r.v;
      a[i] = r.d1;
      b[i] = r.d2;
    }
  });
}

template <typename F>
void value_sweep(const float* z, float* y, int64_t n, F f) {
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    const float* __restrict zr = z;
    float* __restrict yw = y;
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) yw[i] = f(zr[i]).v;  // the derivatives are dead code
  });
}

// Runs body(f) with f the kind's z ↦ (σ, σ', σ'') functor (one loop instance per kind).
template <typename Body>
void with_kind(int64_t kind, double p0, double p1, const char* what, Body&& body) {
  const float a = static_cast<float>(p0), b = static_cast<float>(p1);
  switch (kind) {
    case kSoftplus: body([=](float v) { return softplus(v, a, b); }); break;
    case kTanh: body([](float v) { return tanh_(v); }); break;
    case kSigmoid: body([](float v) { return sigmoid(v); }); break;
    case kGelu: body([](float v) { return gelu(v); }); break;
    case kGeluTanh: body([](float v) { return gelu_tanh(v); }); break;
    case kElu: body([=](float v) { return elu(v, a); }); break;
    case kSilu: body([](float v) { return silu(v); }); break;
    default: TORCH_CHECK(false, what, ": unknown activation kind ", kind);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> smooth_forward(const at::Tensor& z,
                                                              int64_t kind, double p0,
                                                              double p1) {
  check_f32(z, "z");
  auto y = at::empty_like(z), d1 = at::empty_like(z), d2 = at::empty_like(z);
  const float* zp = z.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *p1p = d1.data_ptr<float>(), *p2p = d2.data_ptr<float>();
  with_kind(kind, p0, p1, "smooth_forward",
            [&](auto f) { sweep(zp, yp, p1p, p2p, z.numel(), f); });
  return {y, d1, d2};
}

at::Tensor smooth_value(const at::Tensor& z, int64_t kind, double p0, double p1) {
  check_f32(z, "z");
  auto y = at::empty_like(z);
  const float* zp = z.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  with_kind(kind, p0, p1, "smooth_value", [&](auto f) { value_sweep(zp, yp, z.numel(), f); });
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

std::tuple<at::Tensor, at::Tensor> smooth_tangent(const at::Tensor& d1, const at::Tensor& d2,
                                                  const at::Tensor& r, const at::Tensor& u) {
  // out = σ' ⊙ r,  s = σ'' ⊙ u ⊙ r
  for (auto* t : {&d1, &d2, &r, &u}) check_f32(*t, "smooth_tangent operand");
  const int64_t n = r.numel();
  TORCH_CHECK(d1.numel() == n && d2.numel() == n && u.numel() == n,
              "smooth_tangent: operand sizes differ");
  auto out = at::empty_like(r), s = at::empty_like(r);
  const float *a = d1.data_ptr<float>(), *b = d2.data_ptr<float>();
  const float *rp = r.data_ptr<float>(), *up = u.data_ptr<float>();
  float *op = out.data_ptr<float>(), *sp = s.data_ptr<float>();
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      op[i] = a[i] * rp[i];
      sp[i] = b[i] * up[i] * rp[i];
    }
  });
  return {out, s};
}

at::Tensor mul_add(const at::Tensor& d1, const at::Tensor& t, const c10::optional<at::Tensor>& s) {
  // out = d1 ⊙ t (+ s)
  check_f32(d1, "d1");
  check_f32(t, "t");
  const int64_t n = t.numel();
  TORCH_CHECK(d1.numel() == n, "mul_add: operand sizes differ");
  auto out = at::empty_like(t);
  const float *a = d1.data_ptr<float>(), *tp = t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* sp = nullptr;
  if (s.has_value()) {
    check_f32(*s, "s");
    TORCH_CHECK(s->numel() == n, "mul_add: operand sizes differ");
    sp = s->data_ptr<float>();
  }
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    if (sp) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) op[i] = a[i] * tp[i] + sp[i];
    } else {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) op[i] = a[i] * tp[i];
    }
  });
  return out;
}

}  // namespace gradreg
