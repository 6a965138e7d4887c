// Elementwise math of the STRUCTURE divergence, shared by every level and backend.
//
// "structure" form, per entry (o, a) of O = P_X^l, A = P_Z^l:
//   term = ½ M̃ (2 log M̃ − log Õ − log Ã),  Õ = o + ε, Ã = a + ε, M̃ = (Õ + Ã)/2
//        = ¼ (Õ + Ã) · log1p( (Õ−Ã)² / (4 Õ Ã) )                       (exact, no cancellation)
//   ∂term/∂a = ¼ T + ¼ − ¼ Õ/Ã,  T = log1p(...)                          (∂/∂o by symmetry)
// The three-log form cancels catastrophically when Õ ≈ Ã (fp32 gives the wrong sign at 1e-4
// perturbations); the −log1p(−r²) form of the notes overflows to log1p(−1) = −inf in fp32 when one
// side is ~1e12 times the other. (d/Õ)(d/Ã) keeps every intermediate within [0, 1/ε].
//
// "js" form, from log-probabilities la = log o, lb = log a (level 1, never underflows):
//   log(o/m) = ln2 − softplus(lb − la),  log(a/m) = ln2 − softplus(la − lb)
//   term = ½ [o log(o/m) + a log(a/m)],   ∂term/∂a = ½ log(a/m)
// and from probabilities (levels ≥ 2): entries clamped at the dtype's smallest normal number, the
// derivative is zero where clamped (matching torch.clamp_min in the reference).
#pragma once

#include <cfloat>
#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define SO_HD __host__ __device__ __forceinline__
#else
#define SO_HD inline
#endif

#if !defined(__CUDACC__)
#include "fastmath.h"
#endif

namespace structure_ops {

#if defined(__CUDACC__)
template <typename T>
SO_HD T fexp(T x) { return exp(x); }
template <typename T>
SO_HD T flog1p(T x) { return log1p(x); }
#endif

template <typename T>
struct Terms {
  T value;   // the divergence term of this entry
  T d_a;     // ∂term/∂a (the aligned side, Z)
  T d_o;     // ∂term/∂o (the frozen side, X)
};

// "structure" form on probabilities. Two reciprocals instead of four divisions; (d·r_o)(d·r_a) keeps
// every intermediate within [0, 1/ε] (a product Õ·Ã would underflow for tiny user ε).
template <typename T>
SO_HD Terms<T> structure_terms(T o, T a, T eps) {
  const T ot = o + eps, at = a + eps, d = ot - at;
  const T ro = T(1) / ot, ra = T(1) / at;
  const T t = flog1p((d * ro) * (d * ra) * T(0.25));
  const T q = T(0.25) * t + T(0.25);
  return {T(0.25) * (ot + at) * t, q - T(0.25) * ot * ra, q - T(0.25) * at * ro};
}

// softplus(x) = log(1 + e^x), overflow-free.
template <typename T>
SO_HD T softplus(T x) {
  return (x > T(0) ? x : T(0)) + flog1p(fexp(-std::fabs(x)));
}

// "js" form from log-probabilities; also returns o = e^la and a = e^lb.
template <typename T>
SO_HD Terms<T> js_terms_from_logs(T la, T lb, T* o_out, T* a_out) {
  const T ln2 = T(0.69314718055994530942);
  const T o = fexp(la), a = fexp(lb);
  const T delta = la - lb;
  const T sp = softplus(delta);          // softplus(la − lb)
  const T log_a_m = ln2 - sp;            // log(a/m)
  const T log_o_m = ln2 - (sp - delta);  // log(o/m) = ln2 − softplus(lb − la)
  *o_out = o;
  *a_out = a;
  return {T(0.5) * (o * log_o_m + a * log_a_m), T(0.5) * log_a_m, T(0.5) * log_o_m};
}

// "js" form on probabilities (levels ≥ 2).
template <typename T>
SO_HD Terms<T> js_terms_from_probs(T o, T a) {
  // FLT_MIN / DBL_MIN (= numeric_limits<T>::min(), which nvcc treats as host-only without
  // --expt-relaxed-constexpr).
  const T tiny = sizeof(T) == sizeof(float) ? T(FLT_MIN) : T(DBL_MIN);
  const T oc = o >= tiny ? o : tiny, ac = a >= tiny ? a : tiny;
  const T lm = std::log(T(0.5) * (oc + ac));
  const T lo = std::log(oc) - lm, la = std::log(ac) - lm;
  return {T(0.5) * (oc * lo + ac * la), a >= tiny ? T(0.5) * la : T(0), o >= tiny ? T(0.5) * lo : T(0)};
}

}  // namespace structure_ops
