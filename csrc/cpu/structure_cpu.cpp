// STRUCTURE regularizer on the CPU: forward value and, in the same pass, the gradient.
//
// Inputs are the normalized-and-centered X̂ (N×d_x) and Ẑ (N×d_z); normalization and centering stay
// in PyTorch autograd (O(N·d)). With S = ÛÛᵀ/τ (or S_ij = exp(−γ‖û_i − û_j‖²)), P = softmax_rows(S^X),
// Q = softmax_rows(S^Z) and D = (1/N) Σ_ij term(P_ij, Q_ij):
//
//   level 1 (row panels, docs/kernels.md §2a): for each panel I of B rows
//     S^X_I = X̂_I X̂ᵀ/τ, S^Z_I = Ẑ_I Ẑᵀ/τ               (GEMMs)
//     per row: lse, P, Q, ℓ_i, ḡ_i = Σ_j Q_ij g_ij, W_I = Q(g − ḡ)/N      (one fused row loop)
//     dẐ_I += W_I Ẑ/τ,  dẐ += W_Iᵀ Ẑ_I/τ                  (GEMMs)
//   The loss is a scalar, so the gradient computed here, scaled by grad_output in backward, is exact.
//   Memory: a few B × N panels (B from a byte budget), never N × N.
//
//   levels > 1 (docs/kernels.md §3): P, Q materialized, powers R_l = R_{l−1} P incrementally, the divergence
//   as an elementwise pass per level, backward through the adjoint products
//     adj(R_{l−1}) += adj(R_l) Qᵀ,  adj(Q) += R_{l−1}ᵀ adj(R_l).
//
// Chain to the embedding (both paths), W = dS:
//   cosine: dÛ = (W + Wᵀ) Û / τ;  rbf: K = 2γ S∘W, dÛ = (K + Kᵀ) Û − (K·1 + Kᵀ·1) ∘ Û.
// The divergence is symmetric in (O, A), so the X side's gradient (when X requires grad) is the same
// computation with ∂/∂o.
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

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/panel.h"
#include "../common/divergence.h"
#include "../common/fastmath.h"

namespace structure_ops {
namespace {

using Options = StructureOptions;  // csrc/common/checks.h

// Row squared norms (rbf only).
template <typename T>
std::vector<T> row_sq_norms(const at::Tensor& u) {
  const int64_t n = u.size(0), d = u.size(1);
  const T* p = u.const_data_ptr<T>();
  std::vector<T> out(n);
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += double(p[i * d + k]) * p[i * d + k];
      out[i] = T(s);
    }
  });
  return out;
}

// Logits of one row from its Gram row, in place: s = g/τ (cosine) or exp(−γ(n_i + n_j − 2g)) (rbf).
template <typename T>
void logits_row(T* row, int64_t n, const Options& o, const std::vector<T>& sq, int64_t i) {
  if (o.similarity == kCosine) {
    const T inv_tau = T(1.0 / o.temperature);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= inv_tau;
  } else {
    const T g = T(o.gamma), si = sq[i];
    const T* sqp = sq.data();
    // The squared distance is clamped at 0 (rounding makes it slightly negative for near-duplicate rows)
    // and exactly 0 on the diagonal (rounding leaves ~1e-7 there in fp32: exp(−γ·1e-7) ≪ 1 for large γ).
    // `d < 0 ? 0 : d` keeps a NaN distance NaN.
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T d = si + sqp[j] - T(2) * row[j];
      row[j] = fexp(-g * (d < T(0) ? T(0) : d));
    }
    row[i] = T(1);
  }
}

template <typename T>
T row_max(const T* s, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  // A row of −inf (or of NaN, which the max skips) gets shift 0 so that NaN propagates through exp.
  return mx > -std::numeric_limits<T>::infinity() ? mx : T(0);
}

// Σ exp(s − max) accumulated in double; writes e = exp(s − max) to `e` when given (may alias s).
template <typename T>
double exp_row(const T* s, T* e, int64_t n, T mx) {
  double sum = 0;
  if (e) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const T v = fexp(s[j] - mx);
      e[j] = v;
      sum += v;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) sum += fexp(s[j] - mx);
  }
  return sum;
}

