// Train-mode batch norm, fused per channel. Operands are viewed as (N, C, S) (S = 1 for
// BatchNorm1d on (N, C)); each channel's M = N·S values are reduced and written by one
// thread, a row of S contiguous values at a time (row sums in float, channel sums in double).
//   forward:  x̂ = (a − μ)/σ, σ = √(var + ε), y = γ x̂ + β
//   project:  P v = v − mean(v) − x̂ mean(x̂ v)   (and mean(x̂ v))
//   second:   s = −γ/σ² [x̂ mean(δ Pṙ) + mean(x̂ṙ) Pδ + mean(x̂δ) Pṙ]   (see rules/norm.py)
//   chain:    k P δ with k = γ/σ, and the channel means of δ and x̂δ (P δ is not stored)
//   tangent:  k P ṙ, s, and Σ δ Pṙ / σ per channel, from δ, ṙ, x̂ in two sweeps
//   backward: k P ā (+ s), Σ ā x̂ and Σ ā per channel
//   dot:      Σ a ⊙ b per channel (an affine's γ terms after the per-sample norms)
//   sum:      Σ t per channel (a convolution's bias gradient), in double
// Under CPU autocast the operands a, v, δ, ṙ may be bf16, and y, x̂ and k P(·) are written in
// the requested dtype (lanes.h: bf16, the dtype the next product reads), s in x̂'s; every
// sum and statistic is float32 (row sums) and double (channel sums).
#include <ATen/Parallel.h>
#include <ATen/ops/ones.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "lanes.h"

namespace gradreg {
namespace {

struct Layout {
  int64_t n, c, s;
  double count() const { return static_cast<double>(n * s); }
};

Layout layout_of(const at::Tensor& a) {
  TORCH_CHECK(a.dim() >= 2, "batch norm operand must have a channel dim 1");
  const int64_t n = a.size(0), c = a.size(1);
  return {n, c, c == 0 || n == 0 ? 0 : a.numel() / (n * c)};
}

at::Tensor chan_shaped(const at::Tensor& v, const at::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[1] = like.size(1);
  return v.view(shape);
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* what) {
  check_f32_or_bf16(t, what);
  TORCH_CHECK(t.sizes() == like.sizes(), "batch norm: ", what, " has shape ", t.sizes(),
              ", expected ", like.sizes());
}

// Calls f(offset of row n of channel c) for each of the N rows of channel c.
template <typename F>
inline void rows(const Layout& L, int64_t c, F f) {
  for (int64_t i = 0; i < L.n; ++i) f((i * L.c + c) * L.s);
}

// Runs f(c) for every channel, channels split over threads.
template <typename F>
inline void per_channel(const Layout& L, F f) {
  at::parallel_for(0, L.c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c);
  });
}

// Row reductions over contiguous runs, in plain functions on restrict pointers so that
// they vectorize as unit-stride loops.
template <typename T>
inline float sum1(const T* __restrict a, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += to_f32(a[j]);
  return s;
}

template <typename T>
inline float sum_sq_dev(const T* __restrict a, float m, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += (to_f32(a[j]) - m) * (to_f32(a[j]) - m);
  return s;
}

// The same sums accumulated in double, for a channel whose float row sums overflowed
// (values near float's range, as torch's own kernel, which accumulates in double, still
// normalizes): rare, so the fast float loops serve every other channel.
template <typename T>
inline double sum1_double(const T* __restrict a, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += to_f32(a[j]);
  return s;
}

template <typename T>
inline double sum_sq_dev_double(const T* __restrict a, double m, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += (to_f32(a[j]) - m) * (to_f32(a[j]) - m);
  return s;
}

template <typename T, typename TX>
inline void sum_and_dot(const T* __restrict v, const TX* __restrict x, int64_t n,
                        double& sv, double& sxv) {
  float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < n; ++j) {
    a += to_f32(v[j]);
    b += to_f32(x[j]) * to_f32(v[j]);
  }
  sv += a;
  sxv += b;
}

template <typename TU, typename TV>
inline float dot(const TU* __restrict u, const TV* __restrict v, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += to_f32(u[j]) * to_f32(v[j]);
  return s;
}

// a result shaped like `like` in `dtype` (None: float32)
at::Tensor result_like(const at::Tensor& like, c10::optional<at::ScalarType> dtype) {
  auto out = at::empty_like(like, like.options().dtype(dtype.value_or(at::kFloat)));
  check_f32_or_bf16(out, "batch norm result");
  return out;
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, int64_t c, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == c, what,
              " must be a contiguous float32 vector of one value per channel");
  return t->data_ptr<float>();
}

