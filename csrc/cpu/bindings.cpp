// Python bindings of the fused CPU kernels (module built by gradreg_kernels/backends/cpu_build.py).
#include <torch/extension.h>

#include "kernels.h"
#include "linear_chain.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradreg-kernels fused CPU kernels (float32; bf16 where CPU autocast needs it)";
  m.def("mask_forward", &gradreg::mask_forward, "y = z>0 ? z : lo z, the packed bit mask, whether every z is finite",
        pybind11::arg("z"), pybind11::arg("lo"), pybind11::arg("out_dtype") = pybind11::none());
  m.def("mask_apply", &gradreg::mask_apply, "t ⊙ (bit ? hi : lo)", pybind11::arg("bits"),
        pybind11::arg("t"), pybind11::arg("hi"), pybind11::arg("lo"),
        pybind11::arg("out_dtype") = pybind11::none());
  m.def("mask_forward_out",
        [](const at::Tensor& z, double lo, at::Tensor y) { return gradreg::mask_forward_out(z, lo, y); },
        "mask_forward into y (a contiguous block of a buffer): the bits, whether z is finite");
  m.def("mask_apply_out",
        [](const at::Tensor& bits, const at::Tensor& t, double hi, double lo, at::Tensor out) {
          gradreg::mask_apply_out(bits, t, hi, lo, out);
        },
        "mask_apply into out (a contiguous block of a buffer)");
  m.def("dropout_forward", &gradreg::dropout_forward, "a ⊙ keep · scale and the packed mask");
  m.def("smooth_value", &gradreg::smooth_value, "σ(z) alone");
  m.def("z_mul_add", &gradreg::z_mul_add, "σ'(z) ⊙ t (+ s) from the kept z",
        pybind11::arg("z"), pybind11::arg("t"), pybind11::arg("s"), pybind11::arg("kind"),
        pybind11::arg("p0"), pybind11::arg("p1"));
  m.def("z_tangent", &gradreg::z_tangent, "(σ'(z) ⊙ r, σ''(z) ⊙ u ⊙ r) from the kept z");
  m.def("output_mul_add", &gradreg::output_mul_add, "σ'(y) ⊙ t (+ s) from the output y",
        pybind11::arg("y"), pybind11::arg("t"), pybind11::arg("s"), pybind11::arg("kind"),
        pybind11::arg("p0"), pybind11::arg("p1"));
  m.def("output_tangent", &gradreg::output_tangent, "(σ'(y) ⊙ r, σ''(y) ⊙ u ⊙ r) from y");
  m.def("softmax_head", &gradreg::softmax_head, "CE, p, ∇CE, ∇ℓ of the softmax heads");
  m.def("softmax_hvp", &gradreg::softmax_hvp, "p ⊙ (t − pᵀt)");
  m.def("target_head", &gradreg::target_head,
        "ℓ, ∇ℓ and the Hessian's diagonal of the mse (0) / bce (1) head, row by row");
  m.def("max_pool2d", &gradreg::max_pool2d, "max pooling and the flat argmax per plane");
  m.def("pool_gather", &gradreg::pool_gather, "r[idx] per plane");
  m.def("pool_scatter", &gradreg::pool_scatter, "scatter-add of d into idx per plane");
  auto none = pybind11::none();
  m.def("bn_forward", &gradreg::bn_forward, "train-mode batch norm forward per channel",
        pybind11::arg("a"), pybind11::arg("gamma"), pybind11::arg("beta"), pybind11::arg("eps"),
        pybind11::arg("out_dtype") = none);
  m.def("bn_project", &gradreg::bn_project, "P v and mean(x̂ v) per channel");
  m.def("bn_chain", &gradreg::bn_chain, "k P δ, mean(δ), mean(x̂ δ) per channel",
        pybind11::arg("d"), pybind11::arg("xhat"), pybind11::arg("k"),
        pybind11::arg("out_dtype") = none);
  m.def("bn_tangent", &gradreg::bn_tangent, "k P r, the second-order term s, Σ δ P r / σ",
        pybind11::arg("r"), pybind11::arg("xhat"), pybind11::arg("d"), pybind11::arg("k"),
        pybind11::arg("inv_std"), pybind11::arg("gamma"), pybind11::arg("md"),
        pybind11::arg("mxd"), pybind11::arg("out_dtype") = none);
  m.def("bn_backward", &gradreg::bn_backward, "k P ā (+ s), Σ ā x̂, Σ ā per channel",
        pybind11::arg("abar"), pybind11::arg("xhat"), pybind11::arg("k"),
        pybind11::arg("s") = none, pybind11::arg("out_dtype") = none);
  m.def("sum_squares", &gradreg::sum_squares, "Σ t² as a 0-dim tensor (double accumulation)");
  m.def("all_finite", &gradreg::all_finite, "whether every value of t is finite");
  m.def("all_finite_many", &gradreg::all_finite_many,
        "whether every value of every tensor is finite (one thread)");
  m.def("channel_sum", &gradreg::channel_sum, "Σ t per channel of (N, C, S) (float32 result)");
  m.def("widened_sum", &gradreg::widened_sum, "a + b as float32 (operands float32 or bf16)");
  m.def("widened", &gradreg::widened, "t's float32 copy (t contiguous bf16)");
  m.def("narrow_into", [](const at::Tensor& src, at::Tensor dst) { return gradreg::narrow_into(src, dst); },
        "dst = bf16(src) into a contiguous block; whether src is finite");
  m.def("narrowed_all_finite", &gradreg::narrowed_all_finite,
        "bf16 copies of float32 tensors and whether every value is finite, in one sweep");
  m.def("col_fold", &gradreg::col_fold, "F.fold for stride 1, dilation 1 (float32 result)");
  m.def("channel_dot", &gradreg::channel_dot, "Σ a ⊙ b per channel of (N, C, S) operands");
  m.def("thin_linear", &gradreg::thin_linear, "a Wᵀ (+ b) for a few outputs",
        pybind11::arg("a"), pybind11::arg("w"), pybind11::arg("b") = pybind11::none());
  m.def("thin_input_grad", &gradreg::thin_input_grad, "d W for a few outputs", pybind11::arg("d"),
        pybind11::arg("w"), pybind11::arg("out_dtype") = pybind11::none());
  m.def("thin_weight_grad", &gradreg::thin_weight_grad,
        "Σ_p d_pᵀ a_p (+ acc, in place) and Σ_n d_1 when asked, for a few outputs");
  m.def("transpose_cat", &gradreg::transpose_cat, "[P_1; P_2; ...]ᵀ in one buffer");
  m.def("transpose_cat_sum", &gradreg::transpose_cat_sum,
        "[P_1; P_2; ...]ᵀ in one buffer and the column sums of P_1");
  pybind11::register_exception<gradreg::NonFinitePreActivation>(m, "NonFinitePreActivation",
                                                                PyExc_RuntimeError);
  pybind11::class_<gradreg::LinearChain>(m, "LinearChain",
                                         "the four passes of a plain Linear chain (bf16)")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<c10::optional<at::Tensor>>, std::vector<double>,
                          std::vector<int64_t>, std::vector<double>, std::vector<double>,
                          std::vector<bool>, bool>(),
           pybind11::arg("w_low"), pybind11::arg("w32"), pybind11::arg("bias"),
           pybind11::arg("slope"), pybind11::arg("kind"), pybind11::arg("p0"),
           pybind11::arg("p1"), pybind11::arg("from_output"), pybind11::arg("keep_saved"))
      .def("forward", &gradreg::LinearChain::forward, "pass 1: the logits")
      .def("chain", &gradreg::LinearChain::chain, "pass 2: g at the input")
      .def("tangent", &gradreg::LinearChain::tangent, "pass 3: the logits' tangent")
      .def("backward", &gradreg::LinearChain::backward, "pass 4: the parameter gradients",
           pybind11::arg("zbar"), pybind11::arg("need_input_grad"),
           pybind11::arg("with_tangent"));
}