// The fused row loop of the level-1 panel path for one row. On entry rx/rz hold the row's logits; on
// exit they hold P and Q, wx/wz hold W = P∘(g_o − ḡ_o)/N and Q∘(g_a − ḡ_a)/N (when asked), and the row's
// loss ℓ_i = Σ_j term(P_ij, Q_ij) is returned. Templated on the flags so each variant is a clean
// SIMD loop.
template <typename T, bool GX, bool GZ, bool JS>
double fused_row(T* rx, T* rz, T* wx, T* wz, int64_t n, T eps, T inv_n) {
  const T mx = row_max(rx, n), mz = row_max(rz, n);
  double loss = 0, gbx = 0, gbz = 0;
  if (!JS) {
    // P = e^(s−max)/Σ: one exp per entry and side, then the divergence on probabilities.
    const T ix = T(1.0 / exp_row(rx, rx, n, mx)), iz = T(1.0 / exp_row(rz, rz, n, mz));
#pragma omp simd reduction(+ : loss, gbx, gbz)
    for (int64_t j = 0; j < n; ++j) {
      const T p = rx[j] * ix, q = rz[j] * iz;
      rx[j] = p;
      rz[j] = q;
      const Terms<T> t = structure_terms(p, q, eps);
      loss += t.value;
      gbz += GZ ? (wz[j] = q * t.d_a) : T(0);  // Q∘g and its row sum ḡ
      gbx += GX ? (wx[j] = p * t.d_o) : T(0);
    }
  } else {
    // log P = s − lse straight from the logits: the JS terms never underflow.
    const T lx = mx + T(std::log(exp_row<T>(rx, nullptr, n, mx)));
    const T lz = mz + T(std::log(exp_row<T>(rz, nullptr, n, mz)));
#pragma omp simd reduction(+ : loss, gbx, gbz)
    for (int64_t j = 0; j < n; ++j) {
      T p, q;
      const Terms<T> t = js_terms_from_logs(rx[j] - lx, rz[j] - lz, &p, &q);
      rx[j] = p;
      rz[j] = q;
      loss += t.value;
      gbz += GZ ? (wz[j] = q * t.d_a) : T(0);  // Q∘g and its row sum ḡ
      gbx += GX ? (wx[j] = p * t.d_o) : T(0);
    }
  }
  if (GZ) {
    const T gb = T(gbz);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) wz[j] = (wz[j] - rz[j] * gb) * inv_n;
  }
  if (GX) {
    const T gb = T(gbx);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) wx[j] = (wx[j] - rx[j] * gb) * inv_n;
  }
  return loss;
}

template <typename T>
using RowFn = double (*)(T*, T*, T*, T*, int64_t, T, T);

template <typename T>
RowFn<T> pick_row_fn(bool gx, bool gz, bool js) {
  const RowFn<T> table[8] = {
      fused_row<T, false, false, false>, fused_row<T, false, false, true>, fused_row<T, false, true, false>,
      fused_row<T, false, true, true>,   fused_row<T, true, false, false>, fused_row<T, true, false, true>,
      fused_row<T, true, true, false>,   fused_row<T, true, true, true>,
  };
  return table[int(gx) * 4 + int(gz) * 2 + int(js)];
}

// dÛ contributions of one panel: W (b × N, rows r0..r0+b) → grad. `s_keep` holds the rbf kernel values.
template <typename T>
void chain_panel(at::Tensor& w, const at::Tensor& s_keep, const at::Tensor& u, at::Tensor& grad,
                 int64_t r0, const Options& o, std::vector<double>& diag_acc) {
  const int64_t b = w.size(0), n = w.size(1);
  if (o.similarity == kCosine) {
    const double inv_tau = 1.0 / o.temperature;
    auto g_rows = grad.narrow(0, r0, b);
    g_rows.addmm_(w, u, 1.0, inv_tau);
    grad.addmm_(w.t(), u.narrow(0, r0, b), 1.0, inv_tau);
    return;
  }
  // rbf: K = 2γ S∘W; the diagonal correction −(K·1 + Kᵀ·1)∘Û is accumulated in diag_acc.
  T* wp = w.data_ptr<T>();
  const T* sp = s_keep.const_data_ptr<T>();
  const T two_g = T(2.0 * o.gamma);
  at::parallel_for(0, b, 1, [&](int64_t ib, int64_t ie) {
    for (int64_t i = ib; i < ie; ++i) {
      double rs = 0;
      for (int64_t j = 0; j < n; ++j) {
        const T k = two_g * sp[i * n + j] * wp[i * n + j];
        wp[i * n + j] = k;
        rs += k;
      }
      diag_acc[r0 + i] += rs;
    }
  });
  at::parallel_for(0, n, 256, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) {
      double cs = 0;
      for (int64_t i = 0; i < b; ++i) cs += wp[i * n + j];
      diag_acc[j] += cs;
    }
  });
  auto g_rows = grad.narrow(0, r0, b);
  g_rows.addmm_(w, u);
  grad.addmm_(w.t(), u.narrow(0, r0, b));
}

