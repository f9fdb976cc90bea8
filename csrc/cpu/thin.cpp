// Products of a layer with few outputs (a classifier's last Linear, K ≤ THIN_MAX):
//   thin_linear       z = a Wᵀ (+ b)                 a (N, in), W (K, in)  → (N, K)
//   thin_input_grad   u = d W                         d (N, K),  W (K, in)  → (N, in)
//   thin_weight_grad  G = Σ_p d_pᵀ a_p (+ acc), Σ_n d_1 (optional bias gradient)
// At K = 10 these are a few hundred thousand multiply-adds: a library call (thread start,
// packing) costs several times the arithmetic, so each runs here as one vectorized sweep,
// on one thread unless there is enough work for two.
// The wide operand (a, and u) is float32 or bf16 (CPU autocast: a bf16 layer below the head);
// W, d, z and G are float32, and every sum runs in float32.
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels.h"
#include "lanes.h"

namespace gradreg {

namespace {

// multiply-adds per thread below which a product stays on one thread
constexpr int64_t kGrainWork = 1 << 18;
// columns handled together: one 16-lane vector per output row
constexpr int64_t kLanes = 16;
// rows of d that share each load of W in the input gradient
constexpr int kRowTile = 4;
// rows of a per pass over the columns in the weight gradient (a 64-row stripe of a stays
// in cache while every column chunk reads it)
constexpr int64_t kRowBlock = 64;

int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_row));
}

// The kernels take K as a template parameter, so that the K accumulators of one 16-column
// chunk live in vector registers (independent chains: the loop runs at FMA throughput).

// z[r, j] = Σ_i a[r, i] w[j, i] + b[j] for rows [r0, r1)
template <int K, typename TA>
void linear_rows(const TA* a, const float* w, const float* b, float* z, int64_t in,
                 int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const TA* ar = a + r * in;
    float acc[K][kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= in; i += kLanes)
      for (int j = 0; j < K; ++j)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[j][l] += to_f32(ar[i + l]) * w[j * in + i + l];
    for (int j = 0; j < K; ++j) {
      float s = b ? b[j] : 0.f;
      for (int64_t l = 0; l < kLanes; ++l) s += acc[j][l];
      for (int64_t t = i; t < in; ++t) s += to_f32(ar[t]) * w[j * in + t];
      z[r * K + j] = s;
    }
  }
}

// u[r, i] = Σ_j d[r, j] w[j, i] for rows [r0, r1): kRowTile rows share every load of w
template <int K, typename TU>
void input_grad_rows(const float* d, const float* w, TU* u, int64_t in, int64_t r0,
                     int64_t r1) {
  int64_t r = r0;
  for (; r + kRowTile <= r1; r += kRowTile) {
    int64_t i = 0;
    for (; i + kLanes <= in; i += kLanes) {
      float acc[kRowTile][kLanes] = {};
      for (int j = 0; j < K; ++j)
        for (int q = 0; q < kRowTile; ++q)
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[q][l] += d[(r + q) * K + j] * w[j * in + i + l];
      for (int q = 0; q < kRowTile; ++q)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) u[(r + q) * in + i + l] = from_f32<TU>(acc[q][l]);
    }
    for (; i < in; ++i)
      for (int q = 0; q < kRowTile; ++q) {
        float s = 0.f;
        for (int j = 0; j < K; ++j) s += d[(r + q) * K + j] * w[j * in + i];
        u[(r + q) * in + i] = from_f32<TU>(s);
      }
  }
  for (; r < r1; ++r) {
    const float* dr = d + r * K;
    TU* ur = u + r * in;
#pragma omp simd
    for (int64_t i = 0; i < in; ++i) {
      float s = 0.f;
      for (int j = 0; j < K; ++j) s += dr[j] * w[j * in + i];
      ur[i] = from_f32<TU>(s);
    }
  }
}

// g[j, c] += Σ_r d[r, j] a[r, c] for columns [c0, c1), rows [0, n). Rows go in blocks of
// kRowBlock, so a block's stripe of a is read from memory once and from cache by every
// 16-column chunk; the chunk's K accumulators stay in registers across the block.
template <int K, typename TA>
void weight_grad_cols(const float* d, const TA* a, float* g, int64_t n, int64_t in,
                      int64_t c0, int64_t c1) {
  for (int64_t rb = 0; rb < n; rb += kRowBlock) {
    const int64_t re = std::min(n, rb + kRowBlock);
    int64_t c = c0;
    for (; c + kLanes <= c1; c += kLanes) {
      float acc[K][kLanes];
      for (int j = 0; j < K; ++j)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[j][l] = g[j * in + c + l];
      for (int64_t r = rb; r < re; ++r)
        for (int j = 0; j < K; ++j)
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            acc[j][l] += d[r * K + j] * to_f32(a[r * in + c + l]);
          }
      for (int j = 0; j < K; ++j)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) g[j * in + c + l] = acc[j][l];
    }
    for (; c < c1; ++c)
      for (int j = 0; j < K; ++j) {
        float s = 0.f;
        for (int64_t r = rb; r < re; ++r) s += d[r * K + j] * to_f32(a[r * in + c]);
        g[j * in + c] += s;
      }
  }
}

// Calls f.template operator()<K>() for the runtime k in [1, 16] (f: a template lambda).
template <int K = 1, class F>
void dispatch_k(int64_t k, F&& f) {
  if constexpr (K > 16) {
    TORCH_CHECK(false, "thin products take at most 16 outputs, got ", k);
  } else {
    if (k == K) return f.template operator()<K>();
    dispatch_k<K + 1>(k, f);
  }
}

