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
// Pass structure, level 1 (docs/kernels.md §2a), per row panel I of B rows:
//   Gram panels X̂_I X̂ᵀ, Ẑ_I Ẑᵀ by cuBLAS (at::mm_out) into fp32 (fp64 for fp64 inputs) panels;
//   the row passes (below) → ℓ_i and the weights W_I (rbf: K'_I = S∘W_I and its row sums);
//   dẐ_I += αW_IẐ and dẐ += αW_IᵀẐ_I, each ONE GEMM accumulating into the fp32/fp64 gradient (beta = 1, the
//   scale α = 1/τ or 2γ, times the storage scale of W, applied once as the GEMM's alpha: no scale-and-add kernel).
// The row passes, per row i of the panel (a_j = S^X_ij − lseX_i, b_j = S^Z_ij − lseZ_i, P = e^a, Q = e^b):
//   pass 1  online (max, Σexp) → lseX_i, lseZ_i                                          reads both Gram rows
//   pass 2  ℓ_i = Σ_j term(P_ij, Q_ij), ḡ_i = Σ_j Q_ij g_ij (X side: Σ P∘∂term/∂P); rbf: the row sums of S∘Q∘g
//           and S∘Q, from which Σ_j K'_ij = s_w(Σ S∘Q∘g − ḡ Σ S∘Q) follows without a third reduction
//                                                                                        reads both Gram rows
//   pass 3  recomputes P, Q and the terms from the Gram rows and writes W = s_w·Q∘(g − ḡ) once per side with a
//           gradient (rbf: S∘W), in the GEMM operand dtype                 reads both Gram rows, writes W
// HBM bytes per (i, j) pair of the row passes (Gram rows fp32, e = 4 B; W in e_w = 4 B for fp32 inputs, 2 B for
// bf16/fp16; the GEMMs' own Gram write and W reads come on top, docs/roofline.md):
//                           forward only   grad_z   grad_x + grad_z
//   before (issue 14)           16 B        36 B         56 B     (pass 2 stored Q∘g and Q, pass 3 re-read them)
//   now, fp32 W                 16 B        28 B         32 B     (24 B of Gram reads + e_w per side)
//   now, bf16/fp16 W            16 B        26 B         28 B
// The price is the recomputation in pass 3: 12 instead of 7 special-function evaluations per pair.
//   Grids: panels with at least as many rows as the device has SMs run ONE fused kernel, a block per row
//   (l1_rows_kernel: the three passes with block reductions in between). Panels with fewer rows (the ragged
//   last panel, or small panels when memory is short) run a 2-D grid (column blocks × rows) of three kernels,
//   one per pass (l1_lse_kernel, l1_terms_kernel, l1_grad_kernel); each block writes its partial (max, Σexp)
//   and sums to a small buffer, and the next kernel combines a row's partials in a fixed order (thread-strided,
//   then the fixed block-reduction tree): deterministic, no atomics.
// levels > 1 (docs/kernels.md §3): P, Q materialized (the row kernel turns the N×N Gram matrices into P, Q in
//   place and writes W_1), powers by at::mm, level_div_kernel (fused divergence epilogue: row losses and
//   G_l = ∂D_l/∂power in one pass), the margin gate on the device (finalize_levels_kernel, no host sync),
//   adjoint products by at::addmm, softmax_bwd_kernel (softmax Jacobian + c_1W_1, rbf: ∘S), chain GEMMs with the
//   scale as alpha (beta = 0, then beta = 1).
//
// Precision (docs/kernels.md §6): fp64 inputs compute in fp64 throughout. fp32 inputs: fp32 GEMMs that follow
// torch.get_float32_matmul_precision() through ATen's allow_tf32 flag. bf16/fp16 inputs, level 1: no upcast copy
// of X̂/Ẑ; the Gram GEMMs take the half operands with an fp32 output (at::mm_out(..., at::kFloat): tensor cores,
// fp32 accumulation; a half product is exact in fp32, so the logits are those of the upcast inputs up to the
// summation order); W is written in the input dtype and the gradient GEMMs take (W, Ẑ) as half operands and
// accumulate into an fp32 gradient (at::addmm_out with out_dtype = fp32 and beta = 1; torch < 2.10 lacks the
// fp32 `self` of that overload and gets an fp32 product plus one add instead). W is ~1/N²: bf16 has fp32's
// exponent range, so W is stored as is; fp16 stores s_w·Q∘(g − ḡ) with s_w = 2⁹ (|Q∘(g − ḡ)| ≤ ~50 for any
// ε ≥ the smallest fp32 subnormal, so ≤ 25 600 < 65 504; entries ~1/N stay normal up to N = 2²³) and the GEMM's
// alpha carries 1/(N·s_w). The rounding of W to the operand dtype is the error of the half path
// (tests/emulation/tolerances.py structure_half models it). Levels > 1 upcast half inputs once: their N × N
// power and adjoint products (O(N³), fp32 operands) dominate. All softmax, log-sum-exp and divergence math is
// fp32 (fp64 for fp64 inputs), the loss sums are double.
// Knobs (environment, read on every call): STRUCTURE_OPS_CUDA_PANEL_MB (> 0) caps the level-1 panel buffers
// (default cap 2048 MiB, the issue-14 memory target); the panels take at most half of the device memory that is
// free now (cudaMemGetInfo + what torch's caching allocator holds unused), at least 256 rows when that fits,
// a multiple of 16 rows; with the knob set, exactly the knob's budget when memory allows (down to 1 row).
// STRUCTURE_OPS_CUDA_MEM_LIMIT_MB (> 0) the memory the levels > 1 path may plan for (default: 90% of that free
// memory).
// Determinism: no float atomics; every reduction has a fixed order (per-thread strided sums, then a fixed
// shuffle tree; 2-D grids combine the column blocks' partials the same way), the loss is summed in double by
// one block; cuBLAS GEMMs are run-to-run reproducible on a given GPU and stream. Two calls with the same inputs
// and the same panel height are bitwise equal: the height depends on N, the cap and, only when less than twice
// the cap is free, on free memory (set the knob lower than half the free memory for bitwise reproducibility
// across memory states). Rows of the fused 1-D kernel reduce in an order fixed by N; rows of a 2-D panel in an
// order fixed by (N, panel height, SM count).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/version.h>

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
#include "../common/divergence.h"
#include "common.cuh"