template <typename T>
void finish_rbf(at::Tensor& grad, const at::Tensor& u, const std::vector<double>& diag_acc) {
  const int64_t n = u.size(0), d = u.size(1);
  T* g = grad.data_ptr<T>();
  const T* up = u.const_data_ptr<T>();
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t k = 0; k < d; ++k) g[i * d + k] -= T(diag_acc[i]) * up[i * d + k];
  });
}

// ------------------------------------------------------------------------------------------------
// Level 1: row panels, gradient in forward.
// ------------------------------------------------------------------------------------------------
// Rows [row_begin, row_end) only (all N by default): the sum over those rows of ℓ_i, / N, and its gradient
// w.r.t. all of X̂, Ẑ (the other rows enter as columns). A torch.distributed rank passes its own shard.
template <typename T>
double level1_panels(const at::Tensor& xh, const at::Tensor& zh, const Options& o, bool need_gx,
                     bool need_gz, at::Tensor& gx, at::Tensor& gz, int64_t row_begin, int64_t row_end) {
  const int64_t n = xh.size(0);
  const bool rbf = o.similarity == kRbf, js = o.divergence == kJS;
  const int nbuf = 2 + int(need_gx) + int(need_gz) + (rbf ? int(need_gx) + int(need_gz) : 0);
  const int64_t rows = std::max<int64_t>(
      1, std::min(panel_rows(n, int64_t(nbuf) * n * int64_t(sizeof(T))), row_end - row_begin));
  auto opts = xh.options();
  at::Tensor bx = at::empty({rows, n}, opts), bz = at::empty({rows, n}, opts);
  at::Tensor wx = need_gx ? at::empty({rows, n}, opts) : at::Tensor();
  at::Tensor wz = need_gz ? at::empty({rows, n}, opts) : at::Tensor();
  at::Tensor kx = rbf && need_gx ? at::empty({rows, n}, opts) : at::Tensor();
  at::Tensor kz = rbf && need_gz ? at::empty({rows, n}, opts) : at::Tensor();
  std::vector<T> sqx, sqz;
  if (rbf) {
    sqx = row_sq_norms<T>(xh);
    sqz = row_sq_norms<T>(zh);
  }
  std::vector<double> row_loss(n, 0.0), diag_x(rbf ? n : 0, 0.0), diag_z(rbf ? n : 0, 0.0);
  const T eps = T(o.eps), inv_n = T(1.0 / double(n));
  const RowFn<T> row_fn = pick_row_fn<T>(need_gx, need_gz, js);

  for (int64_t r0 = row_begin; r0 < row_end; r0 += rows) {
    const int64_t b = std::min(rows, row_end - r0);
    auto sx = bx.narrow(0, 0, b), sz = bz.narrow(0, 0, b);
    at::mm_out(sx, xh.narrow(0, r0, b), xh.t());
    at::mm_out(sz, zh.narrow(0, r0, b), zh.t());
    T* px = sx.data_ptr<T>();
    T* pz = sz.data_ptr<T>();
    T* pwx = need_gx ? wx.data_ptr<T>() : nullptr;
    T* pwz = need_gz ? wz.data_ptr<T>() : nullptr;
    T* pkx = kx.defined() ? kx.data_ptr<T>() : nullptr;
    T* pkz = kz.defined() ? kz.data_ptr<T>() : nullptr;

    at::parallel_for(0, b, 1, [&](int64_t ib, int64_t ie) {
      for (int64_t i = ib; i < ie; ++i) {
        T* rx = px + i * n;
        T* rz = pz + i * n;
        logits_row(rx, n, o, sqx, r0 + i);
        logits_row(rz, n, o, sqz, r0 + i);
        if (pkx) std::copy(rx, rx + n, pkx + i * n);
        if (pkz) std::copy(rz, rz + n, pkz + i * n);
        // W is left as Q(g − ḡ)/N; the 1/τ (cosine) or 2γS (rbf) factor is applied when chaining.
        row_loss[r0 + i] = row_fn(rx, rz, pwx ? pwx + i * n : nullptr, pwz ? pwz + i * n : nullptr, n, eps, inv_n);
      }
    });

    if (need_gz) {
      auto w = wz.narrow(0, 0, b);
      chain_panel<T>(w, rbf ? kz.narrow(0, 0, b) : at::Tensor(), zh, gz, r0, o, diag_z);
    }
    if (need_gx) {
      auto w = wx.narrow(0, 0, b);
      chain_panel<T>(w, rbf ? kx.narrow(0, 0, b) : at::Tensor(), xh, gx, r0, o, diag_x);
    }
  }
  if (rbf && need_gz) finish_rbf<T>(gz, zh, diag_z);
  if (rbf && need_gx) finish_rbf<T>(gx, xh, diag_x);
  double total = 0;
  for (int64_t i = row_begin; i < row_end; ++i) total += row_loss[i];  // fixed order: deterministic
  return total / double(n);
}

