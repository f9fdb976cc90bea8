// LinearChain (linear_chain.h): the passes of a plain Linear chain, layer by layer, with the
// cpu backend's kernels. Per layer l (a its input, W its weight, σ its activation):
//   pass 1:  z = a Wᵀ + b (bf16 product),  a' = σ(z) (and a mask's bits)
//   pass 2:  δ = σ'(z) ⊙ d,  d' = δ W                 (a smooth σ keeps u = d)
//   pass 3:  r' = σ'(z) ⊙ (r Wᵀ)                       (and s = σ''(z) ⊙ u ⊙ (r Wᵀ))
//   pass 4:  z̄ = σ'(z) ⊙ ā (+ s),  ΔW = [z̄; δ]ᵀ [a; r] widened to float32,  Δb = Σ_n z̄,
//            ā' = z̄ W
// The last layer (K outputs) runs the float32 thin kernels, as the Python schedule does.
#include "linear_chain.h"

#include <ATen/ATen.h>

#include <cmath>
#include <utility>

#include "kernels.h"

namespace gradreg {

namespace {

constexpr auto kLow = at::kBFloat16;

at::Tensor top(const at::Tensor& buf) { return buf.slice(0, 0, buf.size(0) / 2); }
at::Tensor bottom(const at::Tensor& buf) { return buf.slice(0, buf.size(0) / 2); }

// y = σ(z) (bf16, into the given rows) and the mask; at a NaN / ±inf of z, torch's own σ
// (the sweep's branch-free form is exact for finite z only)
at::Tensor activate_into(const at::Tensor& z, double slope, at::Tensor y) {
  auto [bits, finite] = mask_forward_out(z, slope, y);
  if (!finite) {
    const auto bad = at::isfinite(z).logical_not();
    const auto ref = slope == 0.0 ? at::relu(z) : at::leaky_relu(z, slope);
    y.copy_(at::where(bad, ref.to(y.scalar_type()), y));
  }
  return bits;
}

c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

}  // namespace

LinearChain::LinearChain(std::vector<at::Tensor> w_low, std::vector<at::Tensor> w32,
                         std::vector<c10::optional<at::Tensor>> bias, std::vector<double> slope,
                         std::vector<int64_t> kind, std::vector<double> p0,
                         std::vector<double> p1, std::vector<bool> from_output, bool keep_saved)
    : keep_saved_(keep_saved) {
  const size_t n = w_low.size();
  TORCH_CHECK(n > 0 && w32.size() == n && bias.size() == n && slope.size() == n &&
                  kind.size() == n && p0.size() == n && p1.size() == n &&
                  from_output.size() == n,
              "LinearChain: one weight, bias and activation per layer");
  layers_.resize(n);
  for (size_t l = 0; l < n; ++l) {
    Layer& L = layers_[l];
    L.thin = l + 1 == n;
    L.w32 = w32[l];
    check_f32(L.w32, "w32");
    if (!L.thin) {
      L.w_low = w_low[l];
      TORCH_CHECK(L.w_low.scalar_type() == kLow && L.w_low.sizes() == L.w32.sizes(),
                  "LinearChain: w_low must be the bf16 copy of w32");
    }
    if (bias[l].has_value() && bias[l]->defined()) {
      L.b32 = *bias[l];
      check_f32(L.b32, "bias");
      if (!L.thin) L.b_low = L.b32.to(kLow);
    }
    if (std::isfinite(slope[l])) {
      L.act = Act::kMask;
      L.slope = slope[l];
    } else if (kind[l] >= 0) {
      L.act = Act::kSmooth;
      L.kind = kind[l];
      L.p0 = p0[l];
      L.p1 = p1[l];
      L.from_output = from_output[l];
    }
    TORCH_CHECK(!L.thin || L.act == Act::kNone, "LinearChain: the last layer has no activation");
    if (l > 0)
      TORCH_CHECK(L.w32.size(1) == layers_[l - 1].w32.size(0),
                  "LinearChain: layer ", l, " reads ", L.w32.size(1), " features, layer ", l - 1,
                  " gives ", layers_[l - 1].w32.size(0));
  }
}

void LinearChain::act_mul_add(const Layer& L, const at::Tensor& t, const at::Tensor& s,
                              at::Tensor out) {
  switch (L.act) {
    case Act::kMask:
      mask_apply_out(L.bits, t, 1.0, L.slope, out);
      break;
    case Act::kSmooth:
      if (L.from_output) {
        output_mul_add_into(L.kept, t, opt(s), L.kind, L.p0, L.p1, out);
      } else {
        z_mul_add_into(L.kept, t, opt(s), L.kind, L.p0, L.p1, out);
      }
      break;
    case Act::kNone:
      out.copy_(t);
      break;
  }
}

at::Tensor LinearChain::forward(const at::Tensor& x) {
  check_f32(x, "x");
  const int64_t in0 = layers_[0].w32.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.numel() == x.size(0) * in0, "LinearChain: x ", x.sizes(),
              " does not flatten to (B, ", in0, ")");
  x_shape_ = x.sizes().vec();
  const int64_t b = x.size(0);
  const auto low = x.options().dtype(kLow);
  layers_[0].ar = at::empty({2 * b, in0}, low);
  at::Tensor x_low = top(layers_[0].ar);
  narrow_into(x.view({b, in0}), x_low);  // x's finiteness: the caller's check (check_finite)
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = layers_[l];
    const at::Tensor a = top(L.ar);
    if (L.thin) return thin_linear(a, L.w32, opt(L.b32));
    Layer& next = layers_[l + 1];
    next.ar = at::empty({2 * b, L.w32.size(0)}, low);
    if (L.act != Act::kNone) {
      const at::Tensor z =
          L.b_low.defined() ? at::addmm(L.b_low, a, L.w_low.t()) : at::mm(a, L.w_low.t());
      at::Tensor y = top(next.ar);
      if (L.act == Act::kMask) {
        L.bits = activate_into(z, L.slope, y);
      } else {
        if (!all_finite(z))
          throw NonFinitePreActivation("LinearChain: non-finite pre-activation");
        smooth_value_into(z, L.kind, L.p0, L.p1, y);
        L.kept = L.from_output ? y : z;
      }
    } else {
      at::Tensor y = top(next.ar);
      if (L.b_low.defined()) {
        at::addmm_out(y, L.b_low, a, L.w_low.t());
      } else {
        at::mm_out(y, a, L.w_low.t());
      }
    }
  }
  TORCH_CHECK(false, "LinearChain: no last layer");
}

