// STRUCTURE regularizer on CUDA: forward value and, in the same call, the gradient (structure_fwd,
// structure_rows_fwd). Same semantics as csrc/cpu/structure_cpu.cpp (option codes, levels, weighting,
// margin, gradient flags, loss dtype, exact-ε stable divergence, js, rbf, fp64); the pass structure is the
// one of structure_ops/_triton/structure.py.
//
// Inputs are the normalized-and-centered X̂ (N×d_x) and Ẑ (N×d_z). With
//   S^U = ÛÛᵀ/τ (cosine)  or  S^U_ij = exp(−γ(‖û_i‖² + ‖û_j‖² − 2⟨û_i, û_j⟩)) (rbf, no τ),
//   P = softmax_rows(S^X), Q = softmax_rows(S^Z) (diagonal kept), O_l = Pˡ, A_l = Qˡ,
//   D_l = (1/N) Σ_ij term(O_l,ij, A_l,ij),   R_S = (1/L) Σ_l w_l relu(D_l − margin), w_l = 1 or 1/l,
//   "structure": term = ¼(Õ + Ã)·log1p((d/Õ)(d/Ã)/4), d = Õ − Ã, Õ = O + ε, Ã = A + ε
//                (= ½M̃(2 log M̃ − log Õ − log Ã) without its cancellation; csrc/common/divergence.h)
//   "js":        term = ½[O log(O/M) + A log(A/M)], M = (O + A)/2 (level 1 from log-probabilities)
//
// Gradient (docs/kernels.md §1, §3): level 1, g = ∂term/∂Q, ḡ_i = Σ_j Q_ij g_ij, dS^Z = W = Q∘(g − ḡ)/N;
//   levels: adj(A_L) = c_L G_L, adj(A_{l−1}) = c_{l−1}G_{l−1} + adj(A_l)Qᵀ, adj(Q) += A_{l−1}ᵀ adj(A_l),
//   G_l = ∂D_l/∂A_l, c_l = w_l/L where the hinge is open (else 0); dS^Z = Q∘(adj(Q) − rowsum(Q∘adj(Q))) + c_1W_1.
//   chain: cosine dẐ = (dS + dSᵀ)Ẑ/τ;  rbf K = S∘dS, dẐ = 2γ[(K + Kᵀ)Ẑ − (K·1 + Kᵀ·1)∘Ẑ].
//   The divergence is symmetric in (O, A): the X side (grad_x) is the same computation with ∂/∂o.
//   The loss is a scalar, so the gradient computed here and scaled by grad_output in backward is exact.
//
// Pass structure:
//   level 1 (docs/kernels.md §2a), per row panel I of B rows (B from a byte budget, STRUCTURE_OPS_CUDA_PANEL_MB):
//     Gram panels X̂_I X̂ᵀ, Ẑ_I Ẑᵀ by at::mm (cuBLAS; honours torch's float32 matmul precision / TF32),
//     ONE fused row kernel (l1_rows_kernel, a block per row) → ℓ_i, W_I (rbf: S∘W_I and its row sums),
//     dẐ_I += αW_IẐ, dẐ += αW_IᵀẐ_I by at::addmm (α = 1/τ, or 2γ for rbf). Memory: 2–4 B × N panels.
//   levels > 1 (docs/kernels.md §3): P, Q materialized (the row kernel turns the N×N Gram matrices into P, Q in
//     place and writes W_1), powers by at::mm, level_div_kernel (fused divergence epilogue: row losses and
//     G_l = ∂D_l/∂power in one pass), the margin gate on the device (finalize_levels_kernel, no host sync),
//     adjoint products by at::addmm, softmax_bwd_kernel (softmax Jacobian + c_1W_1, rbf: ∘S), chain GEMMs.
//
// Precision: fp64 inputs compute in fp64 throughout. fp32, bf16 and fp16 inputs compute in fp32: half inputs
// are upcast once (O(N·d), negligible next to the O(N²d) GEMMs) before the GEMMs, exactly as the CPU op does,
// because at::mm returns its product in the input dtype, and a bf16 Gram output would round every logit by up
// to 2⁻⁹·|S| ≈ 0.04 at |S| = 1/τ = 20 (fp16 ≈ 0.005), an error the exact-ε divergence sees as structure. (A
// tensor-core path needs a GEMM with bf16 operands and an fp32 output: the Triton "flash" pass.) fp32 GEMMs
// follow torch.get_float32_matmul_precision() through ATen's allow_tf32 flag; all softmax, log-sum-exp and
// divergence math is fp32 (fp64 for fp64 inputs), the loss sums are double.
// Knobs (environment, read on every call): STRUCTURE_OPS_CUDA_PANEL_MB (> 0) the level-1 panel budget in MiB
// (default 256 MiB and ≥ 256 rows; when set, exact, down to 1 row); STRUCTURE_OPS_CUDA_MEM_LIMIT_MB (> 0) the
// memory the levels > 1 path may plan for (default: 90% of free device memory + torch's cached free blocks).
// Determinism: no float atomics; every reduction has a fixed order (per-thread strided sums, then a fixed
// shuffle tree), the loss is summed in double by one block; cuBLAS GEMMs are run-to-run reproducible on a
// given GPU and stream. Two calls with the same inputs are bitwise equal.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/panel.h"
#include "../common/divergence.h"
#include "common.cuh"