// ------------------------------------------------------------------------------------------------
// Levels > 1: materialized powers.
// ------------------------------------------------------------------------------------------------
// Logits (N×N) of one side, then row softmax in place; keeps log-probabilities when asked (js level 1).
template <typename T>
void softmax_side(const at::Tensor& u, const Options& o, at::Tensor& s_keep, at::Tensor& p, at::Tensor& logp) {
  const int64_t n = u.size(0);
  at::mm_out(p, u, u.t());
  std::vector<T> sq;
  if (o.similarity == kRbf) sq = row_sq_norms<T>(u);
  T* pp = p.data_ptr<T>();
  T* ps = s_keep.defined() ? s_keep.data_ptr<T>() : nullptr;
  T* pl = logp.defined() ? logp.data_ptr<T>() : nullptr;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T* r = pp + i * n;
      logits_row(r, n, o, sq, i);
      if (ps) std::copy(r, r + n, ps + i * n);
      if (pl) std::copy(r, r + n, pl + i * n);
      const T mx = row_max(r, n);
      const double sum = exp_row(r, r, n, mx);
      const T inv = T(1.0 / sum);
      for (int64_t j = 0; j < n; ++j) r[j] *= inv;
      if (pl) {
        const T lse = mx + T(std::log(sum));
        for (int64_t j = 0; j < n; ++j) pl[i * n + j] -= lse;
      }
    }
  });
}

// One level's divergence D_l and the raw elementwise derivatives (∂term/∂a, ∂term/∂o), each / N.
template <typename T>
double level_terms(const at::Tensor& ro, const at::Tensor& ra, const at::Tensor& lo, const at::Tensor& la,
                   bool log_form, const Options& o, at::Tensor* ga, at::Tensor* go) {
  const int64_t n = ro.size(0);
  const T* po = ro.const_data_ptr<T>();
  const T* pa = ra.const_data_ptr<T>();
  const T* plo = log_form ? lo.const_data_ptr<T>() : nullptr;
  const T* pla = log_form ? la.const_data_ptr<T>() : nullptr;
  T* pga = ga ? ga->data_ptr<T>() : nullptr;
  T* pgo = go ? go->data_ptr<T>() : nullptr;
  const T eps = T(o.eps), inv_n = T(1.0 / double(n));
  std::vector<double> row(n, 0.0);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ij = i * n + j;
        Terms<T> t;
        if (log_form) {
          T po_, pa_;
          t = js_terms_from_logs(plo[ij], pla[ij], &po_, &pa_);
        } else if (o.divergence == kJS) {
          t = js_terms_from_probs(po[ij], pa[ij]);
        } else {
          t = structure_terms(po[ij], pa[ij], eps);
        }
        acc += t.value;
        if (pga) pga[ij] = t.d_a * inv_n;
        if (pgo) pgo[ij] = t.d_o * inv_n;
      }
      row[i] = acc;
    }
  });
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += row[i];
  return total / double(n);
}

