// exp and log1p in plain float arithmetic (no calls, no branches), so that loops over them
// auto-vectorize. Cody–Waite range reduction and Cephes-style polynomials: errors of a few
// float ulps, checked in tests/test_cpu_backend.py through the activation kernels against
// float64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace gradreg {

// Per-element functions are always inlined (and so are the functors of smooth.cpp /
// smooth_output.cpp): a loop vectorizes only with its whole body inlined, and a function that
// dispatches over several activation kinds can exhaust the compiler's inlining budget, which
// leaves a call per element (10-20x slower, measured).
#if defined(__GNUC__)
#define GRADREG_ELEMENT inline __attribute__((always_inline))
#define GRADREG_ELEMENT_LAMBDA __attribute__((always_inline))
#else
#define GRADREG_ELEMENT inline
#define GRADREG_ELEMENT_LAMBDA
#endif

// min / max as selects (std::fmin's NaN rules keep it from vectorizing)
GRADREG_ELEMENT float min_f(float a, float b) { return a < b ? a : b; }
GRADREG_ELEMENT float max_f(float a, float b) { return a > b ? a : b; }

GRADREG_ELEMENT float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

GRADREG_ELEMENT int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, 4);
  return i;
}

// e^x for x in [−87.3, 88.3]; 0 below (where e^x is at most subnormal) and +inf above, as
// the true value rounds, so that z · σ(z)-style products vanish at huge |z| as torch's do.
// No branches (the two ends are selects), no subnormals.
GRADREG_ELEMENT float fast_exp(float x) {
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
  const float v = p * bits_to_float((static_cast<int32_t>(k) + 127) << 23);
  return x < -87.3f ? 0.f : (x > 88.3f ? std::numeric_limits<float>::infinity() : v);
}

// log(1 + e) for e ≥ 0 (what softplus needs).
GRADREG_ELEMENT float fast_log1p(float e) {
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

// The standard normal's Φ(z) and φ(z) = e^{−z²/2}/√(2π), with Φ's relative accuracy kept in
// the lower tail (where 1 + erf would cancel), from one exp: with a = |z|/√2,
//   a < 1:  erf(a) = a P(a²), P of degree 5;
//   a ≥ 1:  erfc(a) = e^{−a²} R(1/a − 0.6), R of degree 9 (1/a clamped at 0.2;
//           erfc(5) ≈ 1.5e-12),
// both least-squares fits to float64 erf / erfc, weighted to relative error (at most 2-3e-7 in
// float), and Φ = 1 − erfc(a)/2 for z ≥ 0, erfc(a)/2 below.
struct NormalCdfPdf {
  float cdf, pdf;
};

GRADREG_ELEMENT NormalCdfPdf fast_normal_cdf_pdf(float z) {
  const float a = std::fabs(z) * 0.70710678118654752f;
  const float s = a * a;
  const float e = fast_exp(-s);  // e^{−z²/2}
  float p = -5.66799519e-04f;
  p = p * s + 4.92741985e-03f;
  p = p * s - 2.67208936e-02f;
  p = p * s + 1.12805789e-01f;
  p = p * s - 3.76123907e-01f;
  p = p * s + 1.12837915e+00f;
  const float u = max_f(1.f / max_f(a, 1.f), 0.2f) - 0.6f;
  float q = 0.04270061f;
  q = q * u - 0.01620184f;
  q = q * u - 0.02999614f;
  q = q * u + 0.05001085f;
  q = q * u - 0.05346597f;
  q = q * u + 0.02949954f;
  q = q * u + 0.04111324f;
  q = q * u - 0.1755798f;
  q = q * u + 0.39098418f;
  q = q * u + 0.29628747f;
  const float erfc_a = a < 1.f ? 1.f - a * p : e * q;
  const float cdf = z >= 0.f ? 1.f - 0.5f * erfc_a : 0.5f * erfc_a;
  return {cdf, e * 0.39894228040143268f};
}

}  // namespace gradreg