// at::addmm_out(out, self, mat1, mat2, out_dtype, beta, alpha) accepts an fp32 `self` with half mat1/mat2 from
// torch 2.10 on (pytorch PR 167931); before, self had to be in the operand dtype.
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10))
#define SO_ADDMM_FP32_SELF 1
#else
#define SO_ADDMM_FP32_SELF 0
#endif

namespace structure_ops {
namespace {

using cuda::block_max;
using cuda::block_sum;
using cuda::ceil_div;

// Launch bounds of the row kernels: at most 512 threads per block, and at least 2 resident blocks per SM for fp32
// (≤ 64 registers per thread), 1 for fp64 (≤ 128: fp64 rows keep twice the live state). The minimum is explicit
// because ptxas otherwise plans for 2 blocks of the maximum size and spills (fp32 at 1024 threads: 32 registers).
// Two or more blocks per SM also let one block's reductions overlap another's streaming loop.
template <typename T>
struct RowLaunch {
  static constexpr int kMaxThreads = 512;
  static constexpr int kMinBlocks = sizeof(T) == 8 ? 1 : 2;
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

// Merges a partial (m2, l2) of other columns into (m, l) (m2 = −inf: no entries, l2 = 0).
template <typename T>
__device__ __forceinline__ void merge_lse(T& m, T& l, T m2, T l2) {
  if (m2 == T(-INFINITY)) return;
  if (m2 > m) {
    l = l * exp(m - m2) + l2;
    m = m2;
  } else {
    l += l2 * exp(m2 - m);
  }
}

// Block-wide (max, Σexp) from every thread's (m, l): rescale to the block max, then a fixed-order sum.
template <typename T>
__device__ __forceinline__ void block_lse_parts(T m, T l, T& mb, T& lb) {
  mb = block_max(m);
  lb = block_sum(m == T(-INFINITY) ? T(0) : l * exp(m - mb));  // idle threads: m = −inf, l = 0
}

template <typename T>
__device__ __forceinline__ T block_lse(T m, T l) {
  T mb, lb;
  block_lse_parts(m, l, mb, lb);
  return mb + log(lb);
}

// ------------------------------------------------------------------------------------------------------------
// The level-1 row passes (shared by the fused 1-D kernel and the three 2-D kernels).
// ------------------------------------------------------------------------------------------------------------
// ML (levels > 1): the Gram buffers are the N×N matrices (row0 = 0); pass 3 overwrites them with P and Q (after
// reading each entry, same thread) and W stays unscaled (the softmax-backward kernel applies S).
template <typename T>
struct L1Args {
  T* bx;  // Gram rows of X̂ (local rows, stride ld_b); ML: out P
  T* bz;
  int64_t ld_b;
  void* wx;  // out: W rows in the GEMM operand dtype (local rows, stride ld_w)
  void* wz;
  int64_t ld_w;
  const T* sqx;  // ‖x̂_j‖² (rbf)
  const T* sqz;
  int64_t row0;
  int64_t n;
  T inv_tau, gamma, eps;
  T w_scale;    // W is stored as w_scale·Q∘(g − ḡ) (the host folds 1/(N·w_scale) into the GEMM's alpha)
  T* row_loss;  // ℓ_i at the global row
  T* ksx;       // rbf, level 1: Σ_j K'_ij at the global row (in the storage scale of W)
  T* ksz;
  // 2-D grid: ncb column blocks of cw columns; partials per (local row, column block)
  int ncb, cw;
  T* part_lse;  // 4 per block: (max, Σexp) of X, then of Z
  T* part_sum;  // kSums per block
};

// Pass-2 sums of a row: loss, ḡ per side, and for rbf (level 1) Σ S∘Q∘g and Σ S∘Q per side.
enum : int { kLoss = 0, kGbx, kGbz, kAx, kBx, kAz, kBz, kSums };

// Everything a block needs to evaluate entry j of its row.
template <typename T, bool RBF>
struct Row {
  const T* gx;
  const T* gz;
  const T* sqx;
  const T* sqz;
  T sqxi, sqzi, inv_tau, gamma;
  int gi;
  __device__ __forceinline__ T sx(int j) const { return logit<T, RBF>(gx[j], sqxi, sqx, gi, j, inv_tau, gamma); }
  __device__ __forceinline__ T sz(int j) const { return logit<T, RBF>(gz[j], sqzi, sqz, gi, j, inv_tau, gamma); }
};

template <typename T, bool RBF>
__device__ __forceinline__ Row<T, RBF> make_row(const L1Args<T>& a, int64_t r) {
  const int64_t gi = a.row0 + r;
  return {a.bx + r * a.ld_b, a.bz + r * a.ld_b, a.sqx, a.sqz,
          RBF ? a.sqx[gi] : T(0), RBF ? a.sqz[gi] : T(0), a.inv_tau, a.gamma, int(gi)};
}

// P, Q and the divergence terms of one entry. "structure" via structure_terms; "js" via js_terms_from_logs,
// whose log(Q/M) = ln2 − softplus(a − b) never underflows (no ε needed).
template <typename T, bool JS>
__device__ __forceinline__ Terms<T> entry_terms(T sx, T sz, T lse_x, T lse_z, T eps, T& p, T& q) {
  if constexpr (JS) {
    return js_terms_from_logs(sx - lse_x, sz - lse_z, &p, &q);
  } else {
    p = exp(sx - lse_x);
    q = exp(sz - lse_z);
    return structure_terms(p, q, eps);
  }
}

// Pass 1 over columns [c0, c1) (each thread strided by blockDim.x): per-thread online (max, Σexp) per side.
template <typename T, bool RBF>
__device__ __forceinline__ void pass_lse(const Row<T, RBF>& row, int c0, int c1, T& mx, T& lx, T& mz, T& lz) {
  mx = T(-INFINITY), lx = T(0), mz = T(-INFINITY), lz = T(0);
  for (int j = c0 + int(threadIdx.x); j < c1; j += int(blockDim.x)) {
    online_lse(mx, lx, row.sx(j));
    online_lse(mz, lz, row.sz(j));
  }
}

// Pass 2 over columns [c0, c1): per-thread sums (kSums layout; entries a configuration does not need stay 0).
template <typename T, bool GX, bool GZ, bool JS, bool RBF_K, bool RBF>
__device__ __forceinline__ void pass_terms(const Row<T, RBF>& row, int c0, int c1, T lse_x, T lse_z, T eps,
                                           T (&s)[kSums]) {
  for (int j = c0 + int(threadIdx.x); j < c1; j += int(blockDim.x)) {
    const T sx = row.sx(j), sz = row.sz(j);
    T p, q;
    const Terms<T> t = entry_terms<T, JS>(sx, sz, lse_x, lse_z, eps, p, q);
    s[kLoss] += t.value;
    if constexpr (GZ) {
      const T qg = q * t.d_a;
      s[kGbz] += qg;
      if constexpr (RBF_K) {
        s[kAz] += sz * qg;
        s[kBz] += sz * q;
      }
    }
    if constexpr (GX) {
      const T pg = p * t.d_o;
      s[kGbx] += pg;
      if constexpr (RBF_K) {
        s[kAx] += sx * pg;
        s[kBx] += sx * p;
      }
    }
  }
}

// Block sums of the pass-2 entries a configuration uses (every thread gets the same bits).
template <typename T, bool GX, bool GZ, bool RBF_K>
__device__ __forceinline__ void block_sums(T (&s)[kSums]) {
  s[kLoss] = block_sum(s[kLoss]);
  if constexpr (GZ) {
    s[kGbz] = block_sum(s[kGbz]);
    if constexpr (RBF_K) {
      s[kAz] = block_sum(s[kAz]);
      s[kBz] = block_sum(s[kBz]);
    }
  }
  if constexpr (GX) {
    s[kGbx] = block_sum(s[kGbx]);
    if constexpr (RBF_K) {
      s[kAx] = block_sum(s[kAx]);
      s[kBx] = block_sum(s[kBx]);
    }
  }
}

// ℓ_i and (rbf, level 1) Σ_j K'_ij = w_scale·(Σ S∘Q∘g − ḡ Σ S∘Q) of global row gi, from the row's block sums.
template <typename T, bool GX, bool GZ, bool RBF_K>
__device__ __forceinline__ void write_row(const L1Args<T>& a, int64_t gi, const T (&s)[kSums]) {
  a.row_loss[gi] = s[kLoss];
  if constexpr (RBF_K && GZ) a.ksz[gi] = a.w_scale * (s[kAz] - s[kGbz] * s[kBz]);
  if constexpr (RBF_K && GX) a.ksx[gi] = a.w_scale * (s[kAx] - s[kGbx] * s[kBx]);
}

// Pass 3 over columns [c0, c1): recompute P, Q and the terms, write W = w_scale·Q∘(g − ḡ) (RBF_K: S∘W) once per
// side with a gradient, in the operand dtype WT; ML: P and Q over the Gram row (each thread rewrites only the
// entries it has just read).
template <typename T, typename WT, bool GX, bool GZ, bool JS, bool RBF_K, bool ML, bool RBF>
__device__ __forceinline__ void pass_grad(const Row<T, RBF>& row, T* __restrict__ px, T* __restrict__ pz,
                                          WT* __restrict__ wxr, WT* __restrict__ wzr, int c0, int c1, T lse_x,
                                          T lse_z, T eps, T gbx, T gbz, T w_scale) {
  for (int j = c0 + int(threadIdx.x); j < c1; j += int(blockDim.x)) {
    const T sx = row.sx(j), sz = row.sz(j);
    T p, q;
    const Terms<T> t = entry_terms<T, JS>(sx, sz, lse_x, lse_z, eps, p, q);
    if constexpr (GZ) {
      T w = q * (t.d_a - gbz) * w_scale;
      if constexpr (RBF_K) w *= sz;
      wzr[j] = WT(w);
    }
    if constexpr (GX) {
      T w = p * (t.d_o - gbx) * w_scale;
      if constexpr (RBF_K) w *= sx;
      wxr[j] = WT(w);
    }
    if constexpr (ML) {
      px[j] = p;
      pz[j] = q;
    }
  }
}

template <typename WT, typename T>
__device__ __forceinline__ WT* w_row(const L1Args<T>& a, void* base, int64_t r) {
  return base ? static_cast<WT*>(base) + r * a.ld_w : nullptr;
}

// ------------------------------------------------------------------------------------------------------------
// Kernel 1: the fused level-1 row kernel, one block per row of a panel (panels with ≥ SM-count rows, and the
// N × N matrices of levels > 1). The three passes over the whole row with block reductions in between.
// ------------------------------------------------------------------------------------------------------------
template <typename T, typename WT, bool GX, bool GZ, bool JS, bool RBF, bool ML>
__global__ void __launch_bounds__(RowLaunch<T>::kMaxThreads, RowLaunch<T>::kMinBlocks) l1_rows_kernel(const L1Args<T> a) {
  constexpr bool RBF_K = RBF && !ML;
  // 32-bit column index (the host checks N < 2^31): fewer registers in the streaming loops.
  const int64_t r = blockIdx.x;
  const int n = int(a.n);
  const Row<T, RBF> row = make_row<T, RBF>(a, r);

  T mx, lx, mz, lz;
  pass_lse(row, 0, n, mx, lx, mz, lz);
  const T lse_x = block_lse(mx, lx), lse_z = block_lse(mz, lz);

  T s[kSums] = {};
  pass_terms<T, GX, GZ, JS, RBF_K>(row, 0, n, lse_x, lse_z, a.eps, s);
  block_sums<T, GX, GZ, RBF_K>(s);
  if (threadIdx.x == 0) write_row<T, GX, GZ, RBF_K>(a, row.gi, s);

  if constexpr (GX || GZ || ML) {
    pass_grad<T, WT, GX, GZ, JS, RBF_K, ML>(row, a.bx + r * a.ld_b, a.bz + r * a.ld_b, w_row<WT>(a, a.wx, r),
                                            w_row<WT>(a, a.wz, r), 0, n, lse_x, lse_z, a.eps, s[kGbx], s[kGbz],
                                            a.w_scale);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Kernels 1a–1c: the same passes on a 2-D grid (blockIdx.x = column block, blockIdx.y = local row) for panels
// with fewer rows than SMs (level 1 only).
// ------------------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void column_range(const L1Args<T>& a, int& c0, int& c1) {
  c0 = int(blockIdx.x) * a.cw;
  c1 = c0 + a.cw < int(a.n) ? c0 + a.cw : int(a.n);
}

// The row's log-sum-exp per side from its column blocks' partials: thread-strided merges, then the block tree.
template <typename T>
__device__ __forceinline__ void row_lse_from_parts(const L1Args<T>& a, int64_t r, T& lse_x, T& lse_z) {
  T mx = T(-INFINITY), lx = T(0), mz = T(-INFINITY), lz = T(0);
  for (int k = int(threadIdx.x); k < a.ncb; k += int(blockDim.x)) {
    const T* p = a.part_lse + (r * a.ncb + k) * 4;
    merge_lse(mx, lx, p[0], p[1]);
    merge_lse(mz, lz, p[2], p[3]);
  }
  lse_x = block_lse(mx, lx);
  lse_z = block_lse(mz, lz);
}

// 1a: per column block (max, Σexp) of both sides → part_lse.
template <typename T, bool RBF>
__global__ void __launch_bounds__(RowLaunch<T>::kMaxThreads, RowLaunch<T>::kMinBlocks) l1_lse_kernel(const L1Args<T> a) {
  const int64_t r = blockIdx.y;
  int c0, c1;
  column_range(a, c0, c1);
  const Row<T, RBF> row = make_row<T, RBF>(a, r);
  T mx, lx, mz, lz;
  pass_lse(row, c0, c1, mx, lx, mz, lz);
  T mbx, lbx, mbz, lbz;
  block_lse_parts(mx, lx, mbx, lbx);
  block_lse_parts(mz, lz, mbz, lbz);
  if (threadIdx.x == 0) {
    T* p = a.part_lse + (r * a.ncb + blockIdx.x) * 4;
    p[0] = mbx;
    p[1] = lbx;
    p[2] = mbz;
    p[3] = lbz;
  }
}

// 1b: the row's lse from 1a, then per column block the pass-2 sums of both sides → part_sum.
template <typename T, bool JS, bool RBF>
__global__ void __launch_bounds__(RowLaunch<T>::kMaxThreads, RowLaunch<T>::kMinBlocks) l1_terms_kernel(const L1Args<T> a) {
  const int64_t r = blockIdx.y;
  int c0, c1;
  column_range(a, c0, c1);
  const Row<T, RBF> row = make_row<T, RBF>(a, r);
  T lse_x, lse_z;
  row_lse_from_parts(a, r, lse_x, lse_z);
  T s[kSums] = {};
  pass_terms<T, true, true, JS, RBF>(row, c0, c1, lse_x, lse_z, a.eps, s);
  block_sums<T, true, true, RBF>(s);
  if (threadIdx.x == 0) {
    T* p = a.part_sum + (r * a.ncb + blockIdx.x) * kSums;
    for (int k = 0; k < kSums; ++k) p[k] = s[k];
  }
}

// 1c: the row's lse and sums from 1a/1b (fixed-order combine); column block 0 writes ℓ_i (and the rbf row sums);
// with a gradient, every block writes its columns of W. Launched with one column block when no side needs W.
template <typename T, typename WT, bool GX, bool GZ, bool JS, bool RBF>
__global__ void __launch_bounds__(RowLaunch<T>::kMaxThreads, RowLaunch<T>::kMinBlocks) l1_grad_kernel(const L1Args<T> a) {
  const int64_t r = blockIdx.y;
  int c0, c1;
  column_range(a, c0, c1);
  const Row<T, RBF> row = make_row<T, RBF>(a, r);
  T lse_x = T(0), lse_z = T(0);
  if constexpr (GX || GZ) row_lse_from_parts(a, r, lse_x, lse_z);
  T s[kSums] = {};
  for (int k = int(threadIdx.x); k < a.ncb; k += int(blockDim.x)) {
    const T* p = a.part_sum + (r * a.ncb + k) * kSums;
    s[kLoss] += p[kLoss];
    if constexpr (GZ) {
      s[kGbz] += p[kGbz];
      if constexpr (RBF) {
        s[kAz] += p[kAz];
        s[kBz] += p[kBz];
      }
    }
    if constexpr (GX) {
      s[kGbx] += p[kGbx];
      if constexpr (RBF) {
        s[kAx] += p[kAx];
        s[kBx] += p[kBx];
      }
    }
  }
  block_sums<T, GX, GZ, RBF>(s);
  if (blockIdx.x == 0 && threadIdx.x == 0) write_row<T, GX, GZ, RBF>(a, row.gi, s);
  if constexpr (GX || GZ) {
    pass_grad<T, WT, GX, GZ, JS, RBF, false>(row, nullptr, nullptr, w_row<WT>(a, a.wx, r), w_row<WT>(a, a.wz, r),
                                             c0, c1, lse_x, lse_z, a.eps, s[kGbx], s[kGbz], a.w_scale);
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
__global__ void __launch_bounds__(RowLaunch<T>::kMaxThreads, RowLaunch<T>::kMinBlocks)
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
__global__ void __launch_bounds__(RowLaunch<T>::kMaxThreads, RowLaunch<T>::kMinBlocks)
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
// In: the input dtype (half inputs are read as they are), T: the compute dtype of the result.
template <typename In, typename T>
__global__ void sq_norms_kernel(const In* __restrict__ u, int64_t n, int64_t d, T* __restrict__ out) {
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
// Depends on the row (or column-block) length only, so the panel budget never changes the 1-D reduction order.
template <typename T>
int row_threads(int64_t n) {
  int t = cuda::kWarpSize;
  while (t < RowLaunch<T>::kMaxThreads && int64_t(t) * 16 < n) t *= 2;
  return t;
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Device memory and the level-1 panel height: the shared rule of csrc/cuda/common.cuh (docs/kernels.md §10:
// sized from free memory, not a fixed budget; STRUCTURE_OPS_CUDA_PANEL_MB caps it, default 2048 MiB).
using cuda::available_device_bytes;
using cuda::panel_rows_from_memory;

// The 2-D grid of a panel with fewer rows than SMs: about 2 blocks per SM over the panel, column blocks of at
// least kMinBlockCols columns (a multiple of 32). ncb = 0: the panel runs the fused 1-D kernel.
constexpr int64_t kMinBlockCols = 256;

struct ColumnBlocks {
  int ncb = 0, cw = 0;
};

ColumnBlocks column_blocks(int64_t n, int64_t rows, int sms) {
  ColumnBlocks c;
  if (rows >= sms) return c;
  int64_t ncb = std::max<int64_t>(1, std::min(ceil_div<int64_t>(2 * int64_t(sms), rows), ceil_div(n, kMinBlockCols)));
  const int64_t cw = ceil_div<int64_t>(ceil_div(n, ncb), cuda::kWarpSize) * cuda::kWarpSize;
  ncb = ceil_div(n, cw);
  c.ncb = int(ncb);
  c.cw = int(cw);
  return c;
}

// ‖û_i‖² of the rows of u (read in its own dtype), in the compute dtype T.
template <typename T>
at::Tensor sq_norms(const at::Tensor& u) {
  const int64_t n = u.size(0), d = u.size(1);
  at::Tensor out = at::empty({n}, u.options().dtype(c10::CppTypeToScalarType<T>::value));
  constexpr int threads = 256, rows_per_block = threads / cuda::kWarpSize;
  const unsigned blocks = unsigned(ceil_div<int64_t>(n, rows_per_block));
  const cudaStream_t stream = cuda::current_stream(u);
  if (u.scalar_type() == at::kHalf) {
    sq_norms_kernel<at::Half, T><<<blocks, threads, 0, stream>>>(u.const_data_ptr<at::Half>(), n, d, out.data_ptr<T>());
  } else if (u.scalar_type() == at::kBFloat16) {
    sq_norms_kernel<at::BFloat16, T><<<blocks, threads, 0, stream>>>(u.const_data_ptr<at::BFloat16>(), n, d,
                                                                     out.data_ptr<T>());
  } else {
    sq_norms_kernel<T, T><<<blocks, threads, 0, stream>>>(u.const_data_ptr<T>(), n, d, out.data_ptr<T>());
  }
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

// The fused 1-D row kernel over `rows` rows. W is written in WT where a side needs it (otherwise WT is unused and
// the kernel is the one of T).
template <typename T, typename WT, bool ML>
void launch_rows(const L1Args<T>& args, int64_t rows, bool gx, bool gz, bool js, bool rbf, cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = row_threads<T>(args.n);
  with_bool(gx, [&](auto GX) {
    with_bool(gz, [&](auto GZ) {
      with_bool(js, [&](auto JS) {
        with_bool(rbf, [&](auto RBF) {
          using W = std::conditional_t<(decltype(GX)::value || decltype(GZ)::value), WT, T>;
          l1_rows_kernel<T, W, decltype(GX)::value, decltype(GZ)::value, decltype(JS)::value, decltype(RBF)::value, ML>
              <<<unsigned(rows), threads, 0, stream>>>(args);
        });
      });
    });
  });
  SO_CUDA_KERNEL_LAUNCH_CHECK();
}

// The three 2-D row kernels over `rows` rows (args.ncb, args.cw, args.part_* set).
template <typename T, typename WT>
void launch_rows_2d(const L1Args<T>& args, int64_t rows, bool gx, bool gz, bool js, bool rbf, cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = row_threads<T>(args.cw);
  const dim3 grid(unsigned(args.ncb), unsigned(rows));
  with_bool(rbf, [&](auto RBF) {
    l1_lse_kernel<T, decltype(RBF)::value><<<grid, threads, 0, stream>>>(args);
    SO_CUDA_KERNEL_LAUNCH_CHECK();
    with_bool(js, [&](auto JS) {
      l1_terms_kernel<T, decltype(JS)::value, decltype(RBF)::value><<<grid, threads, 0, stream>>>(args);
      SO_CUDA_KERNEL_LAUNCH_CHECK();
      with_bool(gx, [&](auto GX) {
        with_bool(gz, [&](auto GZ) {
          constexpr bool kW = decltype(GX)::value || decltype(GZ)::value;
          using W = std::conditional_t<kW, WT, T>;
          const dim3 grid_c(kW ? unsigned(args.ncb) : 1u, unsigned(rows));
          l1_grad_kernel<T, W, decltype(GX)::value, decltype(GZ)::value, decltype(JS)::value, decltype(RBF)::value>
              <<<grid_c, threads, 0, stream>>>(args);
        });
      });
      SO_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// out (fp32/fp64) = a_rows · bᵀ. Half operands: tensor cores with an fp32 output (no upcast copy).
void gram_panel(at::Tensor& out, const at::Tensor& a_rows, const at::Tensor& b) {
  if (is_half(a_rows.scalar_type())) {
    at::mm_out(out, a_rows, b.t(), at::kFloat);
  } else {
    at::mm_out(out, a_rows, b.t());
  }
}

// acc += alpha · a · b by one GEMM (beta = 1): acc in fp32/fp64, a and b in the operand dtype (half: tensor
// cores, fp32 accumulation into acc; fp32: torch's float32 matmul precision).
void gemm_accumulate(at::Tensor acc, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (is_half(a.scalar_type())) {
#if SO_ADDMM_FP32_SELF
    at::addmm_out(acc, acc, a, b, at::kFloat, 1.0, alpha);
#else
    acc.add_(at::mm(a, b, at::kFloat), alpha);  // torch < 2.10: no fp32 `self` with half operands
#endif
  } else {
    acc.addmm_(a, b, 1.0, alpha);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Level 1: row panels, gradient in forward. Rows [row_begin, row_end): ℓ_i → row_loss[i]; gx, gz (zeroed by
// the caller, in the compute dtype T) receive the gradient of (1/N) Σ_{i in range} ℓ_i w.r.t. all of X̂, Ẑ.
// x, z are in the operand dtype WT's tensor dtype (T itself, or bf16/fp16 with T = float).
// ------------------------------------------------------------------------------------------------------------
template <typename T, typename WT>
void level1_panels_impl(const at::Tensor& x, const at::Tensor& z, const Options& o, bool need_gx, bool need_gz,
                        at::Tensor& gx, at::Tensor& gz, int64_t row_begin, int64_t row_end, at::Tensor& row_loss) {
  const int64_t n = x.size(0);
  const bool rbf = o.similarity == kRbf, js = o.divergence == kJS;
  const int64_t sides = int64_t(need_gx) + int64_t(need_gz);
  const int64_t bytes_per_row = n * (2 * int64_t(sizeof(T)) + sides * int64_t(sizeof(WT)));
  const int64_t rows = panel_rows_from_memory(x, bytes_per_row, std::max<int64_t>(1, row_end - row_begin));
  const auto copts = x.options().dtype(c10::CppTypeToScalarType<T>::value);  // Gram panels, statistics
  const auto wopts = x.options();                                               // W: the operand dtype
  const cudaStream_t stream = cuda::current_stream(x);
  const int sms = cuda::sm_count(x.device().index());
  at::Tensor bx = at::empty({rows, n}, copts), bz = at::empty({rows, n}, copts);
  at::Tensor wx = need_gx ? at::empty({rows, n}, wopts) : at::Tensor();
  at::Tensor wz = need_gz ? at::empty({rows, n}, wopts) : at::Tensor();
  at::Tensor sqx = rbf ? sq_norms<T>(x) : at::Tensor();
  at::Tensor sqz = rbf ? sq_norms<T>(z) : at::Tensor();
  // rbf: Σ_j K'_ij (rows, written by the kernels) and Σ_i K'_ij (columns, summed per panel); zero outside the range.
  at::Tensor ksx = rbf && need_gx ? at::zeros({n}, copts) : at::Tensor();
  at::Tensor ksz = rbf && need_gz ? at::zeros({n}, copts) : at::Tensor();
  at::Tensor colx = rbf && need_gx ? at::zeros({n}, copts) : at::Tensor();
  at::Tensor colz = rbf && need_gz ? at::zeros({n}, copts) : at::Tensor();
  // W is stored as w_scale·Q∘(g − ḡ) (= W itself for w_scale = 1/N); the GEMMs' alpha carries the rest of
  // α/N, α = 1/τ (cosine) or 2γ (rbf): fp16 keeps its ~1/N entries normal with a power-of-two scale (header).
  const bool fp16 = x.scalar_type() == at::kHalf;
  const double inv_n = 1.0 / double(n);
  const double w_scale = fp16 ? 512.0 : inv_n;
  const double alpha = (rbf ? 2.0 * o.gamma : 1.0 / o.temperature) * (inv_n / w_scale);

  // The 2-D grid's partial buffers, sized for the larger of the full and the last (ragged) panel.
  const int64_t span = row_end - row_begin;
  const int64_t last = span > 0 && span % rows ? span % rows : rows;
  int64_t part_blocks = 0;
  for (int64_t b : {rows, last}) {
    const ColumnBlocks c = column_blocks(n, b, sms);
    if (c.ncb > 0) part_blocks = std::max<int64_t>(part_blocks, b * c.ncb);
  }
  at::Tensor part_lse = part_blocks ? at::empty({part_blocks * 4}, copts) : at::Tensor();
  at::Tensor part_sum = part_blocks ? at::empty({part_blocks * kSums}, copts) : at::Tensor();

  L1Args<T> args{};
  args.ld_b = n;
  args.ld_w = n;
  args.sqx = ptr_or_null<T>(sqx);
  args.sqz = ptr_or_null<T>(sqz);
  args.n = n;
  args.inv_tau = T(rbf ? 0.0 : 1.0 / o.temperature);
  args.gamma = T(o.gamma);
  args.eps = T(o.eps);
  args.w_scale = T(w_scale);
  args.row_loss = row_loss.data_ptr<T>();
  args.ksx = ptr_or_null<T>(ksx);
  args.ksz = ptr_or_null<T>(ksz);
  args.part_lse = ptr_or_null<T>(part_lse);
  args.part_sum = ptr_or_null<T>(part_sum);

  for (int64_t r0 = row_begin; r0 < row_end; r0 += rows) {
    const int64_t b = std::min(rows, row_end - r0);
    at::Tensor sx = bx.narrow(0, 0, b), sz = bz.narrow(0, 0, b);
    gram_panel(sx, x.narrow(0, r0, b), x);
    gram_panel(sz, z.narrow(0, r0, b), z);
    args.bx = sx.data_ptr<T>();
    args.bz = sz.data_ptr<T>();
    args.wx = wx.defined() ? wx.data_ptr() : nullptr;
    args.wz = wz.defined() ? wz.data_ptr() : nullptr;
    args.row0 = r0;
    const ColumnBlocks c = column_blocks(n, b, sms);
    if (c.ncb > 0) {
      args.ncb = c.ncb;
      args.cw = c.cw;
      launch_rows_2d<T, WT>(args, b, need_gx, need_gz, js, rbf, stream);
    } else {
      launch_rows<T, WT, false>(args, b, need_gx, need_gz, js, rbf, stream);
    }
    // dÛ_I += α W_I Û and dÛ += α W_Iᵀ Û_I, each one GEMM accumulating in place (beta = 1, the scale as alpha).
    const auto grad_gemms = [&](const at::Tensor& w_all, const at::Tensor& u, const at::Tensor& grad,
                                const at::Tensor& col) {
      const at::Tensor w = w_all.narrow(0, 0, b);
      gemm_accumulate(grad.narrow(0, r0, b), w, u, alpha);
      gemm_accumulate(grad, w.t(), u.narrow(0, r0, b), alpha);
      if (rbf) col.add_(w.sum(at::IntArrayRef{0}, false, c10::CppTypeToScalarType<T>::value));
    };
    if (need_gz) grad_gemms(wz, z, gz, colz);
    if (need_gx) grad_gemms(wx, x, gx, colx);
  }
  if (rbf && need_gz) gz.addcmul_(ksz.add(colz).unsqueeze(1), z, -alpha);  // −α(K'·1 + K'ᵀ·1)∘Ẑ
  if (rbf && need_gx) gx.addcmul_(ksx.add(colx).unsqueeze(1), x, -alpha);
}

// Picks the operand type: half inputs keep their dtype (T = float); fp32 and fp64 inputs are their own operands.
template <typename T>
void level1_panels(const at::Tensor& x, const at::Tensor& z, const Options& o, bool need_gx, bool need_gz,
                   at::Tensor& gx, at::Tensor& gz, int64_t row_begin, int64_t row_end, at::Tensor& row_loss) {
  if constexpr (std::is_same_v<T, float>) {
    if (x.scalar_type() == at::kHalf) {
      return level1_panels_impl<float, at::Half>(x, z, o, need_gx, need_gz, gx, gz, row_begin, row_end, row_loss);
    }
    if (x.scalar_type() == at::kBFloat16) {
      return level1_panels_impl<float, at::BFloat16>(x, z, o, need_gx, need_gz, gx, gz, row_begin, row_end, row_loss);
    }
  }
  level1_panels_impl<T, T>(x, z, o, need_gx, need_gz, gx, gz, row_begin, row_end, row_loss);
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
    const double have = available_device_bytes(x.device());
    avail = 0.9 * have;
    what = "90% of the " + gib(have) + " GiB free on " + x.device().str();
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
    const int64_t rows = panel_rows_from_memory(u, n * int64_t(sizeof(T)), n);
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
  // The scale as the GEMMs' alpha: beta = 0 ignores the uninitialized buffer, then beta = 1 accumulates.
  at::Tensor grad = at::empty(u.sizes(), u.options());
  grad.addmm_(w1, u, 0.0, alpha);
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

  L1Args<T> args{};
  args.bx = p.data_ptr<T>();
  args.bz = q.data_ptr<T>();
  args.ld_b = n;
  args.wx = w1x.defined() ? w1x.data_ptr() : nullptr;
  args.wz = w1z.defined() ? w1z.data_ptr() : nullptr;
  args.ld_w = n;
  args.sqx = ptr_or_null<T>(sqx);
  args.sqz = ptr_or_null<T>(sqz);
  args.row0 = 0;
  args.n = n;
  args.inv_tau = T(rbf ? 0.0 : 1.0 / o.temperature);
  args.gamma = T(o.gamma);
  args.eps = T(o.eps);
  args.w_scale = T(1.0 / double(n));
  args.row_loss = row_loss.data_ptr<T>();
  launch_rows<T, T, true>(args, n, need_gx, need_gz, js, rbf, stream);

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

// The level-1 GEMM operands: fp32, fp64, bf16 and fp16 inputs as they are (contiguous); other float dtypes
// (e.g. fp8) upcast to fp32 once.
at::Tensor level1_operand(const at::Tensor& t) {
  const auto s = t.scalar_type();
  const bool native = s == at::kFloat || s == at::kDouble || is_half(s);
  return native ? t.contiguous() : t.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> structure_fwd_cuda(
    const at::Tensor& xh_in, const at::Tensor& zh_in, int64_t levels, double temperature, int64_t weighting,
    double margin, int64_t similarity, double gamma, int64_t divergence, double eps, bool grad_x, bool grad_z) {
  const Options o{levels, temperature, weighting, margin, similarity, gamma, divergence, eps};
  check_common(xh_in, zh_in, "structure_fwd", o);
  const c10::cuda::CUDAGuard guard(xh_in.device());

  const auto in_dtype = xh_in.scalar_type();
  const auto cdt = compute_dtype(in_dtype);
  // level 1: half operands stay half (tensor cores); levels > 1: fp32/fp64 throughout (see the file header)
  const at::Tensor xh = levels == 1 ? level1_operand(xh_in) : xh_in.to(cdt).contiguous();
  const at::Tensor zh = levels == 1 ? level1_operand(zh_in) : zh_in.to(cdt).contiguous();
  const int64_t n = xh.size(0);
  const auto copts = xh.options().dtype(cdt);
  at::Tensor gx = grad_x ? at::zeros(xh.sizes(), copts) : at::Tensor();
  at::Tensor gz = grad_z ? at::zeros(zh.sizes(), copts) : at::Tensor();
  at::Tensor loss;

  AT_DISPATCH_FLOATING_TYPES(cdt, "structure_fwd_cuda", [&] {
    if (levels == 1) {
      at::Tensor row_loss = at::empty({n}, copts);
      level1_panels<scalar_t>(xh, zh, o, grad_x, grad_z, gx, gz, 0, n, row_loss);
      loss = at::empty({}, copts);
      at::Tensor gate = at::empty({}, copts.dtype(at::kBool));
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
  const at::Tensor xh = level1_operand(xh_in), zh = level1_operand(zh_in);
  const int64_t n = xh.size(0);
  const auto copts = xh.options().dtype(cdt);
  at::Tensor gx = grad_x ? at::zeros(xh.sizes(), copts) : at::Tensor();
  at::Tensor gz = grad_z ? at::zeros(zh.sizes(), copts) : at::Tensor();
  at::Tensor partial = at::empty({}, copts);
  AT_DISPATCH_FLOATING_TYPES(cdt, "structure_rows_fwd_cuda", [&] {
    at::Tensor row_loss = at::empty({n}, copts);
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