// Backward of the power chain of one side: adj(R_l) = coef_l · G_l, R_l = R_{l−1} P → adj(P); then the
// softmax Jacobian dS = P∘(adj(P) − rowsum(P∘adj(P))) and the chain to the embedding.
template <typename T>
void side_backward(const std::vector<at::Tensor>& powers, std::vector<at::Tensor>& g, const std::vector<double>& coef,
                   const at::Tensor& s_keep, const at::Tensor& u, const Options& o, at::Tensor& grad) {
  const int64_t L = int64_t(powers.size()), n = u.size(0);
  const at::Tensor& p = powers[0];
  at::Tensor adj = g[L - 1].mul_(coef[L - 1]);
  at::Tensor adj_p = at::zeros_like(p);
  for (int64_t l = L - 1; l >= 1; --l) {
    adj_p.addmm_(powers[l - 1].t(), adj);                      // adj(P) += R_{l−1}ᵀ adj(R_l)
    at::Tensor prev = g[l - 1].mul_(coef[l - 1]);
    prev.addmm_(adj, p.t());                                  // adj(R_{l−1}) += adj(R_l) Pᵀ
    adj = prev;
  }
  adj_p.add_(adj);                                            // R_1 = P
  T* a = adj_p.data_ptr<T>();
  const T* pp = p.const_data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double dot = 0;
      for (int64_t j = 0; j < n; ++j) dot += double(pp[i * n + j]) * a[i * n + j];
      const T db = T(dot);
      for (int64_t j = 0; j < n; ++j) a[i * n + j] = pp[i * n + j] * (a[i * n + j] - db);
    }
  });
  std::vector<double> diag(o.similarity == kRbf ? n : 0, 0.0);
  chain_panel<T>(adj_p, s_keep, u, grad, 0, o, diag);
  if (o.similarity == kRbf) finish_rbf<T>(grad, u, diag);
}

// ---- Memory this process can still allocate (Linux; each source is optional) ----------------------------
// A number from the first word of a file ("max", unreadable or missing: false).
bool read_number(const std::string& path, double* out) {
  std::ifstream f(path);
  std::string word;
  if (!(f >> word) || word == "max") return false;
  char* end = nullptr;
  const double v = std::strtod(word.c_str(), &end);
  if (end == word.c_str()) return false;
  *out = v;
  return true;
}

// "Key:   123 kB" of /proc/meminfo or /proc/self/status, in bytes.
bool read_kb_field(const std::string& path, const std::string& key, double* out) {
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    if (line.compare(0, key.size() + 1, key + ":") == 0) {
      std::istringstream in(line.substr(key.size() + 1));
      double kb = 0;
      if (in >> kb) {
        *out = kb * 1024.0;
        return true;
      }
    }
  }
  return false;
}

std::string gib(double bytes) {
  std::ostringstream s;
  s.precision(2);
  s << std::fixed << bytes / double(1 << 30) << " GiB";
  return s.str();
}

struct Budget {
  double bytes = -1;  // < 0: nothing known
  std::string what;
  void offer(double b, const std::string& w) {
    if (bytes < 0 || b < bytes) {
      bytes = std::max(0.0, b);
      what = w;
    }
  }
};

// The least of: MemAvailable (memory already in use by anyone counts), RLIMIT_AS minus this process's
// mapped size, and each enclosing cgroup's limit minus its usage (v2 memory.max − memory.current, v1
// memory.limit_in_bytes − memory.usage_in_bytes); 80% of physical RAM only when none of these is readable.
Budget host_memory_budget() {
  Budget b;
  double v = 0;
  if (read_kb_field("/proc/meminfo", "MemAvailable", &v)) b.offer(v, gib(v) + " available now (MemAvailable)");
  struct rlimit rl {};
  if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    double used = 0;
    read_kb_field("/proc/self/status", "VmSize", &used);
    const double lim = double(rl.rlim_cur);
    b.offer(lim - used, gib(lim - used) + " left under RLIMIT_AS (" + gib(lim) + ", " + gib(used) + " mapped)");
  }
  // cgroups: /proc/self/cgroup lines "0::/path" (v2) and "N:memory:/path" (v1), and the namespace roots.
  std::vector<std::pair<std::string, bool>> dirs;  // (directory, is v2)
  std::ifstream cg("/proc/self/cgroup");
  std::string line;
  while (std::getline(cg, line)) {
    const auto a = line.find(':');
    const auto c = a == std::string::npos ? a : line.find(':', a + 1);
    if (c == std::string::npos) continue;
    const std::string ctrl = line.substr(a + 1, c - a - 1), path = line.substr(c + 1);
    if (ctrl.empty()) {
      dirs.emplace_back("/sys/fs/cgroup" + path, true);
      dirs.emplace_back("/sys/fs/cgroup/unified" + path, true);
    } else if (ctrl.find("memory") != std::string::npos) {
      dirs.emplace_back("/sys/fs/cgroup/memory" + path, false);
    }
  }
  dirs.emplace_back("/sys/fs/cgroup", true);
  dirs.emplace_back("/sys/fs/cgroup/memory", false);
  for (const auto& [dir, v2] : dirs) {
    double lim = 0, cur = 0;
    if (!read_number(dir + (v2 ? "/memory.max" : "/memory.limit_in_bytes"), &lim) || lim >= 4.0e18) continue;
    read_number(dir + (v2 ? "/memory.current" : "/memory.usage_in_bytes"), &cur);
    b.offer(lim - cur, gib(lim - cur) + " left under the cgroup limit " + dir +
                           (v2 ? "/memory.max (" : "/memory.limit_in_bytes (") + gib(lim) + ")");
  }
  if (b.bytes < 0) {
    const double phys = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE));
    if (phys > 0) b.offer(0.8 * phys, "80% of this machine's " + gib(phys) + " of RAM");
  }
  return b;
}