const float* chan_ptr(const at::Tensor& t, int64_t c, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == c, what,
              " must be a contiguous float32 vector of one value per channel");
  return t.data_ptr<float>();
}

// out = k (v − mean(v) − x̂ mean(x̂ v)) (+ s) per channel; writes Σ v and Σ x̂ v per channel.
// The sweep of the chain (v = δ) and of the backward (v = ā, plus the second-order term s).
at::Tensor scaled_project(const at::Tensor& v, const at::Tensor& xhat, const at::Tensor& k,
                          const c10::optional<at::Tensor>& s, at::Tensor& sum_v,
                          at::Tensor& sum_xv, c10::optional<at::ScalarType> out_dtype) {
  check_f32_or_bf16(xhat, "xhat");
  check_like(v, xhat, "v");
  if (s.has_value()) {
    check_like(*s, xhat, "s");
    TORCH_CHECK(s->scalar_type() == xhat.scalar_type(), "batch norm: s must be in x̂'s dtype");
  }
  const Layout L = layout_of(v);
  const float* kp = chan_ptr(k, L.c, "k");
  auto out = result_like(v, out_dtype);
  const auto f32 = xhat.options().dtype(at::kFloat);
  sum_v = at::empty({L.c}, f32);
  sum_xv = at::empty({L.c}, f32);
  float *sv = sum_v.data_ptr<float>(), *sxv = sum_xv.data_ptr<float>();
  with_storage(v, out, [&](const auto* vp, auto* op) {
  with_values(xhat, [&](const auto* xp) {
  using TO = std::remove_pointer_t<decltype(op)>;
  using TX = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
  const TX* spp = s.has_value() ? s->const_data_ptr<TX>() : nullptr;
  per_channel(L, [&](int64_t c) {
    double a = 0.0, ax = 0.0;
    rows(L, c, [&](int64_t o) { sum_and_dot(vp + o, xp + o, L.s, a, ax); });
    const float m = static_cast<float>(a / L.count());
    const float mx = static_cast<float>(ax / L.count());
    const float kc = kp[c];
    rows(L, c, [&](int64_t o) {
      const auto* __restrict vo = vp + o;
      const TX* __restrict xo = xp + o;
      TO* __restrict oo = op + o;
      if (spp) {
        const TX* __restrict so = spp + o;
#pragma omp simd
        for (int64_t j = 0; j < L.s; ++j)
          oo[j] = from_f32<TO>(kc * (to_f32(vo[j]) - m - to_f32(xo[j]) * mx) + to_f32(so[j]));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < L.s; ++j)
          oo[j] = from_f32<TO>(kc * (to_f32(vo[j]) - m - to_f32(xo[j]) * mx));
      }
    });
    sv[c] = static_cast<float>(a);
    sxv[c] = static_cast<float>(ax);
  });
  });
  });
  return out;
}

}  // namespace

