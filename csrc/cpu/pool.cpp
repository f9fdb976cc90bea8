// Max pooling (forward with argmax indices) is linear once its argmax indices are fixed (flat per (n, c) plane):
// gather out[q, i] = r[q, idx[q, i]] (tangent pass); scatter is its transpose (chain and
// backward passes), run plane by plane so no two threads write one element. Values are
// float32 or bf16 (lanes.h), compared in float32 and moved unchanged.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "lanes.h"

namespace gradreg {
namespace {

// One plane of 2×2 / stride-2 pooling; corner[t] = flat input position of output t's
// window. Scan order (0,0), (0,1), (1,0), (1,1); a later value wins only if greater or NaN,
// as in torch's kernel.
template <typename T>
inline void pool2x2_plane(const T* __restrict src, int64_t w,
                          const int64_t* __restrict corner, int64_t n, T* __restrict dst,
                          int64_t* __restrict ix) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const int64_t c = corner[t];
    const float v0 = to_f32(src[c]), v1 = to_f32(src[c + 1]), v2 = to_f32(src[c + w]),
                v3 = to_f32(src[c + w + 1]);
    float best = v0;
    int64_t at = c;
    const bool t1 = v1 > best || v1 != v1;
    best = t1 ? v1 : best;
    at = t1 ? c + 1 : at;
    const bool t2 = v2 > best || v2 != v2;
    best = t2 ? v2 : best;
    at = t2 ? c + w : at;
    const bool t3 = v3 > best || v3 != v3;
    best = t3 ? v3 : best;
    at = t3 ? c + w + 1 : at;
    dst[t] = from_f32<T>(best);  // exact: best is one of the values
    ix[t] = at;
  }
}

inline bool strictly_increasing(const int64_t* __restrict ix, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 1; i < n; ++i) bad |= ix[i] <= ix[i - 1];
  return bad == 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& a, int64_t kh, int64_t kw,
                                              int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                                              int64_t dh, int64_t dw, bool ceil_mode) {
  // y[q, i, j] = max over the window, idx = its flat position h·W + w in the plane (the
  // first maximum in scan order; a NaN wins over numbers, as in torch's kernel)
  check_f32_or_bf16(a, "a");
  TORCH_CHECK(a.dim() == 4, "max_pool2d: input must be (N, C, H, W)");
  const int64_t h = a.size(2), w = a.size(3);
  auto out_size = [&](int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
    const int64_t span = in + 2 * p - d * (k - 1) - 1;
    int64_t o = (ceil_mode ? (span + s - 1) / s : span / s) + 1;
    if (ceil_mode && (o - 1) * s >= in + p) --o;
    return o;
  };
  const int64_t oh = out_size(h, kh, sh, ph, dh), ow = out_size(w, kw, sw, pw, dw);
  TORCH_CHECK(oh > 0 && ow > 0, "max_pool2d: output would be empty");
  auto y = at::empty({a.size(0), a.size(1), oh, ow}, a.options());
  auto idx = at::empty({a.size(0), a.size(1), oh, ow}, a.options().dtype(at::kLong));
  int64_t* ip = idx.data_ptr<int64_t>();
  with_same_storage(a, y, [&](const auto* ap, auto* yp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(ap)>>;
    const bool plain2x2 = kh == 2 && kw == 2 && sh == 2 && sw == 2 && ph == 0 && pw == 0 &&
                         dh == 1 && dw == 1 && 2 * oh <= h && 2 * ow <= w;
    if (plain2x2) {  // the common case: branch-free and vectorized over the whole plane
      // flat offset of each window's top-left input in the plane (same for every plane)
      std::vector<int64_t> corner(oh * ow);
      for (int64_t i = 0; i < oh; ++i)
        for (int64_t j = 0; j < ow; ++j) corner[i * ow + j] = 2 * i * w + 2 * j;
      const int64_t* cp = corner.data();
      at::parallel_for(0, a.size(0) * a.size(1), 4, [&](int64_t q0, int64_t q1) {
        if constexpr (std::is_same_v<T, float>) {
          for (int64_t q = q0; q < q1; ++q)
            pool2x2_plane(ap + q * h * w, w, cp, oh * ow, yp + q * oh * ow, ip + q * oh * ow);
        } else {
          // 16-bit values have no vector gather: each plane is widened into a float
          // buffer first (a contiguous, vectorized sweep), pooled there, and narrowed back
          // (exactly: every result is one of the values)
          std::vector<float> plane(h * w), pooled(oh * ow);
          for (int64_t q = q0; q < q1; ++q) {
            const T* src = ap + q * h * w;
            T* dst = yp + q * oh * ow;
#pragma omp simd
            for (int64_t i = 0; i < h * w; ++i) plane[i] = to_f32(src[i]);
            pool2x2_plane(plane.data(), w, cp, oh * ow, pooled.data(), ip + q * oh * ow);
#pragma omp simd
            for (int64_t i = 0; i < oh * ow; ++i) dst[i] = from_f32<T>(pooled[i]);
          }
        }
      });
      return;
    }
    at::parallel_for(0, a.size(0) * a.size(1), 4, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const auto* src = ap + q * h * w;
        auto* dst = yp + q * oh * ow;
        int64_t* ix = ip + q * oh * ow;
        for (int64_t i = 0; i < oh; ++i) {
          const int64_t h0 = i * sh - ph;
          for (int64_t j = 0; j < ow; ++j) {
            const int64_t w0 = j * sw - pw;
            float best = -std::numeric_limits<float>::infinity();
            int64_t arg = -1;
            for (int64_t u = 0; u < kh; ++u) {
              const int64_t r = h0 + u * dh;
              if (r < 0 || r >= h) continue;
              for (int64_t v = 0; v < kw; ++v) {
                const int64_t col = w0 + v * dw;
                if (col < 0 || col >= w) continue;
                const float val = to_f32(src[r * w + col]);
                if (val > best || std::isnan(val) || arg < 0) {
                  best = val;
                  arg = r * w + col;
                }
              }
            }
            dst[i * ow + j] = from_f32<T>(best);
            ix[i * ow + j] = arg;
          }
        }
      }
    });
  });
  return {y, idx};
}

