// Fused elementwise activation steps of the four passes (see backends/cuda.py):
//   forward:  y = σ(z), mask = (z > 0) for piecewise-linear σ (ReLU, LeakyReLU)
//   chain:    out = σ'(z) ⊙ d (+ s)          (σ' from the mask or from z)
//   tangent:  out = σ'(z) ⊙ r,  s = σ''(z) ⊙ u ⊙ r   (smooth σ)
// Activation codes: act_code::k<Name> of csrc/common/activation_codes.h (generated from
// gradreg_kernels/activation_table.py); parameters: leaky_relu p0 = slope, softplus p0 = β,
// p1 = threshold, elu p0 = α.
// Math in float32.
#include "../common/activation_codes.h"
#include "common.cuh"

namespace gradreg {
namespace {

constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluC = 0.044715f;

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// Mish from w = e^z alone (no log, no cancellation): n = w (w + 2), t = tanh(softplus z) =
// n/(n + 2), 1 − t² = 4 (n + 1)/(n + 2)², s = sigmoid z = w/(1 + w); w clamped at e^20,
// above which 1 − t² is 0, as torch's is (so that z (1 − t²) vanishes at huge z).
struct MishParts {
  float t, g, s;
};

__device__ __forceinline__ MishParts mish_parts(float z) {
  float w = expf(fminf(z, 20.0f));
  float n = w * (w + 2.0f);
  float inv = 1.0f / (n + 2.0f);
  return {n * inv, z > 20.0f ? 0.0f : 4.0f * (n + 1.0f) * inv * inv, w / (1.0f + w)};
}

__device__ float act_value(float z, int act, float p0, float p1) {
  switch (act) {
    case act_code::kRelu: return z > 0.0f ? z : 0.0f;
    case act_code::kLeakyRelu: return z > 0.0f ? z : z * p0;
    case act_code::kSoftplus: {
      float bz = z * p0;
      return bz > p1 ? z : log1pf(expf(bz)) / p0;
    }
    case act_code::kTanh: return tanhf(z);
    case act_code::kSigmoid: return sigmoidf(z);
    case act_code::kGelu: return 0.5f * z * (1.0f + erff(z * kInvSqrt2));
    case act_code::kGeluTanh: return 0.5f * z * (1.0f + tanhf(kSqrt2OverPi * (z + kGeluC * z * z * z)));
    case act_code::kSilu: return z * sigmoidf(z);
    case act_code::kMish: return z * mish_parts(z).t;
    case act_code::kHardswish: return z * fminf(fmaxf(z + 3.0f, 0.0f), 6.0f) / 6.0f;
    default: return z > 0.0f ? z : p0 * expm1f(z);
  }
}

__device__ float act_d1(float z, int act, float p0, float p1) {
  switch (act) {
    case act_code::kRelu: return z > 0.0f ? 1.0f : 0.0f;
    case act_code::kLeakyRelu: return z > 0.0f ? 1.0f : p0;
    case act_code::kSoftplus: {
      float bz = z * p0;
      return bz > p1 ? 1.0f : sigmoidf(bz);
    }
    case act_code::kTanh: {
      float t = tanhf(z);
      return 1.0f - t * t;
    }
    case act_code::kSigmoid: {
      float s = sigmoidf(z);
      return s * (1.0f - s);
    }
    case act_code::kGelu: return 0.5f * (1.0f + erff(z * kInvSqrt2)) + z * expf(-0.5f * z * z) * kInvSqrt2Pi;
    case act_code::kGeluTanh: {
      float t = tanhf(kSqrt2OverPi * (z + kGeluC * z * z * z));
      float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluC * z * z);
      return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du;
    }
    case act_code::kSilu: {
      float s = sigmoidf(z);
      return s * (1.0f + z * (1.0f - s));
    }
    case act_code::kMish: {
      MishParts m = mish_parts(z);
      return m.t + z * m.s * m.g;
    }
    case act_code::kHardswish: return z < -3.0f ? 0.0f : (z <= 3.0f ? z / 3.0f + 0.5f : 1.0f);
    default: return z > 0.0f ? 1.0f : p0 * expf(fminf(z, 0.0f));
  }
}

__device__ float act_d2(float z, int act, float p0, float p1) {
  switch (act) {
    case act_code::kSoftplus: {
      float bz = z * p0;
      float s = sigmoidf(bz);
      return bz > p1 ? 0.0f : p0 * s * (1.0f - s);
    }
    case act_code::kTanh: {
      float t = tanhf(z);
      return -2.0f * t * (1.0f - t * t);
    }
    case act_code::kSigmoid: {
      float s = sigmoidf(z);
      return s * (1.0f - s) * (1.0f - 2.0f * s);
    }
    case act_code::kGelu: return expf(-0.5f * z * z) * kInvSqrt2Pi * (2.0f - z * z);
    case act_code::kGeluTanh: {
      float t = tanhf(kSqrt2OverPi * (z + kGeluC * z * z * z));
      float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluC * z * z);
      float ddu = 6.0f * kSqrt2OverPi * kGeluC * z;
      float g = 1.0f - t * t;
      float gz = g * z;  // first: where t = ±1 the products stay 0 until u' overflows
      return g * du + 0.5f * gz * ddu - gz * t * du * du;
    }
    case act_code::kElu: return z > 0.0f ? 0.0f : p0 * expf(fminf(z, 0.0f));
    case act_code::kSilu: {
      float s = sigmoidf(z);
      return s * (1.0f - s) * (2.0f + z * (1.0f - 2.0f * s));
    }
    case act_code::kMish: {
      MishParts m = mish_parts(z);
      return m.s * m.g * (2.0f + z * (1.0f - m.s - 2.0f * m.t * m.s));
    }
    case act_code::kHardswish: return (z > -3.0f && z < 3.0f) ? 1.0f / 3.0f : 0.0f;
    default: return 0.0f;
  }
}