std::vector<at::Tensor> bn_forward(const at::Tensor& a, const c10::optional<at::Tensor>& gamma,
                                   const c10::optional<at::Tensor>& beta, double eps,
                                   c10::optional<at::ScalarType> out_dtype) {
  check_f32_or_bf16(a, "a");
  const Layout L = layout_of(a);
  const float* g = opt_ptr(gamma, L.c, "gamma");
  const float* b = opt_ptr(beta, L.c, "beta");
  const auto y_dtype = out_dtype.value_or(at::kFloat);
  // x̂ in y's dtype; without an affine y is x̂ itself: one tensor, not two equal ones
  const bool affine = g != nullptr || b != nullptr;
  const bool y_is_xhat = !affine;
  auto y = result_like(a, y_dtype);
  auto xhat = y_is_xhat ? y : at::empty_like(y);
  const auto f32 = a.options().dtype(at::kFloat);
  auto inv_std = at::empty({L.c}, f32);
  auto mean = at::empty({L.c}, f32), var = at::empty({L.c}, f32);
  float *ip = inv_std.data_ptr<float>(), *mp = mean.data_ptr<float>(), *vp = var.data_ptr<float>();
  with_storage(a, y, [&](const auto* ap, auto* yp) {
  using TO = std::remove_pointer_t<decltype(yp)>;
  TO* xp = xhat.mutable_data_ptr<TO>();
  per_channel(L, [&](int64_t c) {
    double sum = 0.0;
    rows(L, c, [&](int64_t o) { sum += sum1(ap + o, L.s); });
    if (!std::isfinite(sum)) {  // overflowed in float, or a NaN / inf value: redone in double
      sum = 0.0;
      rows(L, c, [&](int64_t o) { sum += sum1_double(ap + o, L.s); });
    }
    const double md = sum / L.count();
    const float m = static_cast<float>(md);
    double sq = 0.0;
    rows(L, c, [&](int64_t o) { sq += sum_sq_dev(ap + o, m, L.s); });
    if (!std::isfinite(sq)) {
      sq = 0.0;
      rows(L, c, [&](int64_t o) { sq += sum_sq_dev_double(ap + o, md, L.s); });
    }
    const double v = sq / L.count();
    const float inv = static_cast<float>(1.0 / std::sqrt(v + eps));
    const float gc = g ? g[c] : 1.f, bc = b ? b[c] : 0.f;
    rows(L, c, [&](int64_t o) {
      const auto* __restrict src = ap + o;
      TO* __restrict xo = xp + o;
      TO* __restrict yo = yp + o;
      if (!y_is_xhat) {
#pragma omp simd
        for (int64_t j = 0; j < L.s; ++j) {
          const float x = (to_f32(src[j]) - m) * inv;
          xo[j] = from_f32<TO>(x);
          yo[j] = from_f32<TO>(gc * x + bc);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < L.s; ++j) xo[j] = from_f32<TO>((to_f32(src[j]) - m) * inv);
      }
    });
    ip[c] = inv;
    mp[c] = m;
    vp[c] = static_cast<float>(v);
  });
  });
  return {y, xhat, chan_shaped(inv_std, a), mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_project(const at::Tensor& v, const at::Tensor& xhat) {
  const Layout L = layout_of(v);
  at::Tensor sv, sxv;
  auto out = scaled_project(v, xhat, at::ones({L.c}, xhat.options().dtype(at::kFloat)),
                            c10::nullopt, sv, sxv, c10::nullopt);
  return {out, chan_shaped(sxv.div_(L.count()), v)};
}

std::vector<at::Tensor> bn_chain(const at::Tensor& d, const at::Tensor& xhat,
                                 const at::Tensor& k, c10::optional<at::ScalarType> out_dtype) {
  at::Tensor sd, sxd;
  auto out = scaled_project(d, xhat, k, c10::nullopt, sd, sxd, out_dtype);
  const double count = layout_of(d).count();
  return {out, sd.div_(count), sxd.div_(count)};  // mean(δ), mean(x̂ δ)
}

std::vector<at::Tensor> bn_tangent(const at::Tensor& r, const at::Tensor& xhat,
                                   const at::Tensor& d, const at::Tensor& k,
                                   const at::Tensor& inv_std,
                                   const c10::optional<at::Tensor>& gamma,
                                   const at::Tensor& md, const at::Tensor& mxd,
                                   c10::optional<at::ScalarType> out_dtype) {
  check_f32_or_bf16(xhat, "xhat");
  check_like(r, xhat, "r");
  check_like(d, xhat, "delta");
  const Layout L = layout_of(r);
  const float* kp = chan_ptr(k, L.c, "k");
  const float* ip = chan_ptr(inv_std, L.c, "inv_std");
  const float* mdp = chan_ptr(md, L.c, "mean(δ)");
  const float* mxdp = chan_ptr(mxd, L.c, "mean(x̂ δ)");
  const float* g = opt_ptr(gamma, L.c, "gamma");
  auto out = result_like(r, out_dtype), s = at::empty_like(xhat);  // s in x̂'s dtype
  auto tan_gamma = at::empty({L.c}, xhat.options().dtype(at::kFloat));
  float* tg = tan_gamma.data_ptr<float>();
  auto sweep = [&](const auto* rp, auto* op, const auto* dp, const auto* xp) {
  using TO = std::remove_pointer_t<decltype(op)>;
  using TX = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
  TX* sp = s.mutable_data_ptr<TX>();
  per_channel(L, [&](int64_t c) {
    double sr = 0.0, sxr = 0.0, sdr = 0.0;
    rows(L, c, [&](int64_t o) {
      sum_and_dot(rp + o, xp + o, L.s, sr, sxr);
      sdr += dot(dp + o, rp + o, L.s);
    });
    const double cnt = L.count();
    const double mr = sr / cnt, mxr = sxr / cnt;
    // ⟨δ, P r⟩ = Σ δ r − mean(r) Σ δ − mean(x̂ r) Σ x̂ δ
    const double d_pr = sdr - mr * cnt * mdp[c] - mxr * cnt * mxdp[c];
    const float dots = static_cast<float>(d_pr / cnt);
    const float coef = -(g ? g[c] : 1.f) * ip[c] * ip[c];
    const float kc = kp[c], m_r = static_cast<float>(mr), mx_r = static_cast<float>(mxr);
    const float m_d = mdp[c], mx_d = mxdp[c];
    rows(L, c, [&](int64_t o) {
      const auto* __restrict ro = rp + o;
      const TX* __restrict xo = xp + o;
      const auto* __restrict dd = dp + o;
      TO* __restrict oo = op + o;
      TX* __restrict so = sp + o;
#pragma omp simd
      for (int64_t j = 0; j < L.s; ++j) {
        const float x = to_f32(xo[j]);
        const float pr = to_f32(ro[j]) - m_r - x * mx_r;
        const float pd = to_f32(dd[j]) - m_d - x * mx_d;
        oo[j] = from_f32<TO>(kc * pr);
        so[j] = from_f32<TX>(coef * (x * dots + mx_r * pd + mx_d * pr));
      }
    });
    tg[c] = static_cast<float>(d_pr) * ip[c];
  });
  };
  with_storage(r, out, [&](const auto* rp, auto* op) {
    with_values(d, [&](const auto* dp) {
      with_values(xhat, [&](const auto* xp) { sweep(rp, op, dp, xp); });
    });
  });
  return {out, s, tan_gamma};
}

std::vector<at::Tensor> bn_backward(const at::Tensor& abar, const at::Tensor& xhat,
                                    const at::Tensor& k, const c10::optional<at::Tensor>& s,
                                    c10::optional<at::ScalarType> out_dtype) {
  at::Tensor g_sum, g_xhat;
  auto out = scaled_project(abar, xhat, k, s, g_sum, g_xhat, out_dtype);
  return {out, g_xhat, g_sum};
}

// Σ_r term(r·C + c) for each column c of an (R, C) operand, into out[c]: each thread sums its
// rows into its own C double accumulators (the columns' loop vectorizes), added at the end.
template <typename Term>
void column_sums(int64_t r_n, int64_t c_n, float* out, Term term) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> part(static_cast<size_t>(threads * c_n), 0.0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(c_n, 1));
  at::parallel_for(0, r_n, grain, [&](int64_t r0, int64_t r1) {
    double* __restrict acc = part.data() + at::get_thread_num() * c_n;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * c_n;
#pragma omp simd
      for (int64_t c = 0; c < c_n; ++c) acc[c] += term(o + c);
    }
  });
  for (int64_t c = 0; c < c_n; ++c) {
    double acc = 0.0;
    for (int64_t t = 0; t < threads; ++t) acc += part[t * c_n + c];
    out[c] = static_cast<float>(acc);
  }
}

