// Max pooling is linear once its argmax indices are fixed (flat per (n, c) plane):
// gather out[q, i] = r[q, idx[q, i]] (tangent pass); scatter is its transpose (chain and
// backward passes), run plane by plane so no two threads write one element.
#include <ATen/Parallel.h>

#include <cstring>

#include "kernels.h"

namespace gradreg {

at::Tensor pool_gather(const at::Tensor& r, const at::Tensor& idx) {
  check_f32(r, "r");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.dim() >= 2,
              "pool_gather: idx must be contiguous int64 (N, C, ...)");
  const int64_t planes = idx.size(0) * idx.size(1);
  const int64_t out_plane = idx.numel() / std::max<int64_t>(planes, 1);
  const int64_t in_plane = r.numel() / std::max<int64_t>(planes, 1);
  auto out = at::empty(idx.sizes(), r.options());
  const float* rp = r.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, planes, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const float* src = rp + q * in_plane;
      const int64_t* ix = ip + q * out_plane;
      float* dst = op + q * out_plane;
      for (int64_t i = 0; i < out_plane; ++i) dst[i] = src[ix[i]];
    }
  });
  return out;
}

at::Tensor pool_scatter(const at::Tensor& d, const at::Tensor& idx, int64_t plane) {
  check_f32(d, "d");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.numel() == d.numel(),
              "pool_scatter: idx must be contiguous int64 of d's size");
  const int64_t planes = idx.size(0) * idx.size(1);
  const int64_t out_plane = idx.numel() / std::max<int64_t>(planes, 1);
  auto out = at::empty({idx.size(0), idx.size(1), plane}, d.options());
  const float* dp = d.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, planes, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      float* dst = op + q * plane;
      std::memset(dst, 0, sizeof(float) * plane);
      const int64_t* ix = ip + q * out_plane;
      const float* src = dp + q * out_plane;
      for (int64_t i = 0; i < out_plane; ++i) dst[ix[i]] += src[i];
    }
  });
  return out;
}

}  // namespace gradreg
