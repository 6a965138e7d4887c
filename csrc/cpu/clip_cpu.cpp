// Symmetric InfoNCE (CLIP) loss on the CPU, both directions in one op, O(N) saved state.
//
//   L = s · A Bᵀ (rows already normalized by the caller), r_i = lse_j L_ij, c_j = lse_i L_ij
//   loss = (1/2N) [Σ_i (r_i − L_ii) + Σ_j (c_j − L_jj)]
//   dL_ij = (g/2N) (e^{L_ij − r_i} + e^{L_ij − c_j} − 2δ_ij)
//   dA = s · dL B,  dB = s · dLᵀ A,  ds = Σ_ij dL_ij (A Bᵀ)_ij
//
// Forward streams row panels of L: r from each panel's rows, c merged across panels with logaddexp.
// Backward recomputes each panel and emits dA_I, dB += …, ds in one sweep: 8 N² d FLOPs in all.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/fastmath.h"
#include "../common/panel.h"

namespace structure_ops {
namespace {

void check_clip(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale) {
  check_pair(a, "image", b, "text");
  TORCH_CHECK(a.size(1) == b.size(1), "image and text must have the same embedding width, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.device().is_cpu(), "clip_fwd (cpu): image must be a CPU tensor, got ", a.device());
  TORCH_CHECK(scale.numel() == 1, "logit_scale must hold exactly one value, got shape ", scale.sizes());
}

template <typename T>
T dot(const T* a, const T* b, int64_t d) {
  double s = 0;
  for (int64_t k = 0; k < d; ++k) s += double(a[k]) * b[k];
  return T(s);
}

template <typename T>
double clip_forward(const at::Tensor& a, const at::Tensor& b, double s, at::Tensor& lse_r, at::Tensor& lse_c) {
  const int64_t n = a.size(0), d = a.size(1);
  const int64_t rows = panel_rows(n, n * int64_t(sizeof(T)));
  at::Tensor buf = at::empty({rows, n}, a.options());
  T* r = lse_r.data_ptr<T>();
  T* c = lse_c.data_ptr<T>();
  std::fill(c, c + n, -std::numeric_limits<T>::infinity());
  const T st = T(s);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t bsz = std::min(rows, n - r0);
    auto panel = buf.narrow(0, 0, bsz);
    at::mm_out(panel, a.narrow(0, r0, bsz), b.t());
    T* p = panel.data_ptr<T>();
    at::parallel_for(0, bsz, 1, [&](int64_t ib, int64_t ie) {  // row lse
      for (int64_t i = ib; i < ie; ++i) {
        T* row = p + i * n;
        T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < n; ++j) {
          row[j] *= st;
          mx = row[j] > mx ? row[j] : mx;
        }
        if (!std::isfinite(mx)) mx = T(0);
        double sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) sum += fexp(row[j] - mx);
        r[r0 + i] = mx + T(std::log(sum));
      }
    });
    // Column partial lse, merged into c with logaddexp. Each thread owns a block of columns and walks the
    // panel's rows over it, so every inner loop is contiguous and vectorizes (a column-by-column walk
    // with stride N was slower than eager PyTorch).
    at::parallel_for(0, n, 256, [&](int64_t jb, int64_t je) {
      const int64_t w = je - jb;
      std::vector<T> mx(c + jb, c + je);
      std::vector<double> sum(w);
      T* m = mx.data();
      double* sm = sum.data();
      for (int64_t i = 0; i < bsz; ++i) {
        const T* row = p + i * n + jb;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) m[j] = row[j] > m[j] ? row[j] : m[j];
      }
      for (int64_t j = 0; j < w; ++j) {
        if (!std::isfinite(m[j])) m[j] = T(0);
        sm[j] = std::exp(double(c[jb + j]) - m[j]);
      }
      for (int64_t i = 0; i < bsz; ++i) {
        const T* row = p + i * n + jb;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) sm[j] += fexp(row[j] - m[j]);
      }
      for (int64_t j = 0; j < w; ++j) c[jb + j] = m[j] + T(std::log(sm[j]));
    });
  }
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double diag = double(st) * dot(ap + i * d, bp + i * d, d);
    total += (double(r[i]) - diag) + (double(c[i]) - diag);
  }
  return total / (2.0 * double(n));
}