// Levels > 1 hold about 4L + 4 N × N matrices (P, Q, the powers, the per-level adjoints, scratch).
// Refuse up front, with the estimate and the binding limit, rather than die in the allocator or be killed
// by the OOM killer mid-way.
void check_multilevel_memory(int64_t n, int64_t levels, int64_t elem) {
  const double est = double(4 * levels + 4) * double(n) * double(n) * double(elem);
  const Budget b = host_memory_budget();
  TORCH_CHECK(b.bytes < 0 || est < 0.9 * b.bytes, "structure_loss (cpu) with levels=", levels, " materializes about ",
              gib(est), " of N x N matrices at N=", n, ", more than 90% of the ", b.what,
              "; use levels=1 (row panels, bounded memory) or a smaller batch");
}

template <typename T>
double multilevel(const at::Tensor& xh, const at::Tensor& zh, const Options& o, bool need_gx, bool need_gz,
                  at::Tensor& gx, at::Tensor& gz) {
  const int64_t n = xh.size(0), L = o.levels;
  check_multilevel_memory(n, L, int64_t(sizeof(T)));
  const bool rbf = o.similarity == kRbf, js = o.divergence == kJS;
  auto opts = xh.options();
  at::Tensor px = at::empty({n, n}, opts), pz = at::empty({n, n}, opts);
  at::Tensor sxk = rbf && need_gx ? at::empty({n, n}, opts) : at::Tensor();
  at::Tensor szk = rbf && need_gz ? at::empty({n, n}, opts) : at::Tensor();
  at::Tensor lx = js ? at::empty({n, n}, opts) : at::Tensor();
  at::Tensor lz = js ? at::empty({n, n}, opts) : at::Tensor();
  softmax_side<T>(xh, o, sxk, px, lx);
  softmax_side<T>(zh, o, szk, pz, lz);

  std::vector<at::Tensor> rx{px}, rz{pz}, gxs, gzs;
  std::vector<double> coef(L);
  double total = 0;
  for (int64_t l = 1; l <= L; ++l) {
    if (l > 1) {
      rx.push_back(at::mm(rx.back(), px));
      rz.push_back(at::mm(rz.back(), pz));
    }
    at::Tensor ga = need_gz ? at::empty({n, n}, opts) : at::Tensor();
    at::Tensor go = need_gx ? at::empty({n, n}, opts) : at::Tensor();
    const double d = level_terms<T>(rx.back(), rz.back(), lx, lz, js && l == 1, o, need_gz ? &ga : nullptr,
                                    need_gx ? &go : nullptr);
    const double w = o.weighting == kWeightInverse ? 1.0 / double(l) : 1.0;
    const double shifted = d - o.margin;
    const bool active = shifted > 0;  // relu gate, as torch.relu's backward
    total += w * (active || std::isnan(shifted) ? shifted : 0.0);  // NaN propagates like torch.relu
    coef[l - 1] = active || std::isnan(shifted) ? w / double(L) : 0.0;
    if (need_gz) gzs.push_back(ga);
    if (need_gx) gxs.push_back(go);
  }
  if (need_gz) side_backward<T>(rz, gzs, coef, szk, zh, o, gz);
  if (need_gx) side_backward<T>(rx, gxs, coef, sxk, xh, o, gx);
  return total / double(L);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> structure_fwd_cpu(
    const at::Tensor& xh_in, const at::Tensor& zh_in, int64_t levels, double temperature, int64_t weighting,
    double margin, int64_t similarity, double gamma, int64_t divergence, double eps, bool grad_x, bool grad_z) {
  check_pair(xh_in, "x", zh_in, "z");
  TORCH_CHECK(xh_in.device().is_cpu(), "structure_fwd (cpu): x must be a CPU tensor, got ", xh_in.device());
  const Options o{levels, temperature, weighting, margin, similarity, gamma, divergence, eps};
  check_structure_options(o);

  // fp64 stays fp64 (the oracle's precision); every other float dtype computes in fp32.
  const auto in_dtype = xh_in.scalar_type();
  const auto cdt = in_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xh = xh_in.to(cdt).contiguous(), zh = zh_in.to(cdt).contiguous();
  at::Tensor gx = grad_x ? at::zeros_like(xh) : at::empty({0}, xh.options());
  at::Tensor gz = grad_z ? at::zeros_like(zh) : at::empty({0}, zh.options());

  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(cdt, "structure_fwd_cpu", [&] {
    if (levels == 1) {
      const double d = level1_panels<scalar_t>(xh, zh, o, grad_x, grad_z, gx, gz, 0, xh.size(0));
      const double shifted = d - margin;
      loss = shifted > 0 ? shifted : 0.0;
      if (!(shifted > 0) && !std::isnan(shifted)) {  // relu gate closed: zero gradient (torch.relu semantics)
        if (grad_x) gx.zero_();
        if (grad_z) gz.zero_();
      }
      if (std::isnan(d)) loss = d;
    } else {
      loss = multilevel<scalar_t>(xh, zh, o, grad_x, grad_z, gx, gz);
    }
  });
  at::Tensor out = at::empty({}, xh_in.options().dtype(in_dtype));
  out.fill_(loss);
  return {out, gx.to(in_dtype), gz.to(in_dtype)};
}

// Level 1 restricted to rows [row_begin, row_end): partial = (1/N) Σ_{i in range} ℓ_i (no margin: the hinge
// acts on the sum over all ranks, structure_ops/distributed.py) and its gradient w.r.t. the full X̂, Ẑ.
std::tuple<at::Tensor, at::Tensor, at::Tensor> structure_rows_fwd_cpu(
    const at::Tensor& xh_in, const at::Tensor& zh_in, int64_t row_begin, int64_t row_end, double temperature,
    int64_t similarity, double gamma, int64_t divergence, double eps, bool grad_x, bool grad_z) {
  check_pair(xh_in, "x", zh_in, "z");
  TORCH_CHECK(xh_in.device().is_cpu(), "structure_rows_fwd (cpu): x must be a CPU tensor, got ", xh_in.device());
  check_row_range(row_begin, row_end, xh_in.size(0));
  const Options o{1, temperature, kWeightNone, 0.0, similarity, gamma, divergence, eps};
  check_structure_options(o);
  const auto in_dtype = xh_in.scalar_type();
  const auto cdt = in_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xh = xh_in.to(cdt).contiguous(), zh = zh_in.to(cdt).contiguous();
  at::Tensor gx = grad_x ? at::zeros_like(xh) : at::empty({0}, xh.options());
  at::Tensor gz = grad_z ? at::zeros_like(zh) : at::empty({0}, zh.options());
  double partial = 0;
  AT_DISPATCH_FLOATING_TYPES(cdt, "structure_rows_fwd_cpu", [&] {
    partial = level1_panels<scalar_t>(xh, zh, o, grad_x, grad_z, gx, gz, row_begin, row_end);
  });
  at::Tensor out = at::empty({}, xh_in.options().dtype(in_dtype));
  out.fill_(partial);
  return {out, gx.to(in_dtype), gz.to(in_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(structure_ops, CPU, m) {
  m.impl("structure_fwd", &structure_fwd_cpu);
  m.impl("structure_rows_fwd", &structure_rows_fwd_cpu);
}

}  // namespace structure_ops