namespace structure_ops {
namespace {

using cuda::block_max;
using cuda::block_sum;
using cuda::ceil_div;

// Threads per row block: fp64 rows keep twice the live state, so cap them lower to stay spill-free within
// the register budget that __launch_bounds__ implies (65536 / threads per block).
template <typename T>
struct RowLaunch {
  static constexpr int kMaxThreads = sizeof(T) == 8 ? 512 : 1024;
};

// ------------------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------------------
// Logit of entry j from its Gram value g = ⟨û_i, û_j⟩: g/τ (cosine) or exp(−γ(‖û_i‖² + ‖û_j‖² − 2g)) (rbf),
// the CPU op's formula and evaluation order.
// rbf: the squared distance is clamped at 0 and exactly 0 on the diagonal (i == j), as on the CPU.
template <typename T, bool RBF>
__device__ __forceinline__ T logit(T g, T sq_i, const T* __restrict__ sq, int i, int j, T inv_tau, T gamma) {
  if constexpr (RBF) {
    const T d = sq_i + sq[j] - T(2) * g;
    return i == j ? T(1) : exp(-gamma * (d < T(0) ? T(0) : d));
  } else {
    return g * inv_tau;
  }
}

// Online log-sum-exp state (m, l = Σ e^(s−m)) of one thread: one exp per entry, one read of the row.
// A NaN logit never wins the comparison and lands in l, so it poisons the row as in the CPU code.
template <typename T>
__device__ __forceinline__ void online_lse(T& m, T& l, T s) {
  if (s > m) {
    l = l * exp(m - s) + T(1);
    m = s;
  } else {
    l += exp(s - m);
  }
}

// Block-wide log-sum-exp from every thread's (m, l): rescale to the block max, then a fixed-order sum.
template <typename T>
__device__ __forceinline__ T block_lse(T m, T l) {
  const T mb = block_max(m);
  const T lb = block_sum(m == T(-INFINITY) ? T(0) : l * exp(m - mb));  // idle threads: m = −inf, l = 0
  return mb + log(lb);
}

// ------------------------------------------------------------------------------------------------------------
// Kernel 1: the fused level-1 row kernel, one block per row of a panel.
// ------------------------------------------------------------------------------------------------------------
// Row i (local r = blockIdx.x, global i = row0 + r), a_j = S^X_ij − lseX_i, b_j = S^Z_ij − lseZ_i, P = e^a, Q = e^b:
//   pass 1  online (max, Σexp) per thread, then per block → lseX_i, lseZ_i
//   pass 2  ℓ_i = Σ_j term(P_ij, Q_ij); Q∘g (→ wz), Q (→ bz, in place of the Gram row) and ḡ_i = Σ_j Q_ij g_ij
//           (X side: P∘∂term/∂P, P, Σ); "structure" via structure_terms, "js" via js_terms_from_logs, whose
//           log(Q/M) = ln2 − softplus(a − b) never underflows (no ε needed).
//           RBF_K (rbf, level 1): S∘(Q∘g) and S∘Q are stored instead, so pass 3 emits K' = S∘W directly.
//   pass 3  W = (Q∘g − Q ḡ)/N from what pass 2 stored (no transcendentals); RBF_K: Σ_j K'_ij → ks[i].
// Each thread re-reads in pass 3 only the entries it wrote in pass 2 (same strided mapping): no barrier.
// ML (levels > 1): the Gram buffers are the N×N P, Q matrices (row0 = 0), always left holding P and Q;
// W stays unscaled (the softmax-backward kernel applies S).
template <typename T>
struct RowArgs {
  T* bx;  // Gram rows of X̂ (local rows, stride ld_b); out: P (or S∘P) where needed
  T* bz;
  int64_t ld_b;
  T* wx;  // out: W rows (local rows, stride ld_w)
  T* wz;
  int64_t ld_w;
  const T* sqx;  // ‖x̂_j‖² (rbf)
  const T* sqz;
  int64_t row0;
  int64_t n;
  T inv_tau, gamma, eps, inv_n;
  T* row_loss;  // ℓ_i at the global row
  T* ksx;       // RBF_K: Σ_j K'_ij at the global row
  T* ksz;
};

template <typename T, bool GX, bool GZ, bool JS, bool RBF, bool ML>
__global__ void __launch_bounds__(RowLaunch<T>::kMaxThreads) l1_rows_kernel(const RowArgs<T> a) {
  constexpr bool RBF_K = RBF && !ML;
  // 32-bit column index (the host checks N < 2^31): fewer registers in the streaming loops.
  const int64_t r = blockIdx.x, gi = a.row0 + r;
  const int n = int(a.n);
  T* __restrict__ gxr = a.bx + r * a.ld_b;
  T* __restrict__ gzr = a.bz + r * a.ld_b;
  T* __restrict__ wxr = GX ? a.wx + r * a.ld_w : nullptr;
  T* __restrict__ wzr = GZ ? a.wz + r * a.ld_w : nullptr;
  const T sqxi = RBF ? a.sqx[gi] : T(0), sqzi = RBF ? a.sqz[gi] : T(0);
  const T inv_tau = a.inv_tau, gamma = a.gamma;

  // pass 1
  T mx = T(-INFINITY), lx = T(0), mz = T(-INFINITY), lz = T(0);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    online_lse(mx, lx, logit<T, RBF>(gxr[j], sqxi, a.sqx, int(gi), j, inv_tau, gamma));
    online_lse(mz, lz, logit<T, RBF>(gzr[j], sqzi, a.sqz, int(gi), j, inv_tau, gamma));
  }
  const T lse_x = block_lse(mx, lx), lse_z = block_lse(mz, lz);

