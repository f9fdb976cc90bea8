// Fused CPU kernels of the four passes (float32, contiguous tensors; the masked steps and
// the pools also read and write bfloat16, for CPU autocast).
// Each kernel is one sweep over its operands, split over threads with at::parallel_for.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace gradreg {

// ---- masked (piecewise-linear) steps: ReLU, LeakyReLU, Dropout -----------------------
// Masks are packed bits, bit i of byte i/8 for element i (set: the "hi" branch).
// Operands float32 or bf16; the result in out_dtype (float32 or bf16; None: the operand's).
// mask_forward also says whether every z is finite (checked in the same sweep).
std::tuple<at::Tensor, at::Tensor, bool> mask_forward(const at::Tensor& z, double lo,
                                                      c10::optional<at::ScalarType> out_dtype);
at::Tensor mask_apply(const at::Tensor& bits, const at::Tensor& t, double hi, double lo,
                      c10::optional<at::ScalarType> out_dtype);
// the same into a given contiguous result (float32 or bf16; a row block of a larger buffer)
std::tuple<at::Tensor, bool> mask_forward_out(const at::Tensor& z, double lo, at::Tensor& y);
void mask_apply_out(const at::Tensor& bits, const at::Tensor& t, double hi, double lo,
                    at::Tensor& out);
std::tuple<at::Tensor, at::Tensor> dropout_forward(const at::Tensor& a, const at::Tensor& keep,
                                                   double scale);

// ---- smooth activations whose σ', σ'' are recomputed from the kept pre-activation z ----
// (every operand and result in the kept tensor's dtype: float32, or bf16 under autocast)
at::Tensor smooth_value(const at::Tensor& z, int64_t kind, double p0, double p1);
at::Tensor z_mul_add(const at::Tensor& z, const at::Tensor& t, const c10::optional<at::Tensor>& s,
                     int64_t kind, double p0, double p1);
std::tuple<at::Tensor, at::Tensor> z_tangent(const at::Tensor& z, const at::Tensor& r,
                                             const at::Tensor& u, int64_t kind, double p0,
                                             double p1);

// the same into a given result (a contiguous block of a buffer, the kept tensor's dtype);
// the tangent's returns its s
void smooth_value_into(const at::Tensor& z, int64_t kind, double p0, double p1, at::Tensor& y);
void z_mul_add_into(const at::Tensor& z, const at::Tensor& t, const c10::optional<at::Tensor>& s,
                    int64_t kind, double p0, double p1, at::Tensor& out);
at::Tensor z_tangent_into(const at::Tensor& z, const at::Tensor& r, const at::Tensor& u,
                          int64_t kind, double p0, double p1, at::Tensor& out);

// ---- smooth activations whose σ', σ'' are functions of y = σ(z) (softplus, tanh, sigmoid,
// elu): the passes keep y alone
at::Tensor output_mul_add(const at::Tensor& y, const at::Tensor& t,
                          const c10::optional<at::Tensor>& s, int64_t kind, double p0, double p1);
std::tuple<at::Tensor, at::Tensor> output_tangent(const at::Tensor& y, const at::Tensor& r,
                                                  const at::Tensor& u, int64_t kind, double p0,
                                                  double p1);
void output_mul_add_into(const at::Tensor& y, const at::Tensor& t,
                         const c10::optional<at::Tensor>& s, int64_t kind, double p0, double p1,
                         at::Tensor& out);
at::Tensor output_tangent_into(const at::Tensor& y, const at::Tensor& r, const at::Tensor& u,
                               int64_t kind, double p0, double p1, at::Tensor& out);

// ---- softmax heads -------------------------------------------------------------------
std::vector<at::Tensor> softmax_head(const at::Tensor& z, const at::Tensor& y, bool uniform);
at::Tensor softmax_hvp(const at::Tensor& p, const at::Tensor& t);
// the target heads: (ℓ (N,), ∇ℓ (N, K), ∇²ℓ diagonal (N, K), empty for mse); kind 0 mse, 1 bce
std::vector<at::Tensor> target_head(const at::Tensor& z, const at::Tensor& y, int64_t kind);

// ---- max pooling (indices are flat per plane, int64) ----------------------------------
std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& a, int64_t kh, int64_t kw,
                                              int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                                              int64_t dh, int64_t dw, bool ceil_mode);