at::Tensor channel_sum(const at::Tensor& t) {
  check_f32_or_bf16(t, "t");
  const Layout L = layout_of(t);
  auto out = at::empty({L.c}, t.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  with_values(t, [&](const auto* tp) {
    if (L.s == 1) {  // (R, C): a linear layer's bias gradient Σ_n z̄[n]
      column_sums(L.n, L.c, op, [=](int64_t o) { return static_cast<double>(to_f32(tp[o])); });
      return;
    }
    per_channel(L, [&](int64_t c) {
      double acc = 0.0;
      rows(L, c, [&](int64_t o) { acc += sum1(tp + o, L.s); });
      op[c] = static_cast<float>(acc);
    });
  });
  return out;
}

// Σ a ⊙ b over the N·S values of each channel of (N, C, S) operands, accumulated in double:
// a per-channel affine's γ gradient terms without an a ⊙ b temporary. (R, C) operands
// (S = 1: a LayerNorm's trailing features) are swept by rows, each thread summing its rows
// into its own C accumulators.
at::Tensor channel_dot(const at::Tensor& a, const at::Tensor& b) {
  check_f32(a, "a");
  check_like(b, a, "b");
  const Layout L = layout_of(a);
  auto out = at::empty({L.c}, a.options());
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (L.s != 1) {
    per_channel(L, [&](int64_t c) {
      double acc = 0.0;
      rows(L, c, [&](int64_t o) { acc += dot(ap + o, bp + o, L.s); });
      op[c] = static_cast<float>(acc);
    });
    return out;
  }
  column_sums(L.n, L.c, op, [=](int64_t o) { return static_cast<double>(ap[o]) * bp[o]; });
  return out;
}

}  // namespace gradreg