  // pass 2
  T acc = T(0), gbx = T(0), gbz = T(0);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const T sx = logit<T, RBF>(gxr[j], sqxi, a.sqx, int(gi), j, inv_tau, gamma);
    const T sz = logit<T, RBF>(gzr[j], sqzi, a.sqz, int(gi), j, inv_tau, gamma);
    T p, q;
    Terms<T> t;
    if constexpr (JS) {
      t = js_terms_from_logs(sx - lse_x, sz - lse_z, &p, &q);
    } else {
      p = exp(sx - lse_x);
      q = exp(sz - lse_z);
      t = structure_terms(p, q, a.eps);
    }
    acc += t.value;
    if constexpr (GZ) {
      const T qg = q * t.d_a;
      gbz += qg;
      wzr[j] = RBF_K ? sz * qg : qg;
    }
    if constexpr (GZ || ML) gzr[j] = RBF_K ? sz * q : q;
    if constexpr (GX) {
      const T pg = p * t.d_o;
      gbx += pg;
      wxr[j] = RBF_K ? sx * pg : pg;
    }
    if constexpr (GX || ML) gxr[j] = RBF_K ? sx * p : p;
  }
  acc = block_sum(acc);
  if constexpr (GZ) gbz = block_sum(gbz);
  if constexpr (GX) gbx = block_sum(gbx);
  if (threadIdx.x == 0) a.row_loss[gi] = acc;

