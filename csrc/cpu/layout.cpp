// Layout for the weight-gradient product: [P_1; P_2; ...]ᵀ written straight into one
// (C, ΣN_k) buffer, blocked so reads and writes both stay in cache.
#include <ATen/Parallel.h>

#include "kernels.h"

namespace gradreg {

at::Tensor transpose_cat(const std::vector<at::Tensor>& parts) {
  TORCH_CHECK(!parts.empty(), "transpose_cat: no operands");
  const int64_t c = parts[0].size(1);
  int64_t total = 0;
  for (const auto& p : parts) {
    check_f32(p, "transpose_cat operand");
    TORCH_CHECK(p.dim() == 2 && p.size(1) == c, "transpose_cat: operands must be (N_k, C)");
    total += p.size(0);
  }
  auto out = at::empty({c, total}, parts[0].options());
  float* op = out.data_ptr<float>();
  constexpr int64_t kBlock = 32;
  int64_t col0 = 0;
  for (const auto& p : parts) {
    const int64_t n = p.size(0);
    const float* ip = p.data_ptr<float>();
    const int64_t col_blocks = (c + kBlock - 1) / kBlock;
    at::parallel_for(0, col_blocks, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t cb = b0 * kBlock; cb < std::min(b1 * kBlock, c); cb += kBlock) {
        const int64_t ce = std::min(cb + kBlock, c);
        for (int64_t rb = 0; rb < n; rb += kBlock) {
          const int64_t re = std::min(rb + kBlock, n);
          for (int64_t j = cb; j < ce; ++j)
            for (int64_t i = rb; i < re; ++i) op[j * total + col0 + i] = ip[i * c + j];
        }
      }
    });
    col0 += n;
  }
  return out;
}

}  // namespace gradreg