template <typename T>
__global__ void act_forward_kernel(const T* __restrict__ z, T* __restrict__ y,
                                   uint8_t* __restrict__ mask, int64_t n, int act, float p0,
                                   float p1, float v_pos, float v_neg) {
  // torch's σ(±inf) = (v_pos, v_neg) at the infinities and NaN at a NaN: the formulas'
  // fminf / fmaxf and 0/1 blends would give finite values or 0 · inf there
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float v = to_f32(z[i]);
    float out = act_value(v, act, p0, p1);
    if (isinf(v)) out = v > 0.0f ? v_pos : v_neg;
    if (isnan(v)) out = v;
    y[i] = from_f32<T>(out);
    // torch's bit at a NaN: ReLU's backward reads its output (NaN <= 0 is false: on),
    // LeakyReLU's reads z > 0 (false: the slope)
    if (mask != nullptr) mask[i] = (act == act_code::kRelu ? !(v <= 0.0f) : v > 0.0f) ? 1 : 0;
  }
}

// saved is a uint8 mask when mask_state, else z of type T.
template <typename T>
__global__ void act_chain_kernel(const void* __restrict__ saved, bool mask_state,
                                 const T* __restrict__ d, const T* __restrict__ s,
                                 T* __restrict__ out, int64_t n, int act, float p0, float p1) {
  const uint8_t* m = static_cast<const uint8_t*>(saved);
  const T* z = static_cast<const T*>(saved);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float v;
    if (mask_state) {  // a select, as torch's: an off ReLU element is 0 even at a NaN d
      const float dv = to_f32(d[i]);
      v = m[i] ? dv : (act == act_code::kLeakyRelu ? p0 * dv : 0.0f);
    } else {  // σ'(NaN) = NaN, as torch's vectorized backward loops give for these kinds
      const float zv = to_f32(z[i]);
      v = (isnan(zv) ? zv : act_d1(zv, act, p0, p1)) * to_f32(d[i]);
    }
    if (s != nullptr) v += to_f32(s[i]);
    out[i] = from_f32<T>(v);
  }
}

template <typename T>
__global__ void act_tangent_kernel(const T* __restrict__ z, const T* __restrict__ r,
                                   const T* __restrict__ u, T* __restrict__ out,
                                   T* __restrict__ s, int64_t n, int act, float p0, float p1) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float zv = to_f32(z[i]);
    float rv = to_f32(r[i]);
    const float d1 = isnan(zv) ? zv : act_d1(zv, act, p0, p1);
    const float d2 = isnan(zv) ? zv : act_d2(zv, act, p0, p1);
    out[i] = from_f32<T>(d1 * rv);
    s[i] = from_f32<T>(d2 * to_f32(u[i]) * rv);
  }
}

constexpr int kThreads = 256;

}  // namespace

#define GRADREG_DISPATCH(dtype, ...)                          \
  switch (dtype) {                                            \
    case kFloat32: { using T = float; __VA_ARGS__; break; }   \
    case kFloat16: { using T = __half; __VA_ARGS__; break; }  \
    default: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
  }

void launch_act_forward(int dtype, const void* z, void* y, uint8_t* mask, int64_t n, int act,
                        float p0, float p1, float v_pos, float v_neg, cudaStream_t stream) {
  GRADREG_DISPATCH(dtype, act_forward_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(z), static_cast<T*>(y), mask, n, act, p0, p1, v_pos, v_neg));
}

void launch_act_chain(int dtype, const void* saved, bool mask_state, const void* d,
                      const void* s, void* out, int64_t n, int act, float p0, float p1,
                      cudaStream_t stream) {
  GRADREG_DISPATCH(dtype, act_chain_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      saved, mask_state, static_cast<const T*>(d), static_cast<const T*>(s),
      static_cast<T*>(out), n, act, p0, p1));
}

void launch_act_tangent(int dtype, const void* z, const void* r, const void* u, void* out,
                        void* s, int64_t n, int act, float p0, float p1, cudaStream_t stream) {
  GRADREG_DISPATCH(dtype, act_tangent_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(z), static_cast<const T*>(r), static_cast<const T*>(u),
      static_cast<T*>(out), static_cast<T*>(s), n, act, p0, p1));
}

}  // namespace gradreg
