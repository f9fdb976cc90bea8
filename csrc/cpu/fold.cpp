// col_fold: F.fold (col2im) for a stride-1, dilation-1 convolution, the last step of a first
// layer's input gradient (conv2d_input_grad: G = Wᵀ d as one product, then this fold):
//   out[n, c, y, x] = Σ_{ky, kx} G[n, (c·kh + ky)·kw + kx, (y + p_h − ky)·W' + (x + p_w − kx)]
// over the terms inside G's (H', W') plane, H' = H + 2 p_h − kh + 1 (likewise W').
// G (N, C·kh·kw, H'·W') float32 or bf16; out (N, C, H, W) float32. Each (image, channel)
// plane is one task; each of its kh·kw shifted planes is added row by row in a simd loop
// (torch's col2im walks G element by element, ten times slower on the paper CNN's layer).
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels.h"
#include "lanes.h"

namespace gradreg {

namespace {

struct FoldGeom {
  int64_t c, kh, kw, h, w, ph, pw, hd, wd;
};

template <typename T>
void fold_plane(const T* __restrict g, float* __restrict out, const FoldGeom& f) {
  std::fill(out, out + f.h * f.w, 0.f);
  for (int64_t ky = 0; ky < f.kh; ++ky) {
    const int64_t y0 = std::max<int64_t>(0, ky - f.ph);
    const int64_t y1 = std::min<int64_t>(f.h, f.hd + ky - f.ph);
    for (int64_t kx = 0; kx < f.kw; ++kx) {
      const int64_t x0 = std::max<int64_t>(0, kx - f.pw);
      const int64_t x1 = std::min<int64_t>(f.w, f.wd + kx - f.pw);
      const T* gk = g + (ky * f.kw + kx) * f.hd * f.wd;
      for (int64_t y = y0; y < y1; ++y) {
        const T* src = gk + (y + f.ph - ky) * f.wd + (f.pw - kx);  // indexed by x
        float* dst = out + y * f.w;
#pragma omp simd
        for (int64_t x = x0; x < x1; ++x) dst[x] += to_f32(src[x]);
      }
    }
  }
}

}  // namespace

at::Tensor col_fold(const at::Tensor& cols, int64_t c, int64_t kh, int64_t kw, int64_t h,
                    int64_t w, int64_t ph, int64_t pw) {
  check_f32_or_bf16(cols, "cols");
  TORCH_CHECK(c >= 1 && kh >= 1 && kw >= 1 && h >= 1 && w >= 1 && ph >= 0 && pw >= 0,
              "col_fold: bad geometry");
  const FoldGeom f{c, kh, kw, h, w, ph, pw, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1};
  TORCH_CHECK(f.hd >= 1 && f.wd >= 1, "col_fold: the kernel is larger than the padded input");
  TORCH_CHECK(cols.dim() == 3 && cols.size(1) == c * kh * kw && cols.size(2) == f.hd * f.wd,
              "col_fold: cols must be (N, C·kh·kw, H'·W') = (N, ", c * kh * kw, ", ",
              f.hd * f.wd, "), got ", cols.sizes());
  const int64_t n = cols.size(0);
  auto out = at::empty({n, c, h, w}, cols.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  const int64_t plane_in = kh * kw * f.hd * f.wd;
  with_values(cols, [&](const auto* gp) {
    at::parallel_for(0, n * c, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) fold_plane(gp + p * plane_in, op + p * h * w, f);
    });
  });
  return out;
}

}  // namespace gradreg