void check_thin(const at::Tensor& w, const char* what) {
  check_f32(w, what);
  TORCH_CHECK(w.dim() == 2, what, " must be 2-D (K, in)");
  TORCH_CHECK(w.size(0) >= 1 && w.size(0) <= 16, what, " must have 1 to 16 rows, got ",
              w.size(0));
}

}  // namespace

at::Tensor thin_linear(const at::Tensor& a, const at::Tensor& w,
                       const c10::optional<at::Tensor>& b) {
  check_f32_or_bf16(a, "thin_linear input");
  check_thin(w, "thin_linear weight");
  const int64_t n = a.size(0), in = a.size(1), k = w.size(0);
  TORCH_CHECK(a.dim() == 2 && w.size(1) == in, "thin_linear: a (N, in) and W (K, in) expected");
  const float* bp = nullptr;
  if (b.has_value()) {
    check_f32(*b, "thin_linear bias");
    TORCH_CHECK(b->numel() == k, "thin_linear: bias of K elements expected");
    bp = b->data_ptr<float>();
  }
  auto out = at::empty({n, k}, a.options().dtype(at::kFloat));
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  with_values(a, [&](const auto* ap) {
    at::parallel_for(0, n, grain_rows(k * in), [&](int64_t r0, int64_t r1) {
      dispatch_k(k, [&]<int K>() { linear_rows<K>(ap, wp, bp, op, in, r0, r1); });
    });
  });
  return out;
}

at::Tensor thin_input_grad(const at::Tensor& d, const at::Tensor& w,
                           c10::optional<at::ScalarType> out_dtype) {
  check_f32(d, "thin_input_grad d");
  check_thin(w, "thin_input_grad weight");
  const int64_t n = d.size(0), k = w.size(0), in = w.size(1);
  TORCH_CHECK(d.dim() == 2 && d.size(1) == k, "thin_input_grad: d (N, K) and W (K, in) expected");
  auto out = at::empty({n, in}, d.options().dtype(out_dtype.value_or(at::kFloat)));
  check_f32_or_bf16(out, "thin_input_grad's result");
  const float* dp = d.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  auto run = [&](auto* op) {
    at::parallel_for(0, n, grain_rows(k * in), [&](int64_t r0, int64_t r1) {
      dispatch_k(k, [&]<int K>() { input_grad_rows<K>(dp, wp, op, in, r0, r1); });
    });
  };
  if (out.scalar_type() == at::kBFloat16) {
    run(out.mutable_data_ptr<bf16>());
  } else {
    run(out.mutable_data_ptr<float>());
  }
  return out;
}

std::tuple<at::Tensor, c10::optional<at::Tensor>> thin_weight_grad(
    const std::vector<at::Tensor>& ds, const std::vector<at::Tensor>& as,
    const c10::optional<at::Tensor>& acc, bool bias_of_first) {
  TORCH_CHECK(!ds.empty() && ds.size() == as.size(), "thin_weight_grad: pairs (d_p, a_p) expected");
  const int64_t k = ds[0].size(1), in = as[0].size(1);
  TORCH_CHECK(k >= 1 && k <= 16, "thin_weight_grad: 1 to 16 outputs expected, got ", k);
  int64_t rows = 0;
  for (size_t p = 0; p < ds.size(); ++p) {
    check_f32(ds[p], "thin_weight_grad d");
    check_f32_or_bf16(as[p], "thin_weight_grad a");
    TORCH_CHECK(ds[p].dim() == 2 && as[p].dim() == 2 && ds[p].size(1) == k &&
                    as[p].size(1) == in && ds[p].size(0) == as[p].size(0),
                "thin_weight_grad: each pair must be d (N, K) and a (N, in)");
    rows += ds[p].size(0);
  }
  at::Tensor out;
  const bool fresh = !acc.has_value();
  if (!fresh) {
    check_f32(*acc, "thin_weight_grad acc");
    TORCH_CHECK(acc->dim() == 2 && acc->size(0) == k && acc->size(1) == in,
                "thin_weight_grad: acc must be (K, in)");
    out = *acc;
  } else {
    out = at::empty({k, in}, as[0].options().dtype(at::kFloat));
  }
  float* op = out.data_ptr<float>();
  // columns split over threads: each thread reads its columns of every row of a once and
  // keeps its K × 16 slice of the result in registers
  const int64_t col_grain =
      std::max<int64_t>(kLanes, kGrainWork / std::max<int64_t>(1, rows * k) / kLanes * kLanes);
  const int64_t chunks = (in + kLanes - 1) / kLanes;
  at::parallel_for(0, chunks, std::max<int64_t>(1, col_grain / kLanes), [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * kLanes, c1 = std::min(in, b1 * kLanes);
    if (fresh)
      for (int64_t j = 0; j < k; ++j) std::fill(op + j * in + c0, op + j * in + c1, 0.f);
    for (size_t p = 0; p < ds.size(); ++p)
      with_values(as[p], [&](const auto* ap) {
        dispatch_k(k, [&]<int K>() {
          weight_grad_cols<K>(ds[p].data_ptr<float>(), ap, op, ds[p].size(0), in, c0, c1);
        });
      });
  });
  c10::optional<at::Tensor> bias;
  if (bias_of_first) {
    auto gb = at::empty({k}, ds[0].options());
    float* gp = gb.data_ptr<float>();
    std::fill(gp, gp + k, 0.f);
    const float* dp = ds[0].data_ptr<float>();
    for (int64_t r = 0; r < ds[0].size(0); ++r)
      for (int64_t j = 0; j < k; ++j) gp[j] += dp[r * k + j];
    bias = gb;
  }
  return {out, bias};
}

}  // namespace gradreg
