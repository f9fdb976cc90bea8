// Python binding of the CUDA kernels: checks operands, picks the dtype, launches on the
// stream the caller passes (torch.cuda.current_stream().cuda_stream, as an integer), with
// the operands' device current. Loaded by gradreg_kernels/backends/cuda.py.
// Only torch/extension.h and the CUDA runtime are included, so the file builds against any
// torch with the CUDA toolkit's headers.
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace gradreg {

void launch_act_forward(int dtype, const void* z, void* y, uint8_t* mask, int64_t n, int act,
                        float p0, float p1, float v_pos, float v_neg, cudaStream_t stream);
void launch_act_chain(int dtype, const void* saved, bool mask_state, const void* d,
                      const void* s, void* out, int64_t n, int act, float p0, float p1,
                      cudaStream_t stream);
void launch_act_tangent(int dtype, const void* z, const void* r, const void* u, void* out,
                        void* s, int64_t n, int act, float p0, float p1, cudaStream_t stream);
void launch_softmax_ce(int dtype, const void* z, const int64_t* y, float* ce, float* p,
                       int64_t n, int64_t k, cudaStream_t stream);
void launch_softmax_hvp(int dtype, const float* p, const void* t, float* out, int64_t n,
                        int64_t k, cudaStream_t stream);

namespace {

int dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* what) {
  check_cuda(t, what);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), what, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.numel() == ref.numel(), what, " has ", t.numel(), " elements, expected ",
              ref.numel());
}

cudaStream_t as_stream(int64_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void check_launch() {
  cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "gradreg CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

// (y, mask): y = σ(z), with σ(±inf) = (v_pos, v_neg) as torch gives them; mask = (z > 0) as
// uint8 when save_mask, else an empty tensor.
std::vector<at::Tensor> act_forward(const at::Tensor& z, int64_t act, double p0, double p1,
                                    double v_pos, double v_neg, bool save_mask, int64_t stream) {
  check_cuda(z, "z");
  auto y = at::empty_like(z);
  auto mask = save_mask ? at::empty(z.sizes(), z.options().dtype(at::kByte)) : at::Tensor();
  launch_act_forward(dtype_code(z, "z"), z.data_ptr(), y.data_ptr(),
                     save_mask ? mask.data_ptr<uint8_t>() : nullptr, z.numel(),
                     static_cast<int>(act), static_cast<float>(p0), static_cast<float>(p1),
                     static_cast<float>(v_pos), static_cast<float>(v_neg), as_stream(stream));
  check_launch();
  return {y, mask};
}

// σ'(z) ⊙ d (+ s); saved is the uint8 mask (piecewise σ) or z with d's dtype.
at::Tensor act_chain(const at::Tensor& saved, const at::Tensor& d,
                     const std::optional<at::Tensor>& s, int64_t act, double p0, double p1,
                     int64_t stream) {
  check_cuda(d, "d");
  const bool mask_state = saved.scalar_type() == at::kByte;
  if (mask_state) {
    check_cuda(saved, "mask");
    TORCH_CHECK(saved.numel() == d.numel(), "mask and d differ in size");
  } else {
    check_like(saved, d, "z");
  }
  if (s.has_value()) check_like(*s, d, "s");
  auto out = at::empty_like(d);
  launch_act_chain(dtype_code(d, "d"), saved.data_ptr(), mask_state, d.data_ptr(),
                   s.has_value() ? s->data_ptr() : nullptr, out.data_ptr(), d.numel(),
                   static_cast<int>(act), static_cast<float>(p0), static_cast<float>(p1),
                   as_stream(stream));
  check_launch();
  return out;
}

// (σ'(z) ⊙ r, σ''(z) ⊙ u ⊙ r) for smooth σ; z, r, u share one dtype.
std::vector<at::Tensor> act_tangent(const at::Tensor& z, const at::Tensor& r,
                                    const at::Tensor& u, int64_t act, double p0, double p1,
                     int64_t stream) {
  check_cuda(r, "r");
  check_like(z, r, "z");
  check_like(u, r, "u");
  auto out = at::empty_like(r);
  auto s = at::empty_like(r);
  launch_act_tangent(dtype_code(r, "r"), z.data_ptr(), r.data_ptr(), u.data_ptr(),
                     out.data_ptr(), s.data_ptr(), r.numel(), static_cast<int>(act),
                     static_cast<float>(p0), static_cast<float>(p1), as_stream(stream));
  check_launch();
  return {out, s};
}

// (CE (N,), p (N, K)) in float32 from logits z (N, K) and int64 labels y (N,).
std::vector<at::Tensor> softmax_ce(const at::Tensor& z, const at::Tensor& y, int64_t stream) {
  check_cuda(z, "z");
  check_cuda(y, "y");
  TORCH_CHECK(z.dim() == 2, "z must be (N, K)");
  TORCH_CHECK(y.scalar_type() == at::kLong && y.numel() == z.size(0),
              "y must be int64 of shape (N,)");
  auto opts = z.options().dtype(at::kFloat);
  auto ce = at::empty({z.size(0)}, opts);
  auto p = at::empty(z.sizes(), opts);
  launch_softmax_ce(dtype_code(z, "z"), z.data_ptr(), y.data_ptr<int64_t>(),
                    ce.data_ptr<float>(), p.data_ptr<float>(), z.size(0), z.size(1),
                    as_stream(stream));
  check_launch();
  return {ce, p};
}

// p ⊙ t − p (pᵀ t) row by row, float32 (N, K); p float32.
at::Tensor softmax_hvp(const at::Tensor& p, const at::Tensor& t, int64_t stream) {
  check_cuda(p, "p");
  check_cuda(t, "t");
  TORCH_CHECK(p.scalar_type() == at::kFloat, "p must be float32");
  TORCH_CHECK(p.dim() == 2 && t.sizes() == p.sizes(), "p and t must be the same (N, K)");
  auto out = at::empty(p.sizes(), p.options());
  launch_softmax_hvp(dtype_code(t, "t"), p.data_ptr<float>(), t.data_ptr(),
                     out.data_ptr<float>(), p.size(0), p.size(1), as_stream(stream));
  check_launch();
  return out;
}

}  // namespace gradreg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradreg-kernels CUDA kernels: activation steps and the softmax-CE head";
  m.def("act_forward", &gradreg::act_forward, "y = act(z) and the mask");
  m.def("act_chain", &gradreg::act_chain, "act'(z) * d (+ s)");
  m.def("act_tangent", &gradreg::act_tangent, "(act'(z) * r, act''(z) * u * r)");
  m.def("softmax_ce", &gradreg::softmax_ce, "(CE, softmax) of logits");
  m.def("softmax_hvp", &gradreg::softmax_hvp, "softmax Hessian-vector product");
}
