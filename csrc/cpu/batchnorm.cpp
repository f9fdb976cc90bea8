// Train-mode batch norm, fused per channel. Operands are viewed as (N, C, S) (S = 1 for
// BatchNorm1d on (N, C)); each channel's N·S values are reduced and written by one thread.
//   forward:  x̂ = (a − μ)/σ, σ = √(var + ε), y = γ x̂ + β
//   project:  P v = v − mean(v) − x̂ mean(x̂ v)   (and mean(x̂ v))
//   second:   s = −γ/σ² [x̂ mean(δ Pṙ) + mean(x̂ṙ) Pδ + mean(x̂δ) Pṙ]   (see rules/norm.py)
#include <ATen/Parallel.h>

#include <cmath>

#include "kernels.h"

namespace gradreg {
namespace {

struct Layout {
  int64_t n, c, s;
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

// Calls f(ptr offset of row n of channel c) for each of the N rows of channel c.
template <typename F>
inline void rows(const Layout& L, int64_t c, F f) {
  for (int64_t i = 0; i < L.n; ++i) f((i * L.c + c) * L.s);
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, int64_t c, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == c, what,
              " must be a contiguous float32 vector of one value per channel");
  return t->data_ptr<float>();
}

}  // namespace

std::vector<at::Tensor> bn_forward(const at::Tensor& a, const c10::optional<at::Tensor>& gamma,
                                   const c10::optional<at::Tensor>& beta, double eps) {
  check_f32(a, "a");
  const Layout L = layout_of(a);
  const float* g = opt_ptr(gamma, L.c, "gamma");
  const float* b = opt_ptr(beta, L.c, "beta");
  auto y = at::empty_like(a), xhat = at::empty_like(a);
  auto inv_std = at::empty({L.c}, a.options());
  auto mean = at::empty({L.c}, a.options()), var = at::empty({L.c}, a.options());
  const float* ap = a.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *xp = xhat.data_ptr<float>();
  float *ip = inv_std.data_ptr<float>(), *mp = mean.data_ptr<float>(), *vp = var.data_ptr<float>();
  const double count = static_cast<double>(L.n * L.s);
  at::parallel_for(0, L.c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double sum = 0.0;
      rows(L, c, [&](int64_t o) {
        float part = 0.f;
#pragma omp simd reduction(+ : part)
        for (int64_t j = 0; j < L.s; ++j) part += ap[o + j];
        sum += part;
      });
      const double mu = sum / count;
      double sq = 0.0;
      rows(L, c, [&](int64_t o) {
        float part = 0.f;
        const float m = static_cast<float>(mu);
#pragma omp simd reduction(+ : part)
        for (int64_t j = 0; j < L.s; ++j) {
          const float d = ap[o + j] - m;
          part += d * d;
        }
        sq += part;
      });
      const double v = sq / count;
      const float inv = static_cast<float>(1.0 / std::sqrt(v + eps));
      const float m = static_cast<float>(mu);
      const float gc = g ? g[c] : 1.f, bc = b ? b[c] : 0.f;
      rows(L, c, [&](int64_t o) {
#pragma omp simd
        for (int64_t j = 0; j < L.s; ++j) {
          const float x = (ap[o + j] - m) * inv;
          xp[o + j] = x;
          yp[o + j] = gc * x + bc;
        }
      });
      ip[c] = inv;
      mp[c] = m;
      vp[c] = static_cast<float>(v);
    }
  });
  return {y, xhat, chan_shaped(inv_std, a), mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_project(const at::Tensor& v, const at::Tensor& xhat) {
  check_f32(v, "v");
  check_f32(xhat, "xhat");
  TORCH_CHECK(v.sizes() == xhat.sizes(), "bn_project: v and xhat shapes differ");
  const Layout L = layout_of(v);
  auto out = at::empty_like(v);
  auto mx = at::empty({L.c}, v.options());
  const float *vp = v.data_ptr<float>(), *xp = xhat.data_ptr<float>();
  float *op = out.data_ptr<float>(), *mxp = mx.data_ptr<float>();
  const double count = static_cast<double>(L.n * L.s);
  at::parallel_for(0, L.c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double sv = 0.0, sxv = 0.0;
      rows(L, c, [&](int64_t o) {
        float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
        for (int64_t j = 0; j < L.s; ++j) {
          a += vp[o + j];
          b += xp[o + j] * vp[o + j];
        }
        sv += a;
        sxv += b;
      });
      const float m = static_cast<float>(sv / count), mxc = static_cast<float>(sxv / count);
      rows(L, c, [&](int64_t o) {
#pragma omp simd
        for (int64_t j = 0; j < L.s; ++j) op[o + j] = vp[o + j] - m - xp[o + j] * mxc;
      });
      mxp[c] = mxc;
    }
  });
  return {out, chan_shaped(mx, v)};
}

at::Tensor bn_second_order(const at::Tensor& xhat, const at::Tensor& inv_std,
                           const c10::optional<at::Tensor>& gamma, const at::Tensor& d,
                           const at::Tensor& pd, const at::Tensor& pr, const at::Tensor& mxd,
                           const at::Tensor& mxr) {
  for (auto* t : {&xhat, &d, &pd, &pr}) check_f32(*t, "bn_second_order operand");
  TORCH_CHECK(d.sizes() == xhat.sizes() && pd.sizes() == xhat.sizes() &&
                  pr.sizes() == xhat.sizes(), "bn_second_order: operand shapes differ");
  const Layout L = layout_of(xhat);
  auto inv = inv_std.contiguous(), mxd_c = mxd.contiguous(), mxr_c = mxr.contiguous();
  TORCH_CHECK(inv.numel() == L.c && mxd_c.numel() == L.c && mxr_c.numel() == L.c,
              "bn_second_order: per-channel operands must have one value per channel");
  const float* g = opt_ptr(gamma, L.c, "gamma");
  auto s = at::empty_like(xhat);
  const float *xp = xhat.data_ptr<float>(), *dp = d.data_ptr<float>();
  const float *pdp = pd.data_ptr<float>(), *prp = pr.data_ptr<float>();
  const float *ip = inv.data_ptr<float>(), *ad = mxd_c.data_ptr<float>();
  const float* ar = mxr_c.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  const double count = static_cast<double>(L.n * L.s);
  at::parallel_for(0, L.c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double dot = 0.0;
      rows(L, c, [&](int64_t o) {
        float part = 0.f;
#pragma omp simd reduction(+ : part)
        for (int64_t j = 0; j < L.s; ++j) part += dp[o + j] * prp[o + j];
        dot += part;
      });
      const float dots = static_cast<float>(dot / count);
      const float coef = -(g ? g[c] : 1.f) * ip[c] * ip[c];
      const float a_r = ar[c], a_d = ad[c];
      rows(L, c, [&](int64_t o) {
#pragma omp simd
        for (int64_t j = 0; j < L.s; ++j)
          sp[o + j] = coef * (xp[o + j] * dots + a_r * pdp[o + j] + a_d * prp[o + j]);
      });
    }
  });
  return s;
}

}  // namespace gradreg
