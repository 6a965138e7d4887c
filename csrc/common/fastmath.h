// Vectorizable exp and log1p for the fp32 row loops of the CPU kernels.
//
// glibc's expf/log1pf are scalar calls, which keep `#pragma omp simd` loops from vectorizing; these are
// branch-free Cephes-style polynomials (≤ 2 ulp on the ranges used here: exp of x ≤ 0, log1p of y ≥ 0)
// written with selects and integer bit tricks only, so GCC vectorizes them with plain SSE2/AVX. The
// fp64 path keeps std::exp/std::log1p (the oracle's precision). NaN propagates; exp(−∞) = 0,
// log1p(+∞) = +∞.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace structure_ops {

__attribute__((always_inline)) inline float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

__attribute__((always_inline)) inline int32_t float_to_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

__attribute__((always_inline)) inline float exp_f32(float x) {
  // exp(x) = 2^n · e^r, n = round(x·log2 e), r = x − n·ln2 (ln2 split in two for exactness).
  const float hi = 88.0f, lo = -87.33654475f;
  float xc = x > hi ? hi : x;  // comparisons with NaN are false: NaN flows through
  xc = xc < lo ? lo : xc;
  const float magic = 12582912.0f;  // 1.5·2^23: adding and subtracting rounds to the nearest integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  const float res = p * scale;
  return x < lo ? 0.0f : (x > hi ? std::numeric_limits<float>::infinity() : res);
}

__attribute__((always_inline)) inline float log1p_f32(float y) {
  // log1p(y) = log(u) + (y − (u − 1))/u with u = 1 + y rounded (the second term restores what the
  // rounding of 1 + y lost); log(u) from u = m·2^e, m ∈ [√½, √2), and log(1+f) = f − f²/2 + f³·P(f).
  const float u = 1.0f + y;
  const float c = (y - (u - 1.0f)) / u;
  const int32_t bits = float_to_bits(u);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);
  const bool big = m > 1.41421356237f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f, z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float t = f * z * p + fe * -2.12194440e-4f;
  t = t - 0.5f * z;
  const float res = (f + t) + fe * 0.693359375f + c;
  const float inf = std::numeric_limits<float>::infinity();
  return y != y ? y : (y == inf ? inf : res);
}

// Dispatch by type: fp32 gets the vectorizable versions, fp64 the libm ones.
inline float fexp(float x) { return exp_f32(x); }
inline double fexp(double x) { return std::exp(x); }
inline float flog1p(float x) { return log1p_f32(x); }
inline double flog1p(double x) { return std::log1p(x); }

}  // namespace structure_ops
