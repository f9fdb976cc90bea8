// Softmax heads, row by row in one sweep: CE_n = logsumexp(z_n) − z_{n,y_n}, p = softmax(z),
// ∇CE = p − e_y, and for the uniform head ∇ℓ = p − 1/K. Hessian-vector product of
// −log softmax: H t = p ⊙ (t − pᵀt).
// Target heads (mse, bce), row by row in one sweep: ℓ_n = (1/K) Σ_k e(z_k, y_k) with
//   mse: e = (z − y)²,                        e′ = 2 (z − y),  e″ = 2
//   bce: e = max(z, 0) − z y + log(1 + e^−|z|), e′ = σ(z) − y,  e″ = σ(z)(1 − σ(z)).
#include <ATen/Parallel.h>

#include <cmath>

#include "kernels.h"

namespace gradreg {

std::vector<at::Tensor> softmax_head(const at::Tensor& z, const at::Tensor& y, bool uniform) {
  check_f32(z, "z");
  TORCH_CHECK(z.dim() == 2, "softmax_head: z must be (N, K)");
  const int64_t n = z.size(0), k = z.size(1);
  auto y64 = y.to(at::kLong).contiguous();
  TORCH_CHECK(y64.numel() == n, "softmax_head: need one label per row");
  auto ce = at::empty({n}, z.options());
  auto p = at::empty_like(z), dg = at::empty_like(z);
  auto pg = uniform ? at::empty_like(z) : dg;
  const float* zp = z.data_ptr<float>();
  const int64_t* yp = y64.data_ptr<int64_t>();
  float *cp = ce.data_ptr<float>(), *pp = p.data_ptr<float>(), *dp = dg.data_ptr<float>();
  float* gp = pg.data_ptr<float>();
  const float inv_k = 1.f / static_cast<float>(k);
  for (int64_t r = 0; r < n; ++r) {  // the label check of gradreg_loss, same message
    TORCH_CHECK_VALUE(yp[r] >= 0 && yp[r] < k, "y must lie in [0, ", k, ") for the model's ", k,
                      " outputs; y[", r, "] = ", yp[r]);
  }
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* zr = zp + r * k;
      float m = zr[0];
      for (int64_t j = 1; j < k; ++j) m = std::fmax(m, zr[j]);
      double sum = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        const float e = std::exp(zr[j] - m);
        pp[r * k + j] = e;
        sum += e;
      }
      const float inv = static_cast<float>(1.0 / sum);
      const int64_t label = yp[r];
      cp[r] = static_cast<float>(std::log(sum)) + m - zr[label];
      for (int64_t j = 0; j < k; ++j) {
        const float q = pp[r * k + j] * inv;
        pp[r * k + j] = q;
        dp[r * k + j] = j == label ? q - 1.f : q;
        if (uniform) gp[r * k + j] = q - inv_k;
      }
    }
  });
  return {ce, p, dg, pg};
}

std::vector<at::Tensor> target_head(const at::Tensor& z, const at::Tensor& y, int64_t kind) {
  check_f32(z, "z");
  check_f32(y, "y");
  TORCH_CHECK(z.dim() == 2 && y.sizes() == z.sizes(), "target_head: z and y must be (N, K)");
  TORCH_CHECK(kind == 0 || kind == 1, "target_head: kind must be 0 (mse) or 1 (bce)");
  const int64_t n = z.size(0), k = z.size(1);
  auto data = at::empty({n}, z.options());
  auto grad = at::empty_like(z);
  auto d2 = kind == 1 ? at::empty_like(z) : at::empty({0}, z.options());
  const float *zp = z.data_ptr<float>(), *yp = y.data_ptr<float>();
  float *lp = data.data_ptr<float>(), *gp = grad.data_ptr<float>();
  float* hp = kind == 1 ? d2.data_ptr<float>() : nullptr;
  const float inv_k = 1.f / static_cast<float>(k);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double sum = 0.0;
      for (int64_t j = r * k; j < (r + 1) * k; ++j) {
        const float zj = zp[j], yj = yp[j];
        if (kind == 0) {
          const float diff = zj - yj;
          sum += static_cast<double>(diff) * diff;
          gp[j] = 2.f * diff * inv_k;
        } else {
          const float e = std::exp(-std::fabs(zj));
          const float sig = zj >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
          sum += std::fmax(zj, 0.f) - zj * yj + std::log1p(e);
          gp[j] = (sig - yj) * inv_k;
          hp[j] = sig * (1.f - sig) * inv_k;
        }
      }
      lp[r] = static_cast<float>(sum * inv_k);
    }
  });
  return {data, grad, d2};
}

at::Tensor softmax_hvp(const at::Tensor& p, const at::Tensor& t) {
  check_f32(p, "p");
  check_f32(t, "t");
  TORCH_CHECK(p.dim() == 2 && p.sizes() == t.sizes(), "softmax_hvp: p and t must be (N, K)");
  const int64_t n = p.size(0), k = p.size(1);
  auto out = at::empty_like(t);
  const float *pp = p.data_ptr<float>(), *tp = t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *pr = pp + r * k, *tr = tp + r * k;
      double dot = 0.0;
      for (int64_t j = 0; j < k; ++j) dot += static_cast<double>(pr[j]) * tr[j];
      const float d = static_cast<float>(dot);
      for (int64_t j = 0; j < k; ++j) op[r * k + j] = pr[j] * (tr[j] - d);
    }
  });
  return out;
}

}  // namespace gradreg
