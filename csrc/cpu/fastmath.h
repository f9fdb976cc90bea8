// exp and log1p in plain float arithmetic (no calls, no branches), so that loops over them
// auto-vectorize. Cody–Waite range reduction and Cephes-style polynomials: errors of a few
// float ulps, checked in tests/test_cpu_backend.py through the activation kernels against
// float64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace gradreg {

// min / max as selects (std::fmin's NaN rules keep it from vectorizing)
inline float min_f(float a, float b) { return a < b ? a : b; }
inline float max_f(float a, float b) { return a > b ? a : b; }

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, 4);
  return i;
}

// e^x for x in [−87.3, 88.3], saturating outside (no branches, no subnormals, no inf).
inline float fast_exp(float x) {
  const float xc = min_f(max_f(x, -87.3f), 88.3f);
  // round to nearest by the 1.5·2^23 trick (|k| ≤ 128)
  const float k = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  // e^r on |r| ≤ ln2/2 (Cephes expf coefficients)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * bits_to_float((static_cast<int32_t>(k) + 127) << 23);
}

// log(1 + e) for e ≥ 0 (what softplus needs).
inline float fast_log1p(float e) {
  const float u = 1.f + e;
  // u = m · 2^k with m in [√½, √2)
  int32_t bits = float_to_bits(u);
  int32_t k = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const float hi = static_cast<float>(m > 1.41421356f);
  m = m * (1.f - 0.5f * hi);
  const float s = (m - 1.f) / (m + 1.f);
  const float s2 = s * s;
  float p = 0.11111111f;  // 2 atanh(s) = 2 (s + s³/3 + s⁵/5 + ...)
  p = p * s2 + 0.14285715f;
  p = p * s2 + 0.2f;
  p = p * s2 + 0.33333334f;
  const float logm = 2.f * s * (1.f + s2 * p);
  const float logu = logm + (static_cast<float>(k) + hi) * 0.693147180559945f;
  // u − 1 differs from e by the rounding of 1 + e: first-order correction
  return logu + (e - (u - 1.f)) / u;
}

}  // namespace gradreg
