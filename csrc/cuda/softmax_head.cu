// The softmax cross-entropy head, one warp per row of the logits z (N, K):
//   CE_n = logsumexp(z_n) − z_{n, y_n},  p = softmax(z)   (float32 outputs)
//   H t  = p ⊙ t − p (pᵀ t)                               (float32 output)
#include "common.cuh"

namespace gradreg {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void softmax_ce_kernel(const T* __restrict__ z, const int64_t* __restrict__ y,
                                  float* __restrict__ ce, float* __restrict__ p, int64_t n,
                                  int64_t k) {
  int64_t row = blockIdx.x * (int64_t)kWarpsPerBlock + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= n) return;
  const T* zr = z + row * k;
  float mx = -INFINITY;
  for (int64_t j = lane; j < k; j += 32) mx = fmaxf(mx, to_f32(zr[j]));
  mx = warp_max(mx);
  float tot = 0.0f;
  for (int64_t j = lane; j < k; j += 32) tot += expf(to_f32(zr[j]) - mx);
  tot = warp_sum(tot);
  float inv = 1.0f / tot;
  float* pr = p + row * k;
  for (int64_t j = lane; j < k; j += 32) pr[j] = expf(to_f32(zr[j]) - mx) * inv;
  if (lane == 0) {
    const int64_t label = y[row];  // out of range (unchecked labels): NaN, never a stray read
    ce[row] = (label >= 0 && label < k) ? mx + logf(tot) - to_f32(zr[label]) : NAN;
  }
}

template <typename T>
__global__ void softmax_hvp_kernel(const float* __restrict__ p, const T* __restrict__ t,
                                   float* __restrict__ out, int64_t n, int64_t k) {
  int64_t row = blockIdx.x * (int64_t)kWarpsPerBlock + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= n) return;
  const float* pr = p + row * k;
  const T* tr = t + row * k;
  float dot = 0.0f;
  for (int64_t j = lane; j < k; j += 32) dot += pr[j] * to_f32(tr[j]);
  dot = warp_sum(dot);
  for (int64_t j = lane; j < k; j += 32) out[row * k + j] = pr[j] * (to_f32(tr[j]) - dot);
}

unsigned int row_blocks(int64_t n) {
  return static_cast<unsigned int>((n + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

void launch_softmax_ce(int dtype, const void* z, const int64_t* y, float* ce, float* p,
                       int64_t n, int64_t k, cudaStream_t stream) {
  dim3 block(32 * kWarpsPerBlock);
  switch (dtype) {
    case kFloat32:
      softmax_ce_kernel<float><<<row_blocks(n), block, 0, stream>>>(
          static_cast<const float*>(z), y, ce, p, n, k);
      break;
    case kFloat16:
      softmax_ce_kernel<__half><<<row_blocks(n), block, 0, stream>>>(
          static_cast<const __half*>(z), y, ce, p, n, k);
      break;
    default:
      softmax_ce_kernel<__nv_bfloat16><<<row_blocks(n), block, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(z), y, ce, p, n, k);
  }
}

void launch_softmax_hvp(int dtype, const float* p, const void* t, float* out, int64_t n,
                        int64_t k, cudaStream_t stream) {
  dim3 block(32 * kWarpsPerBlock);
  switch (dtype) {
    case kFloat32:
      softmax_hvp_kernel<float><<<row_blocks(n), block, 0, stream>>>(
          p, static_cast<const float*>(t), out, n, k);
      break;
    case kFloat16:
      softmax_hvp_kernel<__half><<<row_blocks(n), block, 0, stream>>>(
          p, static_cast<const __half*>(t), out, n, k);
      break;
    default:
      softmax_hvp_kernel<__nv_bfloat16><<<row_blocks(n), block, 0, stream>>>(
          p, static_cast<const __nv_bfloat16*>(t), out, n, k);
  }
}

}  // namespace gradreg