at::Tensor pool_gather(const at::Tensor& r, const at::Tensor& idx);
at::Tensor pool_scatter(const at::Tensor& d, const at::Tensor& idx, int64_t plane);

// ---- train-mode batch norm, per channel over (N, C, S) --------------------------------
// The operands a, v, δ, r, ā are float32 or bf16; y and the k P(·) results are written in
// out_dtype (None: float32); x̂, s and the per-channel statistics are float32.
std::vector<at::Tensor> bn_forward(const at::Tensor& a, const c10::optional<at::Tensor>& gamma,
                                   const c10::optional<at::Tensor>& beta, double eps,
                                   c10::optional<at::ScalarType> out_dtype);
std::tuple<at::Tensor, at::Tensor> bn_project(const at::Tensor& v, const at::Tensor& xhat);
std::vector<at::Tensor> bn_chain(const at::Tensor& d, const at::Tensor& xhat, const at::Tensor& k,
                                 c10::optional<at::ScalarType> out_dtype);
std::vector<at::Tensor> bn_tangent(const at::Tensor& r, const at::Tensor& xhat,
                                   const at::Tensor& d, const at::Tensor& k,
                                   const at::Tensor& inv_std,
                                   const c10::optional<at::Tensor>& gamma,
                                   const at::Tensor& md, const at::Tensor& mxd,
                                   c10::optional<at::ScalarType> out_dtype);
std::vector<at::Tensor> bn_backward(const at::Tensor& abar, const at::Tensor& xhat,
                                    const at::Tensor& k, const c10::optional<at::Tensor>& s,
                                    c10::optional<at::ScalarType> out_dtype);
at::Tensor channel_dot(const at::Tensor& a, const at::Tensor& b);
// Σ t per channel of an (N, C, S) operand (float32 or bf16), float32 (C,)
at::Tensor channel_sum(const at::Tensor& t);

// ---- the autocast step's dtype conversions, fused with the sweep that needs them -------
// a + b as float32 (each float32 or bf16): a Linear's two bf16 weight-gradient products
at::Tensor widened_sum(const at::Tensor& a, const at::Tensor& b);
// bf16 copies of float32 tensors and whether every value is finite (the parameter check)
std::tuple<std::vector<at::Tensor>, bool> narrowed_all_finite(const std::vector<at::Tensor>& ts);
// t's float32 copy (t contiguous bf16)
at::Tensor widened(const at::Tensor& t);
// dst = bf16(src) (dst a contiguous block of a buffer); whether every value of src is finite
bool narrow_into(const at::Tensor& src, at::Tensor& dst);

// ---- F.fold for stride 1, dilation 1: (N, C·kh·kw, H'·W') float32 / bf16 → (N, C, H, W) float32
at::Tensor col_fold(const at::Tensor& cols, int64_t c, int64_t kh, int64_t kw, int64_t h,
                    int64_t w, int64_t ph, int64_t pw);

// ---- products of a layer with few outputs (K small): one sweep each -------------------
at::Tensor thin_linear(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& b);
// u = d W in out_dtype (None: float32; bf16 under autocast); the wide operand a of
// thin_linear / thin_weight_grad may be bf16
at::Tensor thin_input_grad(const at::Tensor& d, const at::Tensor& w,
                           c10::optional<at::ScalarType> out_dtype);
std::tuple<at::Tensor, c10::optional<at::Tensor>> thin_weight_grad(
    const std::vector<at::Tensor>& ds, const std::vector<at::Tensor>& as,
    const c10::optional<at::Tensor>& acc, bool bias_of_first);

// ---- layout --------------------------------------------------------------------------
at::Tensor transpose_cat(const std::vector<at::Tensor>& parts);
// the same, and the column sums of the first operand (a bias gradient Σ_n P_1[n, :])
std::tuple<at::Tensor, at::Tensor> transpose_cat_sum(const std::vector<at::Tensor>& parts);

// ---- whole-tensor reductions ---------------------------------------------------------
at::Tensor sum_squares(const at::Tensor& t);
bool all_finite(const at::Tensor& t);
bool all_finite_many(const std::vector<at::Tensor>& ts);

// ---- shared checks -------------------------------------------------------------------
void check_f32(const at::Tensor& t, const char* what);
// a contiguous CPU tensor of float32 or bfloat16 (the kernels that read autocast operands)
void check_f32_or_bf16(const at::Tensor& t, const char* what);

}  // namespace gradreg