template <typename T>
double clip_backward(const at::Tensor& a, const at::Tensor& b, double s, const at::Tensor& lse_r,
                     const at::Tensor& lse_c, double g, at::Tensor& da, at::Tensor& db) {
  const int64_t n = a.size(0);
  const int64_t rows = panel_rows(n, n * int64_t(sizeof(T)));
  at::Tensor buf = at::empty({rows, n}, a.options());
  const T* r = lse_r.const_data_ptr<T>();
  const T* c = lse_c.const_data_ptr<T>();
  const T st = T(s), coef = T(g / (2.0 * double(n)));
  std::vector<double> ds_rows(n, 0.0);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t bsz = std::min(rows, n - r0);
    auto panel = buf.narrow(0, 0, bsz);
    at::mm_out(panel, a.narrow(0, r0, bsz), b.t());
    T* p = panel.data_ptr<T>();
    at::parallel_for(0, bsz, 1, [&](int64_t ib, int64_t ie) {
      for (int64_t i = ib; i < ie; ++i) {
        T* row = p + i * n;
        const T ri = r[r0 + i];
        const T dot_ii = row[r0 + i];
        double ds = 0;
#pragma omp simd reduction(+ : ds)
        for (int64_t j = 0; j < n; ++j) {
          const T dotv = row[j], l = st * dotv;
          const T dl = coef * (fexp(l - ri) + fexp(l - c[j]));
          row[j] = dl;
          ds += double(dl) * dotv;
        }
        row[r0 + i] -= T(2) * coef;  // the −2δ_ij of the two cross-entropies
        ds -= 2.0 * double(coef) * double(dot_ii);
        ds_rows[r0 + i] = ds;
      }
    });
    auto da_rows = da.narrow(0, r0, bsz);
    da_rows.addmm_(panel, b, 1.0, s);          // dA_I = s · dL_I B (rows written once)
    db.addmm_(panel.t(), a.narrow(0, r0, bsz), 1.0, s);  // dB += s · dL_Iᵀ A_I
  }
  double ds = 0;
  for (int64_t i = 0; i < n; ++i) ds += ds_rows[i];
  return ds;
}

at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_fwd_cpu(const at::Tensor& a_in, const at::Tensor& b_in,
                                                            const at::Tensor& scale) {
  check_clip(a_in, b_in, scale);
  const auto cdt = compute_dtype(a_in);
  const at::Tensor a = a_in.to(cdt).contiguous(), b = b_in.to(cdt).contiguous();
  const double s = scale.to(at::kDouble).item<double>();
  at::Tensor lse_r = at::empty({a.size(0)}, a.options()), lse_c = at::empty({a.size(0)}, a.options());
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(cdt, "clip_fwd_cpu", [&] { loss = clip_forward<scalar_t>(a, b, s, lse_r, lse_c); });
  at::Tensor out = at::empty({}, a_in.options());
  out.fill_(loss);
  return {out, lse_r, lse_c};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_bwd_cpu(const at::Tensor& grad, const at::Tensor& a_in,
                                                            const at::Tensor& b_in, const at::Tensor& scale,
                                                            const at::Tensor& lse_r, const at::Tensor& lse_c) {
  check_clip(a_in, b_in, scale);
  const auto cdt = compute_dtype(a_in);
  const at::Tensor a = a_in.to(cdt).contiguous(), b = b_in.to(cdt).contiguous();
  const at::Tensor r = lse_r.to(cdt).contiguous(), c = lse_c.to(cdt).contiguous();
  const double s = scale.to(at::kDouble).item<double>();
  const double g = grad.to(at::kDouble).item<double>();
  at::Tensor da = at::zeros_like(a), db = at::zeros_like(b);
  double ds = 0;
  AT_DISPATCH_FLOATING_TYPES(cdt, "clip_bwd_cpu", [&] { ds = clip_backward<scalar_t>(a, b, s, r, c, g, da, db); });
  at::Tensor dscale = at::empty(scale.sizes(), scale.options());
  dscale.fill_(ds);
  return {da.to(a_in.scalar_type()), db.to(b_in.scalar_type()), dscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(structure_ops, CPU, m) {
  m.impl("clip_fwd", &clip_fwd_cpu);
  m.impl("clip_bwd", &clip_bwd_cpu);
}

}  // namespace structure_ops