at::Tensor LinearChain::chain(const at::Tensor& pen_grad) {
  check_f32(pen_grad, "pen_grad");
  at::Tensor d = pen_grad;
  const int64_t b = pen_grad.size(0);
  for (size_t l = layers_.size(); l-- > 0;) {
    Layer& L = layers_[l];
    if (L.thin) {
      L.d = d;
      d = thin_input_grad(d, L.w32, kLow);
      continue;
    }
    L.zd = at::empty({2 * b, L.w32.size(0)}, d.options().dtype(kLow));
    const at::Tensor delta = bottom(L.zd);
    if (L.act == Act::kSmooth) L.u = d;
    act_mul_add(L, d, at::Tensor(), delta);
    if (l == 0 && !keep_saved_) {
      // g is made where pass 3 reads r: the caller scales it into r in place
      at::Tensor g = bottom(L.ar);
      at::mm_out(g, delta, L.w_low);
      d = g;
    } else {
      d = at::mm(delta, L.w_low);
    }
  }
  return d.view(x_shape_);
}

at::Tensor LinearChain::tangent(const at::Tensor& r_in) {
  TORCH_CHECK(r_in.numel() == layers_[0].ar.numel() / 2,
              "LinearChain: the tangent seed has ", r_in.numel(), " values, x ",
              layers_[0].ar.numel() / 2);
  at::Tensor r0 = bottom(layers_[0].ar);
  if (r_in.data_ptr() != r0.data_ptr()) r0.copy_(r_in.reshape(r0.sizes()));
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = layers_[l];
    const at::Tensor r = bottom(L.ar);
    if (L.thin) return thin_linear(r, L.w32, c10::nullopt);
    at::Tensor out = bottom(layers_[l + 1].ar);
    if (L.act == Act::kMask) {
      mask_apply_out(L.bits, at::mm(r, L.w_low.t()), 1.0, L.slope, out);
    } else if (L.act == Act::kSmooth) {
      const at::Tensor t = at::mm(r, L.w_low.t());
      L.s = L.from_output ? output_tangent_into(L.kept, t, L.u, L.kind, L.p0, L.p1, out)
                          : z_tangent_into(L.kept, t, L.u, L.kind, L.p0, L.p1, out);
      if (!keep_saved_) L.u = at::Tensor();
    } else {
      at::mm_out(out, r, L.w_low.t());
    }
  }
  TORCH_CHECK(false, "LinearChain: no last layer");
}

std::vector<at::Tensor> LinearChain::backward(const at::Tensor& zbar, bool need_input_grad,
                                              bool with_tangent) {
  check_f32(zbar, "zbar");
  const size_t n = layers_.size();
  std::vector<at::Tensor> grads(2 * n);
  at::Tensor ab = zbar;
  for (size_t k = n; k-- > 0;) {
    Layer& L = layers_[k];
    if (L.thin) {
      std::vector<at::Tensor> ds{ab}, as{top(L.ar)};
      if (with_tangent) {
        ds.push_back(L.d);
        as.push_back(bottom(L.ar));
      }
      auto [gw, gb] = thin_weight_grad(ds, as, c10::nullopt, L.b32.defined());
      grads[2 * k] = gw;
      if (gb.has_value()) grads[2 * k + 1] = *gb;
    } else {
      const at::Tensor zb = top(L.zd);
      act_mul_add(L, ab, with_tangent ? L.s : at::Tensor(), zb);
      const at::Tensor gw = with_tangent ? at::mm(L.zd.t(), L.ar) : at::mm(zb.t(), top(L.ar));
      grads[2 * k] = widened(gw);
      if (L.b32.defined()) grads[2 * k + 1] = channel_sum(zb);
      ab = zb;
    }
    at::Tensor next;
    if (k > 0 || need_input_grad)
      next = L.thin ? thin_input_grad(ab, L.w32, kLow) : at::mm(ab, L.w_low);
    if (!keep_saved_) L.ar = L.zd = L.d = L.bits = L.kept = L.u = L.s = at::Tensor();
    ab = next;
  }
  if (need_input_grad) grads.push_back(ab.view(x_shape_));
  return grads;
}

}  // namespace gradreg