at::Tensor pool_gather(const at::Tensor& r, const at::Tensor& idx) {
  check_f32_or_bf16(r, "r");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.dim() >= 2,
              "pool_gather: idx must be contiguous int64 (N, C, ...)");
  const int64_t planes = idx.size(0) * idx.size(1);
  const int64_t out_plane = idx.numel() / std::max<int64_t>(planes, 1);
  const int64_t in_plane = r.numel() / std::max<int64_t>(planes, 1);
  auto out = at::empty(idx.sizes(), r.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  with_same_storage(r, out, [&](const auto* rp, auto* op) {
    at::parallel_for(0, planes, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const auto* src = rp + q * in_plane;
        const int64_t* ix = ip + q * out_plane;
        auto* dst = op + q * out_plane;
        for (int64_t i = 0; i < out_plane; ++i) dst[i] = src[ix[i]];
      }
    });
  });
  return out;
}

at::Tensor pool_scatter(const at::Tensor& d, const at::Tensor& idx, int64_t plane) {
  check_f32_or_bf16(d, "d");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.numel() == d.numel(),
              "pool_scatter: idx must be contiguous int64 of d's size");
  const int64_t planes = idx.size(0) * idx.size(1);
  const int64_t out_plane = idx.numel() / std::max<int64_t>(planes, 1);
  auto out = at::empty({idx.size(0), idx.size(1), plane}, d.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  with_same_storage(d, out, [&](const auto* dp, auto* op) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(dp)>>;
    at::parallel_for(0, planes, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        T* dst = op + q * plane;
        std::memset(static_cast<void*>(dst), 0, sizeof(T) * plane);
        const int64_t* ix = ip + q * out_plane;
        const T* src = dp + q * out_plane;
        if (strictly_increasing(ix, out_plane)) {
          // no two outputs share an input (e.g. non-overlapping windows): a plain store
#pragma omp simd
          for (int64_t i = 0; i < out_plane; ++i) dst[ix[i]] = src[i];
        } else {  // overlapping windows: a sum, rounded once per addition as torch's is
          for (int64_t i = 0; i < out_plane; ++i)
            dst[ix[i]] = from_f32<T>(to_f32(dst[ix[i]]) + to_f32(src[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace gradreg
