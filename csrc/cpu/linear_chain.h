// The four passes of a plain Linear chain in one native object (CPU autocast, bf16 products):
//
//   x → [Linear → (ReLU | LeakyReLU | a smooth σ)?] × (L − 1) → Linear (K ≤ THIN_MAX) → logits
//
// The kernels and storage the Python schedule's cpu backend uses for these layers
// (docs/math.md §6), called from here: bf16 products through ATen's mm / addmm (oneDNN), the
// packed-mask and smooth sweeps, the thin kernels of the last layer, the float32 bias sums
// and weight-gradient widening (each weight gradient one doubled-batch product). What it saves is the schedule's per-step cost in
// Python (rules, backend dispatch, a few hundred µs a step), which the small batches of an
// MLP cannot hide behind their products. The head, the penalty and its seed stay with the
// caller (forward → chain → [caller: penalty, r] → tangent → [caller: head HVP] → backward).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <stdexcept>
#include <vector>

namespace gradreg {

// What LinearChain::forward throws where a smooth activation's pre-activation holds a NaN /
// ±inf (its sweeps are exact for finite values only; torch's σ', σ'' belong there)
struct NonFinitePreActivation : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class LinearChain {
 public:
  // Layer l: weight w_low[l] (out, in) bf16, as the products read it; w32[l] its float32
  // source (read by the thin kernels of the last layer); bias[l] float32 or none. The
  // activation after it: slope[l] finite for a masked one (0: ReLU, else LeakyReLU's
  // slope); else kind[l] ≥ 0 for a smooth one (activation_codes.h), with its parameters
  // p0[l], p1[l] and from_output[l] (σ', σ'' functions of y, which is kept; else z is);
  // else none (the last layer has none). keep_saved: nothing is released between passes,
  // so that passes 3-4 can run again. A smooth layer's z with a NaN / ±inf stops pass 1
  // with NonFinitePreActivation (the caller runs the step another way).
  LinearChain(std::vector<at::Tensor> w_low, std::vector<at::Tensor> w32,
              std::vector<c10::optional<at::Tensor>> bias, std::vector<double> slope,
              std::vector<int64_t> kind, std::vector<double> p0, std::vector<double> p1,
              std::vector<bool> from_output, bool keep_saved);

  // pass 1: x (B, ...) float32 → logits (B, K) float32
  at::Tensor forward(const at::Tensor& x);
  // pass 2: ∇ℓ at the logits (B, K) float32 → g = ∇_X Σ ℓ in x's shape (bf16)
  at::Tensor chain(const at::Tensor& pen_grad);
  // pass 3: r in x's shape (bf16) → the logits' tangent (B, K) float32
  at::Tensor tangent(const at::Tensor& r);
  // pass 4: z̄ at the logits (B, K) float32 → [ΔW_1, Δb_1, ..., ΔW_L, Δb_L] float32 (a layer
  // without bias gives an undefined Δb) and, when need_input_grad, ā at x (bf16, x's shape)
  // last; with_tangent: pass 3 ran (its weight terms are added)
  std::vector<at::Tensor> backward(const at::Tensor& zbar, bool need_input_grad,
                                   bool with_tangent);

 private:
  // Each weight gradient is one doubled-batch product [z̄; δ]ᵀ [a; r]: its operands are the
  // two row blocks of one buffer each, written there by the sweeps that make them (a in
  // pass 1, δ in pass 2, r in pass 3, z̄ in pass 4), so that the product reads them with no
  // stacking copy and its one bf16 result is widened once.
  enum class Act { kNone, kMask, kSmooth };
  struct Layer {
    at::Tensor w_low, w32, b32, b_low;
    Act act = Act::kNone;
    double slope = 0.0;           // kMask
    int64_t kind = -1;            // kSmooth: its code, parameters and what it keeps
    double p0 = 0.0, p1 = 0.0;
    bool from_output = false;
    bool thin = false;
    at::Tensor ar;    // (2B, in) bf16: [a; r], the layer's input and its tangent
    at::Tensor zd;    // (2B, out) bf16: [z̄; δ] (hidden layers)
    at::Tensor d;     // the thin layer's δ: ∇ℓ at the logits (B, K) float32
    at::Tensor bits;  // kMask: the packed mask
    at::Tensor kept;  // kSmooth: y or z
    at::Tensor u;     // kSmooth: pass 2's gradient at the output, until pass 3
    at::Tensor s;     // kSmooth: pass 3's σ'' ⊙ u ⊙ r, until pass 4
  };
  // σ' ⊙ t (+ s) of layer L's activation into out (a copy without one)
  static void act_mul_add(const Layer& L, const at::Tensor& t, const at::Tensor& s,
                          at::Tensor out);
  std::vector<Layer> layers_;
  bool keep_saved_;
  std::vector<int64_t> x_shape_;
};

}  // namespace gradreg