  // pass 3
  if constexpr (GX || GZ) {
    const T inv_n = a.inv_n;
    T ksx = T(0), ksz = T(0);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      if constexpr (GZ) {
        const T w = (wzr[j] - gzr[j] * gbz) * inv_n;
        wzr[j] = w;
        if constexpr (RBF_K) ksz += w;
      }
      if constexpr (GX) {
        const T w = (wxr[j] - gxr[j] * gbx) * inv_n;
        wxr[j] = w;
        if constexpr (RBF_K) ksx += w;
      }
    }
    if constexpr (RBF_K) {
      if constexpr (GZ) ksz = block_sum(ksz);
      if constexpr (GX) ksx = block_sum(ksx);
      if (threadIdx.x == 0) {
        if constexpr (GZ) a.ksz[gi] = ksz;
        if constexpr (GX) a.ksx[gi] = ksx;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Kernel 2: divergence epilogue of one level ≥ 2, one block per row of the two powers.
// ------------------------------------------------------------------------------------------------------------
// ℓ_i = Σ_j term(O_ij, A_ij) (→ row_loss), G_A = ∂term/∂A / N, G_O = ∂term/∂O / N (N × N, same layout).
// "structure": structure_terms (its ∂/∂A keeps the +¼ of the CPU op; a constant adjoint is annihilated by the
// softmax Jacobian anyway). "js" on probabilities: js_terms_from_probs, clamped at the smallest normal number
// with a zero derivative where clamped (the CPU op's and the reference's torch.clamp_min).
template <typename T, bool JS, bool GO, bool GA>
__global__ void __launch_bounds__(RowLaunch<T>::kMaxThreads)
    level_div_kernel(const T* __restrict__ o, const T* __restrict__ a, int n, T eps, T inv_n,
                     T* __restrict__ row_loss, T* __restrict__ go, T* __restrict__ ga) {
  const int64_t base = int64_t(blockIdx.x) * n;
  T acc = T(0);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const T ov = o[base + j], av = a[base + j];
    const Terms<T> t = JS ? js_terms_from_probs(ov, av) : structure_terms(ov, av, eps);
    acc += t.value;
    if constexpr (GA) ga[base + j] = t.d_a * inv_n;
    if constexpr (GO) go[base + j] = t.d_o * inv_n;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) row_loss[blockIdx.x] = acc;
}

// ------------------------------------------------------------------------------------------------------------
// Kernel 3: softmax Jacobian of the levels > 1 backward, one block per row.
// ------------------------------------------------------------------------------------------------------------
// dS_ij = P_ij (adj_ij − Σ_k P_ik adj_ik) + c_1 W_1,ij, written over W_1; rbf: K'_ij = S_ij dS_ij with S
// recomputed from a Gram panel (local rows, stride n) and Σ_j K'_ij → ks[i] (2γ is applied by the caller).
// c_1 is read from device memory: the margin gate was decided on the device, no host sync.
template <typename T, bool RBF>
__global__ void __launch_bounds__(RowLaunch<T>::kMaxThreads)
    softmax_bwd_kernel(const T* __restrict__ p, const T* __restrict__ adj, T* __restrict__ w, int n,
                       const T* __restrict__ coef, const T* __restrict__ gram, const T* __restrict__ sq,
                       int64_t row0, T gamma, T* __restrict__ ks) {
  const int64_t gi = row0 + blockIdx.x, base = gi * n;
  T dot = T(0);
  for (int j = threadIdx.x; j < n; j += blockDim.x) dot += p[base + j] * adj[base + j];
  dot = block_sum(dot);
  const T c1 = coef[0];
  const T* __restrict__ grow = RBF ? gram + int64_t(blockIdx.x) * n : nullptr;
  const T sqi = RBF ? sq[gi] : T(0);
  T k = T(0);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    T ds = p[base + j] * (adj[base + j] - dot) + c1 * w[base + j];
    if constexpr (RBF) {
      ds *= logit<T, true>(grow[j], sqi, sq, int(gi), j, T(0), gamma);
      k += ds;
    }
    w[base + j] = ds;
  }
  if constexpr (RBF) {
    k = block_sum(k);
    if (threadIdx.x == 0) ks[gi] = k;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Small kernels: row norms, the final reductions and margin gates.
// ------------------------------------------------------------------------------------------------------------
// ‖û_i‖² accumulated in double (as the CPU op), one warp per row.
template <typename T>
__global__ void sq_norms_kernel(const T* __restrict__ u, int64_t n, int64_t d, T* __restrict__ out) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / cuda::kWarpSize) + threadIdx.x / cuda::kWarpSize;
  const int lane = threadIdx.x % cuda::kWarpSize;
  if (row >= n) return;  // whole warps exit together
  double s = 0;
  for (int64_t k = lane; k < d; k += cuda::kWarpSize) {
    const double v = double(u[row * d + k]);
    s += v * v;
  }
  s = cuda::warp_all_reduce<cuda::SumOp>(s);
  if (lane == 0) out[row] = T(s);
}

// D = (Σ_{i∈[begin,end)} ℓ_i)/N in double, fixed order (one block). hinge: loss = relu(D − margin) with
// torch.relu's semantics (NaN propagates with an open gate) and gate = open; otherwise loss = D.
template <typename T>
__global__ void finalize_level1_kernel(const T* __restrict__ row_loss, int64_t begin, int64_t end, double inv_n,
                                       double margin, bool hinge, T* __restrict__ out, bool* __restrict__ gate) {
  double s = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) s += double(row_loss[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const double d = s * inv_n;
    if (hinge) {
      const double shifted = d - margin;
      const bool open = shifted > 0 || isnan(shifted);
      out[0] = T(open ? shifted : 0.0);
      gate[0] = open;
    } else {
      out[0] = T(d);
    }
  }
}

// Levels > 1: D_l from the per-level row losses (L × N), loss = (1/L) Σ_l w_l relu(D_l − margin) and the
// adjoint coefficients c_l = w_l/L where the hinge is open (NaN counts as open, as torch.relu), else 0.
template <typename T>
__global__ void finalize_levels_kernel(const T* __restrict__ row_loss, int64_t n, int levels, bool inverse,
                                       double margin, T* __restrict__ out, T* __restrict__ coef) {
  double total = 0;
  for (int l = 0; l < levels; ++l) {
    double s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += double(row_loss[int64_t(l) * n + i]);
    s = block_sum(s);
    const double d = s / double(n);
    const double w = inverse ? 1.0 / double(l + 1) : 1.0;
    const double shifted = d - margin;
    const bool open = shifted > 0 || isnan(shifted);
    total += w * (open ? shifted : 0.0);
    if (threadIdx.x == 0) coef[l] = T(open ? w / double(levels) : 0.0);
  }
  if (threadIdx.x == 0) out[0] = T(total / double(levels));
}

// ------------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------------
using Options = StructureOptions;  // csrc/common/checks.h

constexpr int kReduceThreads = 256;

// Threads per row block: ≥ 16 entries per thread, a multiple of 32, at most the kernel's launch bound.
// Depends on N only (not on the panel height), so the panel budget never changes the reduction order.
template <typename T>
int row_threads(int64_t n) {
  int t = cuda::kWarpSize;
  while (t < RowLaunch<T>::kMaxThreads && int64_t(t) * 16 < n) t *= 2;
  return t;
}

// Rows per panel (csrc/common/panel.h): 256 MiB and at least 256 rows by default (the backward GEMMs have the
// panel height as inner dimension); STRUCTURE_OPS_CUDA_PANEL_MB sets an exact budget, down to 1 row.
int64_t cuda_panel_rows(int64_t n, int64_t bytes_per_row) {
  return panel_rows_budget(n, bytes_per_row, "STRUCTURE_OPS_CUDA_PANEL_MB", 256.0, 256, 16);
}

template <typename T>
at::Tensor sq_norms(const at::Tensor& u) {
  const int64_t n = u.size(0), d = u.size(1);
  at::Tensor out = at::empty({n}, u.options());
  constexpr int threads = 256, rows_per_block = threads / cuda::kWarpSize;
  sq_norms_kernel<T><<<unsigned(ceil_div<int64_t>(n, rows_per_block)), threads, 0, cuda::current_stream(u)>>>(
      u.const_data_ptr<T>(), n, d, out.data_ptr<T>());
  SO_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <bool B>
using Bool = std::integral_constant<bool, B>;

// Calls f(Bool<b>{}): turns a runtime flag into a template argument.
template <typename F>
void with_bool(bool b, F&& f) {
  if (b)
    f(Bool<true>{});
  else
    f(Bool<false>{});
}

template <typename T, bool ML>
void launch_rows(const RowArgs<T>& args, int64_t rows, bool gx, bool gz, bool js, bool rbf, cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = row_threads<T>(args.n);
  with_bool(gx, [&](auto GX) {
    with_bool(gz, [&](auto GZ) {
      with_bool(js, [&](auto JS) {
        with_bool(rbf, [&](auto RBF) {
          l1_rows_kernel<T, decltype(GX)::value, decltype(GZ)::value, decltype(JS)::value, decltype(RBF)::value, ML>
              <<<unsigned(rows), threads, 0, stream>>>(args);
        });
      });
    });
  });
  SO_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ------------------------------------------------------------------------------------------------------------
// Level 1: row panels, gradient in forward. Rows [row_begin, row_end): ℓ_i → row_loss[i]; gx, gz (zeroed by
// the caller) receive the gradient of (1/N) Σ_{i in range} ℓ_i w.r.t. all of X̂, Ẑ.
// ------------------------------------------------------------------------------------------------------------
template <typename T>
void level1_panels(const at::Tensor& x, const at::Tensor& z, const Options& o, bool need_gx, bool need_gz,
                   at::Tensor& gx, at::Tensor& gz, int64_t row_begin, int64_t row_end, at::Tensor& row_loss) {
  const int64_t n = x.size(0);
  const bool rbf = o.similarity == kRbf, js = o.divergence == kJS;
  const int64_t nbuf = 2 + int64_t(need_gx) + int64_t(need_gz);
  const int64_t rows = std::max<int64_t>(
      1, std::min(cuda_panel_rows(n, nbuf * n * int64_t(sizeof(T))), row_end - row_begin));
  const auto opts = x.options();
  const cudaStream_t stream = cuda::current_stream(x);
  at::Tensor bx = at::empty({rows, n}, opts), bz = at::empty({rows, n}, opts);
  at::Tensor wx = need_gx ? at::empty({rows, n}, opts) : at::Tensor();
  at::Tensor wz = need_gz ? at::empty({rows, n}, opts) : at::Tensor();
  at::Tensor sqx = rbf ? sq_norms<T>(x) : at::Tensor();
  at::Tensor sqz = rbf ? sq_norms<T>(z) : at::Tensor();
  // rbf: Σ_j K'_ij (rows, written by the kernel) and Σ_i K'_ij (columns, summed per panel); zero outside the range.
  at::Tensor ksx = rbf && need_gx ? at::zeros({n}, opts) : at::Tensor();
  at::Tensor ksz = rbf && need_gz ? at::zeros({n}, opts) : at::Tensor();
  at::Tensor colx = rbf && need_gx ? at::zeros({n}, opts) : at::Tensor();
  at::Tensor colz = rbf && need_gz ? at::zeros({n}, opts) : at::Tensor();
  const double alpha = rbf ? 2.0 * o.gamma : 1.0 / o.temperature;

  RowArgs<T> args{};
  args.ld_b = n;
  args.ld_w = n;
  args.sqx = ptr_or_null<T>(sqx);
  args.sqz = ptr_or_null<T>(sqz);
  args.n = n;
  args.inv_tau = T(rbf ? 0.0 : 1.0 / o.temperature);
  args.gamma = T(o.gamma);
  args.eps = T(o.eps);
  args.inv_n = T(1.0 / double(n));
  args.row_loss = row_loss.data_ptr<T>();
  args.ksx = ptr_or_null<T>(ksx);
  args.ksz = ptr_or_null<T>(ksz);

  for (int64_t r0 = row_begin; r0 < row_end; r0 += rows) {
    const int64_t b = std::min(rows, row_end - r0);
    at::Tensor sx = bx.narrow(0, 0, b), sz = bz.narrow(0, 0, b);
    at::mm_out(sx, x.narrow(0, r0, b), x.t());
    at::mm_out(sz, z.narrow(0, r0, b), z.t());
    args.bx = sx.data_ptr<T>();
    args.bz = sz.data_ptr<T>();
    args.wx = ptr_or_null<T>(wx);
    args.wz = ptr_or_null<T>(wz);
    args.row0 = r0;
    launch_rows<T, false>(args, b, need_gx, need_gz, js, rbf, stream);
    // W is Q(g − ḡ)/N (rbf: S∘W); the 1/τ (cosine) or 2γ (rbf) factor is applied here, as alpha.
    if (need_gz) {
      at::Tensor w = wz.narrow(0, 0, b);
      gz.narrow(0, r0, b).addmm_(w, z, 1.0, alpha);
      gz.addmm_(w.t(), z.narrow(0, r0, b), 1.0, alpha);
      if (rbf) colz.add_(w.sum(at::IntArrayRef{0}));
    }
    if (need_gx) {
      at::Tensor w = wx.narrow(0, 0, b);
      gx.narrow(0, r0, b).addmm_(w, x, 1.0, alpha);
      gx.addmm_(w.t(), x.narrow(0, r0, b), 1.0, alpha);
      if (rbf) colx.add_(w.sum(at::IntArrayRef{0}));
    }
  }
  if (rbf && need_gz) gz.addcmul_(ksz.add(colz).unsqueeze(1), z, -alpha);  // −α(K'·1 + K'ᵀ·1)∘Ẑ
  if (rbf && need_gx) gx.addcmul_(ksx.add(colx).unsqueeze(1), x, -alpha);
}

// ------------------------------------------------------------------------------------------------------------
// Levels > 1: materialized powers.
// ------------------------------------------------------------------------------------------------------------
// Bytes of N × N buffers at the peak: P and Q; per side with a gradient the powers 2..L, G_2..G_L, W_1 and
// adj(P) (2L); per side without one the current and the next power (2); one transient product. (The same
// estimate as the Triton backend's multilevel_memory_estimate.)
double multilevel_bytes(int64_t n, int64_t levels, int64_t elem, bool grad_x, bool grad_z) {
  const double per_x = grad_x ? 2.0 * double(levels) : 2.0, per_z = grad_z ? 2.0 * double(levels) : 2.0;
  return (2.0 + per_x + per_z + 1.0) * double(n) * double(n) * double(elem);
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", bytes / double(1 << 30));
  return buf;
}

// Refuse up front, with the estimate, rather than fail in the middle of the chain with a bare OOM.
// Available: 90% of (free device memory + what torch's caching allocator holds but does not use);
// STRUCTURE_OPS_CUDA_MEM_LIMIT_MB (> 0) replaces it (tests, or to keep room for the rest of a training step).
void check_multilevel_memory(const at::Tensor& x, int64_t levels, bool grad_x, bool grad_z) {
  const int64_t n = x.size(0);
  const double est = multilevel_bytes(n, levels, int64_t(x.element_size()), grad_x, grad_z);
  double avail = 0;
  std::string what;
  const char* env = std::getenv("STRUCTURE_OPS_CUDA_MEM_LIMIT_MB");
  const double limit_mb = env ? std::atof(env) : 0.0;
  if (limit_mb > 0) {
    avail = limit_mb * double(1 << 20);
    what = "STRUCTURE_OPS_CUDA_MEM_LIMIT_MB=" + std::string(env);
  } else {
    size_t free_b = 0, total_b = 0;
    SO_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(x.device().index());
    // index 0 = StatType::AGGREGATE (its namespace moved between torch releases; the index did not)
    const double cached = double(stats.reserved_bytes[0].current - stats.allocated_bytes[0].current);
    avail = 0.9 * (double(free_b) + std::max(0.0, cached));
    what = "90% of the " + gib(double(free_b) + std::max(0.0, cached)) + " GiB free on " + x.device().str();
  }
  TORCH_CHECK(est <= avail, "structure_loss (cuda) with levels=", levels, " materializes about ", gib(est),
              " GiB of N x N matrices at N=", n, ", more than ", what,
              "; use levels=1 (row panels, bounded memory) or a smaller batch");
}

// Adjoint of the power chain of one side, the softmax Jacobian (+ c_1 W_1) and the chain to Û.
template <typename T>
at::Tensor side_backward(std::vector<at::Tensor>& powers, std::vector<at::Tensor>& gs, const at::Tensor& coef,
                         at::Tensor& w1, const at::Tensor& u, const at::Tensor& sq, const Options& o) {
  const int64_t L = int64_t(powers.size()), n = u.size(0);
  const bool rbf = o.similarity == kRbf;
  const cudaStream_t stream = cuda::current_stream(u);
  const at::Tensor p = powers[0];
  // coef.select(0, l) is a 0-dim device tensor: scaling by it launches a kernel, it never syncs the host.
  at::Tensor adj = gs[L - 1].mul_(coef.select(0, L - 1));  // adj(R_L) = c_L G_L
  gs[L - 1] = at::Tensor();
  at::Tensor adj_p = at::zeros_like(p);
  for (int64_t l = L; l >= 2; --l) {
    adj_p.addmm_(powers[l - 2].t(), adj);  // adj(P) += R_{l−1}ᵀ adj(R_l)
    if (l - 1 >= 2) {
      at::Tensor prev = gs[l - 2].mul_(coef.select(0, l - 2));  // adj(R_{l−1}) = c_{l−1}G_{l−1} + adj(R_l)Pᵀ
      gs[l - 2] = at::Tensor();
      prev.addmm_(adj, p.t());
      adj = prev;
    } else {
      adj_p.addmm_(adj, p.t());  // R_1 = P: its adjoint joins adj(P) (level 1 itself is c_1 W_1)
    }
    powers[l - 1] = at::Tensor();  // R_l is no longer needed
  }
  adj = at::Tensor();

  const int threads = row_threads<T>(n);
  const T* coef_p = coef.const_data_ptr<T>();
  at::Tensor ks = rbf ? at::zeros({n}, u.options()) : at::Tensor();
  if (rbf) {
    const int64_t rows = cuda_panel_rows(n, n * int64_t(sizeof(T)));
    at::Tensor gram = at::empty({rows, n}, u.options());
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t b = std::min(rows, n - r0);
      at::Tensor g = gram.narrow(0, 0, b);
      at::mm_out(g, u.narrow(0, r0, b), u.t());
      softmax_bwd_kernel<T, true><<<unsigned(b), threads, 0, stream>>>(
          p.const_data_ptr<T>(), adj_p.const_data_ptr<T>(), w1.data_ptr<T>(), int(n), coef_p, g.const_data_ptr<T>(),
          sq.const_data_ptr<T>(), r0, T(o.gamma), ks.data_ptr<T>());
      SO_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    softmax_bwd_kernel<T, false><<<unsigned(n), threads, 0, stream>>>(
        p.const_data_ptr<T>(), adj_p.const_data_ptr<T>(), w1.data_ptr<T>(), int(n), coef_p, nullptr, nullptr, 0, T(0),
        nullptr);
    SO_CUDA_KERNEL_LAUNCH_CHECK();
  }
  adj_p = at::Tensor();
  powers.clear();
  const double alpha = rbf ? 2.0 * o.gamma : 1.0 / o.temperature;
  at::Tensor grad = at::mm(w1, u).mul_(alpha);
  grad.addmm_(w1.t(), u, 1.0, alpha);
  if (rbf) grad.addcmul_(ks.add(w1.sum(at::IntArrayRef{0})).unsqueeze(1), u, -alpha);
  return grad;
}

template <typename T>
at::Tensor multilevel(const at::Tensor& x, const at::Tensor& z, const Options& o, bool need_gx, bool need_gz,
                      at::Tensor& gx, at::Tensor& gz) {
  const int64_t n = x.size(0), L = o.levels;
  check_multilevel_memory(x, L, need_gx, need_gz);
  const bool rbf = o.similarity == kRbf, js = o.divergence == kJS;
  const auto opts = x.options();
  const cudaStream_t stream = cuda::current_stream(x);
  at::Tensor p = at::mm(x, x.t()), q = at::mm(z, z.t());  // Gram matrices; the row kernel turns them into P, Q
  at::Tensor w1x = need_gx ? at::empty({n, n}, opts) : at::Tensor();
  at::Tensor w1z = need_gz ? at::empty({n, n}, opts) : at::Tensor();
  at::Tensor row_loss = at::empty({L, n}, opts);
  at::Tensor sqx = rbf ? sq_norms<T>(x) : at::Tensor();
  at::Tensor sqz = rbf ? sq_norms<T>(z) : at::Tensor();

  RowArgs<T> args{};
  args.bx = p.data_ptr<T>();
  args.bz = q.data_ptr<T>();
  args.ld_b = n;
  args.wx = ptr_or_null<T>(w1x);
  args.wz = ptr_or_null<T>(w1z);
  args.ld_w = n;
  args.sqx = ptr_or_null<T>(sqx);
  args.sqz = ptr_or_null<T>(sqz);
  args.row0 = 0;
  args.n = n;
  args.inv_tau = T(rbf ? 0.0 : 1.0 / o.temperature);
  args.gamma = T(o.gamma);
  args.eps = T(o.eps);
  args.inv_n = T(1.0 / double(n));
  args.row_loss = row_loss.data_ptr<T>();
  launch_rows<T, true>(args, n, need_gx, need_gz, js, rbf, stream);

  const int threads = row_threads<T>(n);
  std::vector<at::Tensor> powers_x{p}, powers_z{q}, gs_x{at::Tensor()}, gs_z{at::Tensor()};
  for (int64_t l = 2; l <= L; ++l) {
    at::Tensor nx = at::mm(powers_x.back(), p), nz = at::mm(powers_z.back(), q);
    at::Tensor go = need_gx ? at::empty({n, n}, opts) : at::Tensor();
    at::Tensor ga = need_gz ? at::empty({n, n}, opts) : at::Tensor();
    T* rl = row_loss.data_ptr<T>() + (l - 1) * n;
    const T eps = T(o.eps), inv_n = T(1.0 / double(n));
    with_bool(js, [&](auto JS) {
      with_bool(need_gx, [&](auto GO) {
        with_bool(need_gz, [&](auto GA) {
          level_div_kernel<T, decltype(JS)::value, decltype(GO)::value, decltype(GA)::value>
              <<<unsigned(n), threads, 0, stream>>>(nx.const_data_ptr<T>(), nz.const_data_ptr<T>(), int(n), eps, inv_n,
                                                    rl, ptr_or_null<T>(go), ptr_or_null<T>(ga));
        });
      });
    });
    SO_CUDA_KERNEL_LAUNCH_CHECK();
    // Keep every power (and G_l) of a side that needs a gradient; otherwise only P and the current power.
    if (need_gx) {
      powers_x.push_back(nx);
      gs_x.push_back(go);
    } else {
      powers_x = {p, nx};
    }
    if (need_gz) {
      powers_z.push_back(nz);
      gs_z.push_back(ga);
    } else {
      powers_z = {q, nz};
    }
  }

  // Margin gate and weights per level, on the device.
  at::Tensor loss = at::empty({}, opts);
  at::Tensor coef = at::empty({L}, opts);
  finalize_levels_kernel<T><<<1, kReduceThreads, 0, stream>>>(row_loss.const_data_ptr<T>(), n, int(L),
                                                              o.weighting == kWeightInverse, o.margin,
                                                              loss.data_ptr<T>(), coef.data_ptr<T>());
  SO_CUDA_KERNEL_LAUNCH_CHECK();
  // Free the powers of a side without a gradient before the backward chains allocate.
  if (!need_gx) powers_x.clear();
  if (!need_gz) powers_z.clear();
  if (need_gx) {
    gx = side_backward<T>(powers_x, gs_x, coef, w1x, x, sqx, o);
    w1x = at::Tensor();
  }
  if (need_gz) gz = side_backward<T>(powers_z, gs_z, coef, w1z, z, sqz, o);
  return loss;
}

// ------------------------------------------------------------------------------------------------------------
// Op entries
// ------------------------------------------------------------------------------------------------------------
void check_common(const at::Tensor& xh, const at::Tensor& zh, const char* op, const Options& o) {
  check_pair(xh, "x", zh, "z");
  TORCH_CHECK(xh.size(0) < (int64_t(1) << 31), op, " (cuda): N must be < 2^31, got shape ", xh.sizes());
  TORCH_CHECK(xh.is_cuda(), op, " (cuda): x and z must be CUDA tensors, got x on ", xh.device(), " and z on ",
              zh.device());
  check_structure_options(o);
}

// fp64 stays fp64 (the oracle's precision); every other float dtype computes in fp32 (see the file header).
at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> structure_fwd_cuda(
    const at::Tensor& xh_in, const at::Tensor& zh_in, int64_t levels, double temperature, int64_t weighting,
    double margin, int64_t similarity, double gamma, int64_t divergence, double eps, bool grad_x, bool grad_z) {
  const Options o{levels, temperature, weighting, margin, similarity, gamma, divergence, eps};
  check_common(xh_in, zh_in, "structure_fwd", o);
  const c10::cuda::CUDAGuard guard(xh_in.device());

  const auto in_dtype = xh_in.scalar_type();
  const auto cdt = compute_dtype(in_dtype);
  const at::Tensor xh = xh_in.to(cdt).contiguous(), zh = zh_in.to(cdt).contiguous();
  const int64_t n = xh.size(0);
  at::Tensor gx = grad_x ? at::zeros_like(xh) : at::Tensor();
  at::Tensor gz = grad_z ? at::zeros_like(zh) : at::Tensor();
  at::Tensor loss;

  AT_DISPATCH_FLOATING_TYPES(cdt, "structure_fwd_cuda", [&] {
    if (levels == 1) {
      at::Tensor row_loss = at::empty({n}, xh.options());
      level1_panels<scalar_t>(xh, zh, o, grad_x, grad_z, gx, gz, 0, n, row_loss);
      loss = at::empty({}, xh.options());
      at::Tensor gate = at::empty({}, xh.options().dtype(at::kBool));
      finalize_level1_kernel<scalar_t><<<1, kReduceThreads, 0, cuda::current_stream(xh)>>>(
          row_loss.const_data_ptr<scalar_t>(), 0, n, 1.0 / double(n), margin, true, loss.data_ptr<scalar_t>(),
          gate.data_ptr<bool>());
      SO_CUDA_KERNEL_LAUNCH_CHECK();
      // A closed hinge zeroes the gradient (torch.relu's backward): where, not a product, so inf·0 stays 0.
      if (grad_x) gx = at::where(gate, gx, at::zeros({}, gx.options()));
      if (grad_z) gz = at::where(gate, gz, at::zeros({}, gz.options()));
    } else {
      loss = multilevel<scalar_t>(xh, zh, o, grad_x, grad_z, gx, gz);
    }
  });
  at::Tensor out_gx = grad_x ? gx.to(in_dtype).contiguous() : at::empty({0}, xh_in.options());
  at::Tensor out_gz = grad_z ? gz.to(in_dtype).contiguous() : at::empty({0}, zh_in.options());
  return {loss.to(in_dtype), out_gx, out_gz};
}

// Level 1 restricted to rows [row_begin, row_end): partial = (1/N) Σ_{i in range} ℓ_i (no margin: the hinge acts
// on the sum over all ranks, structure_ops/distributed.py) and its gradient w.r.t. the full X̂, Ẑ.
std::tuple<at::Tensor, at::Tensor, at::Tensor> structure_rows_fwd_cuda(
    const at::Tensor& xh_in, const at::Tensor& zh_in, int64_t row_begin, int64_t row_end, double temperature,
    int64_t similarity, double gamma, int64_t divergence, double eps, bool grad_x, bool grad_z) {
  const Options o{1, temperature, kWeightNone, 0.0, similarity, gamma, divergence, eps};
  check_common(xh_in, zh_in, "structure_rows_fwd", o);
  check_row_range(row_begin, row_end, xh_in.size(0));
  const c10::cuda::CUDAGuard guard(xh_in.device());
  const auto in_dtype = xh_in.scalar_type();
  const auto cdt = compute_dtype(in_dtype);
  const at::Tensor xh = xh_in.to(cdt).contiguous(), zh = zh_in.to(cdt).contiguous();
  const int64_t n = xh.size(0);
  at::Tensor gx = grad_x ? at::zeros_like(xh) : at::Tensor();
  at::Tensor gz = grad_z ? at::zeros_like(zh) : at::Tensor();
  at::Tensor partial = at::empty({}, xh.options());
  AT_DISPATCH_FLOATING_TYPES(cdt, "structure_rows_fwd_cuda", [&] {
    at::Tensor row_loss = at::empty({n}, xh.options());
    level1_panels<scalar_t>(xh, zh, o, grad_x, grad_z, gx, gz, row_begin, row_end, row_loss);
    finalize_level1_kernel<scalar_t><<<1, kReduceThreads, 0, cuda::current_stream(xh)>>>(
        row_loss.const_data_ptr<scalar_t>(), row_begin, row_end, 1.0 / double(n), 0.0, false,
        partial.data_ptr<scalar_t>(), nullptr);
    SO_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor out_gx = grad_x ? gx.to(in_dtype).contiguous() : at::empty({0}, xh_in.options());
  at::Tensor out_gz = grad_z ? gz.to(in_dtype).contiguous() : at::empty({0}, zh_in.options());
  return {partial.to(in_dtype), out_gx, out_gz};
}

}  // namespace

TORCH_LIBRARY_IMPL(structure_ops, CUDA, m) {
  m.impl("structure_fwd", &structure_fwd_cuda);
  m.impl("structure_rows_fwd", &structure_rows_fwd_cuda);
}

}  // namespace structure_ops
