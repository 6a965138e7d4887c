// Symmetric InfoNCE (CLIP) loss on CUDA, both directions in one op, O(B·N) extra memory (docs/kernels.md §4).
//
//   L = s · A Bᵀ (rows already normalized by the caller; s = logit_scale itself, a device scalar)
//   r_i = lse_j L_ij,  c_j = lse_i L_ij
//   loss = (1/2N) [Σ_i (r_i − L_ii) + Σ_j (c_j − L_jj)]
//   dL_ij = (g/2N) (e^{L_ij − r_i} + e^{L_ij − c_j} − 2δ_ij)
//   dA = s · dL B,  dB = s · dLᵀ A,  ds = Σ_ij dL_ij (A Bᵀ)_ij      (d/ds of the op; no exp chain rule)
//
// Pass structure, for row panels I of B rows (B from free device memory, capped by
//   STRUCTURE_OPS_CUDA_PANEL_MB, default 2048 MiB: panel_rows_from_memory, csrc/cuda/common.cuh):
//   forward   P_I = A_I Bᵀ (at::mm: cuBLAS, tensor cores, honours the fp32 matmul precision)    2 N² d
//             clip_fwd_tile_kernel: one read of the panel gives, per 64 × 256 tile, the row partial
//             (max, Σexp) of every row and the column partial of every column (2 exps per element)
//             clip_fwd_merge_kernel: r_i of the panel's rows (merge over column tiles, in order), L_ii,
//             and the running column state (M_j, S_j) ← merge(state, this panel's row tiles, in order)
//             clip_fwd_finalize_kernel (one block): c_j, and the loss summed in fp64 in a fixed order
//   backward  P_I recomputed (2 N² d); clip_bwd_rows_kernel writes W_I = s·(g/2N)·E_I in place
//             (E = e^{L−r} + e^{L−c} − 2δ) and the row sums Σ_j E_ij P_ij of ds;
//             dA_I = W_I B (at::mm, 2 N² d over all panels), dB += W_Iᵀ A_I (at::addmm, 2 N² d)
//   total     8 N² d GEMM FLOPs (2 forward + 6 backward), every GEMM in cuBLAS.
// Deterministic: no atomics; every reduction runs in a fixed order that depends only on (N, B), so two
// runs give bitwise-equal results (cuBLAS itself is deterministic for a fixed problem on one device).
// No host synchronization: s and the upstream gradient are read by the kernels from device memory.
//
// Dtypes: fp32 (statistics fp32), fp64 (everything fp64, DGEMM/DMMA), bf16/fp16: the GEMMs take the half
// inputs with fp32 output (at::mm out_dtype: tensor cores, fp32 accumulation; the products are exact in
// fp32, so the logits equal the CPU op's upcast-to-fp32 logits up to summation order); statistics and
// softmax math in fp32 like the CPU op. In the half backward the bracket E ∈ [−2, 2] is rounded to the
// input dtype for the two tensor-core GEMMs and the factor s·g/2N is applied to their fp32 results (a
// 1/N-sized dL would lose precision in fp16); dA, dB are accumulated in fp32 and rounded once at the end.
// Returns the CPU op's conventions: loss 0-dim in image's dtype; lse_row/lse_col (N,) fp32 (fp64 for fp64
// inputs); grad_image/grad_text contiguous in the inputs' dtypes; grad_logit_scale with logit_scale's
// shape, dtype and device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "common.cuh"

namespace structure_ops {
namespace {

using cuda::ceil_div;

constexpr int kThreads = 256;            // every kernel here: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kColsPerLane = 8;          // forward tile: a warp covers 32 × 8 = 256 columns
constexpr int kTileCols = 32 * kColsPerLane;
constexpr int kFinalThreads = 1024;      // one-block finalize kernels

// Rows per warp in the forward tile: the tile's values stay in registers (8 × 8 fp32 or 4 × 8 fp64 per
// thread) so that both the row and the column reductions read the panel once.
template <typename T>
struct FwdTile;
template <>
struct FwdTile<float> {
  static constexpr int kRowsPerWarp = 8;
};
template <>
struct FwdTile<double> {
  static constexpr int kRowsPerWarp = 4;
};

__device__ __forceinline__ float dexp(float x) { return expf(x); }  // full-precision expf/logf (no fast math)
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

// The shift of a log-sum-exp partial: its max, or 0 when that is ±inf (the CPU op's rule: +inf logits
// give lse = +inf, an all −inf row gives −inf, instead of inf − inf = NaN).
template <typename T>
__device__ __forceinline__ T shift_of(T m) {
  return isfinite(m) ? m : T(0);
}

// A partial (m, l) = (max, Σ e^{v − shift_of(m)}) re-expressed at the shift mu. An empty partial (l == 0:
// no values, or only −inf) contributes exactly 0 and e^{shift − mu} is not evaluated, since it could
// overflow against a zero weight (0 · inf = NaN). A NaN sum (a NaN logit) propagates, as on the CPU.
template <typename T>
__device__ __forceinline__ T rescaled(T m, T l, T mu) {
  return l == T(0) ? T(0) : l * dexp(shift_of(m) - mu);
}

// Round-to-nearest conversions for the half-input backward (CUDA intrinsics: torch builds with
// -D__CUDA_NO_*_CONVERSIONS__, and c10's device conversions need --expt-relaxed-constexpr).
template <typename H>
__device__ __forceinline__ H to_half(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 to_half<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half to_half<__half>(float x) {
  return __float2half_rn(x);
}

// ------------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------------
// Math: tile (rt, ct) of the panel, rows [rt·TR, +TR), columns [ct·256, +256), logits v = s · P:
//   row i:    m_i = max_j v_ij,  l_i = Σ_j e^{v_ij − shift(m_i)}  → row_m/row_l[ct][i]
//   column j: m_j = max_i v_ij,  l_j = Σ_i e^{v_ij − shift(m_j)}  → col_m/col_l[rt][j]
// Thread (lane, warp) holds rows warp·RP + p and columns lane + 32q (q < 8) in registers: the row
// reductions are warp shuffles, the column ones run over the thread's RP rows and then over the 8 warps
// through shared memory, in a fixed order. Padding entries are −inf (they add e^{−inf} = 0).
template <typename T, int RP>
__global__ void __launch_bounds__(kThreads) clip_fwd_tile_kernel(const T* __restrict__ panel, int rows, int n,
                                                                 const T* __restrict__ s_ptr, T* __restrict__ row_m,
                                                                 T* __restrict__ row_l, T* __restrict__ col_m,
                                                                 T* __restrict__ col_l) {
  __shared__ T sm_m[kWarps][kTileCols];
  __shared__ T sm_l[kWarps][kTileCols];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ct = blockIdx.x, rt = blockIdx.y;
  const int col0 = ct * kTileCols;
  const int row0 = rt * (kWarps * RP) + warp * RP;
  const T s = *s_ptr;
  const T ninf = -INFINITY;

  T v[RP][kColsPerLane];
#pragma unroll
  for (int p = 0; p < RP; ++p) {
    const int r = row0 + p;
    const T* rp = panel + int64_t(r) * n;
#pragma unroll
    for (int q = 0; q < kColsPerLane; ++q) {
      const int c = col0 + lane + 32 * q;
      v[p][q] = (r < rows && c < n) ? s * rp[c] : ninf;
    }
  }

  // Row partials (max skips NaN: the comparison is false; a NaN still poisons the sum, as on the CPU).
#pragma unroll
  for (int p = 0; p < RP; ++p) {
    T m = ninf;
#pragma unroll
    for (int q = 0; q < kColsPerLane; ++q) m = v[p][q] > m ? v[p][q] : m;
    m = cuda::warp_all_reduce<cuda::MaxOp>(m);
    const T mu = shift_of(m);
    T l = 0;
#pragma unroll
    for (int q = 0; q < kColsPerLane; ++q) l += dexp(v[p][q] - mu);
    l = cuda::warp_all_reduce<cuda::SumOp>(l);
    if (lane == 0 && row0 + p < rows) {
      row_m[int64_t(ct) * rows + row0 + p] = m;
      row_l[int64_t(ct) * rows + row0 + p] = l;
    }
  }

  // Column partials over this thread's rows, then over the warps.
#pragma unroll
  for (int q = 0; q < kColsPerLane; ++q) {
    T m = ninf;
#pragma unroll
    for (int p = 0; p < RP; ++p) m = v[p][q] > m ? v[p][q] : m;
    const T mu = shift_of(m);
    T l = 0;
#pragma unroll
    for (int p = 0; p < RP; ++p) l += dexp(v[p][q] - mu);
    sm_m[warp][lane + 32 * q] = m;
    sm_l[warp][lane + 32 * q] = l;
  }
  __syncthreads();
  const int t = threadIdx.x;  // kThreads == kTileCols: thread t merges column col0 + t
  T m = ninf;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m = sm_m[w][t] > m ? sm_m[w][t] : m;
  const T mu = shift_of(m);
  T l = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) l += rescaled(sm_m[w][t], sm_l[w][t], mu);
  if (col0 + t < n) {
    col_m[int64_t(rt) * n + col0 + t] = m;
    col_l[int64_t(rt) * n + col0 + t] = l;
  }
}

// Math: for the panel's rows i (global r0 + i) and every column j:
//   r_i = shift + log Σ_ct l_ct e^{shift(m_ct) − shift},  shift = shift(max_ct m_ct)     (two passes)
//   L_ii = s · P[i][r0 + i]
//   column state (M_j, S_j) ← merge of the state and this panel's row-tile partials, in tile order
// Why a running state: O(N) memory for the columns at any number of panels, merged deterministically.
template <typename T>
__global__ void __launch_bounds__(kThreads) clip_fwd_merge_kernel(
    const T* __restrict__ row_m, const T* __restrict__ row_l, int nct, int rows, int r0,
    const T* __restrict__ panel, const T* __restrict__ s_ptr, T* __restrict__ lse_row, T* __restrict__ diag,
    const T* __restrict__ col_pm, const T* __restrict__ col_pl, int nrt, int n, T* __restrict__ run_m,
    T* __restrict__ run_l) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < rows) {
    T m = -INFINITY;
    for (int c = 0; c < nct; ++c) {
      const T x = row_m[int64_t(c) * rows + t];
      m = x > m ? x : m;
    }
    const T mu = shift_of(m);
    T l = 0;
    for (int c = 0; c < nct; ++c) l += rescaled(row_m[int64_t(c) * rows + t], row_l[int64_t(c) * rows + t], mu);
    lse_row[r0 + t] = mu + dlog(l);
    diag[r0 + t] = *s_ptr * panel[int64_t(t) * n + r0 + t];
  }
  if (t < n) {
    const T m0 = run_m[t], l0 = run_l[t];
    T m = m0;
    for (int r = 0; r < nrt; ++r) {
      const T x = col_pm[int64_t(r) * n + t];
      m = x > m ? x : m;
    }
    const T mu = shift_of(m);
    T l = rescaled(m0, l0, mu);
    for (int r = 0; r < nrt; ++r) l += rescaled(col_pm[int64_t(r) * n + t], col_pl[int64_t(r) * n + t], mu);
    run_m[t] = m;
    run_l[t] = l;
  }
}

// Math: c_j = shift(M_j) + log S_j;  loss = (1/2N) Σ_j [(r_j − L_jj) + (c_j − L_jj)], summed in fp64
// (the CPU op accumulates in double) by one block in a fixed order: deterministic.
template <typename T>
__global__ void __launch_bounds__(kFinalThreads) clip_fwd_finalize_kernel(
    const T* __restrict__ run_m, const T* __restrict__ run_l, const T* __restrict__ lse_row,
    const T* __restrict__ diag, int n, T* __restrict__ lse_col, double* __restrict__ loss) {
  double acc = 0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const T c = shift_of(run_m[j]) + dlog(run_l[j]);
    lse_col[j] = c;
    const double d = double(diag[j]);
    acc += (double(lse_row[j]) - d) + (double(c) - d);
  }
  const double total = cuda::block_sum(acc);
  if (threadIdx.x == 0) *loss = total / (2.0 * double(n));
}

// Math: for the panel row i (global gi = r0 + i), P_ij = (A Bᵀ)_ij, L = s·P:
//   E_ij = e^{L_ij − r_gi} + e^{L_ij − c_j} − 2δ_{gi j}
//   kScaled (fp32/fp64): P_ij ← s·(g/2N)·E_ij = s·dL_ij in place, so that dA_I = P B and dB += Pᵀ A_I
//   otherwise (bf16/fp16): e_out_ij = E_ij rounded to the input dtype (E ∈ [−2, 2] keeps its precision;
//   the factor is applied to the GEMMs' fp32 results)
//   ds_row[gi] = Σ_j E_ij P_ij (fp32 per thread, fp64 across the block, fixed order); ds = (g/2N) Σ ds_row
// (min 4 blocks/SM: without it ptxas spills 8 bytes in the fp64 instance on sm_90a; 64 registers suffice)
template <typename T, typename EOut, bool kScaled>
__global__ void __launch_bounds__(kThreads, 4) clip_bwd_rows_kernel(T* __restrict__ panel, EOut* __restrict__ e_out,
                                                                 int n, int r0, const T* __restrict__ s_ptr,
                                                                 const T* __restrict__ g_ptr,
                                                                 const T* __restrict__ lse_row,
                                                                 const T* __restrict__ lse_col,
                                                                 double* __restrict__ ds_row) {
  const int i = blockIdx.x, gi = r0 + i;
  T* row = panel + int64_t(i) * n;
  const T s = *s_ptr;
  const T f = s * (*g_ptr / (T(2) * T(n)));
  const T ri = lse_row[gi];
  T acc = 0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const T dot = row[j];
    const T l = s * dot;
    T e = dexp(l - ri) + dexp(l - lse_col[j]);
    if (j == gi) e -= T(2);  // the −2δ_ij of the two cross-entropies
    acc += e * dot;
    if constexpr (kScaled) {
      row[j] = f * e;
    } else {
      e_out[int64_t(i) * n + j] = to_half<EOut>(float(e));
    }
  }
  const double total = cuda::block_sum(double(acc));
  if (threadIdx.x == 0) ds_row[gi] = total;
}

// ds = (g/2N) Σ_i ds_row[i], one block, fixed order.
template <typename T>
__global__ void __launch_bounds__(kFinalThreads) clip_bwd_finalize_kernel(const double* __restrict__ ds_row, int n,
                                                                          const T* __restrict__ g_ptr,
                                                                          double* __restrict__ ds) {
  double acc = 0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) acc += ds_row[j];
  const double total = cuda::block_sum(acc);
  if (threadIdx.x == 0) *ds = total * (double(*g_ptr) / (2.0 * double(n)));
}

// Half-input backward: dst = f·src (accumulate = false) or dst += f·src, f = s·g/2N, elementwise fp32.
// dst and src may be the same buffer (in-place scaling): no __restrict__ on them.
__global__ void __launch_bounds__(kThreads) scale_accumulate_kernel(float* dst, const float* src, int64_t count,
                                                                    const float* __restrict__ s_ptr,
                                                                    const float* __restrict__ g_ptr, int n,
                                                                    bool accumulate) {
  const float f = *s_ptr * (*g_ptr / (2.0f * float(n)));
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < count; k += int64_t(gridDim.x) * blockDim.x) {
    const float v = f * src[k];
    dst[k] = accumulate ? dst[k] + v : v;
  }
}

// ------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------
// Rows per panel: the shared rule of csrc/cuda/common.cuh (as structure level 1): at most half of the free
// device memory (plus the caching allocator's unused reserve), capped by STRUCTURE_OPS_CUDA_PANEL_MB (default
// 2048 MiB; when set, exactly its budget if memory allows, down to 1 row), ≥ 256 rows when that fits, multiples of 16.
using cuda::panel_rows_from_memory;

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

void check_clip(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const char* op) {
  check_pair(a, "image", b, "text");
  TORCH_CHECK(a.size(1) == b.size(1), "image and text must have the same embedding width, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.is_cuda(), op, " (cuda): image must be a CUDA tensor, got ", a.device());
  TORCH_CHECK(scale.numel() == 1, "logit_scale must hold exactly one value, got shape ", scale.sizes());
  TORCH_CHECK(scale.is_floating_point(), "logit_scale must be a floating-point tensor, got ", scale.scalar_type());
  const auto t = a.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(t == at::kFloat || t == at::kDouble || is_half(t), op,
                              " (cuda): dtype ", t, " is not supported (float32, float64, bfloat16, float16)");
  TORCH_CHECK(a.size(0) <= INT32_MAX, op, " (cuda): N = ", a.size(0), " rows exceeds the kernels' int32 range");
}

// P = A_I Bᵀ in the statistics dtype: half inputs go through tensor cores with fp32 output.
void panel_gemm(at::Tensor& out, const at::Tensor& a_rows, const at::Tensor& b_t) {
  if (is_half(a_rows.scalar_type())) {
    at::mm_out(out, a_rows, b_t, at::kFloat);
  } else {
    at::mm_out(out, a_rows, b_t);
  }
}

at::Tensor device_scalar(const at::Tensor& t, const at::Device& dev, at::ScalarType dt) {
  return t.detach().reshape({1}).to(dev, dt).contiguous();
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_fwd_impl(const at::Tensor& image, const at::Tensor& text,
                                                             const at::Tensor& logit_scale) {
  constexpr int RP = FwdTile<T>::kRowsPerWarp;
  constexpr int TR = kWarps * RP;
  const at::Tensor a = image.contiguous(), b = text.contiguous();
  const int64_t n = a.size(0);
  const auto dev = a.device();
  const auto cdt = c10::CppTypeToScalarType<T>::value;
  const auto opts = a.options().dtype(cdt);
  cudaStream_t stream = cuda::current_stream(a);

  const at::Tensor s = device_scalar(logit_scale, dev, cdt);
  at::Tensor lse_r = at::empty({n}, opts), lse_c = at::empty({n}, opts), diag = at::empty({n}, opts);
  at::Tensor run_m = at::empty({n}, opts), run_l = at::zeros({n}, opts);
  run_m.fill_(-std::numeric_limits<double>::infinity());

  const int64_t nct = ceil_div<int64_t>(n, kTileCols);
  // per panel row: the logits, the column partials (2 values per column per TR rows), the row partials
  const int64_t bytes_per_row = int64_t(sizeof(T)) * (n + ceil_div<int64_t>(2 * n, TR) + 2 * nct);
  const int64_t rows = panel_rows_from_memory(a, bytes_per_row, n);
  const int64_t nrt_max = ceil_div<int64_t>(rows, TR);
  at::Tensor buf = at::empty({rows, n}, opts);
  at::Tensor row_m = at::empty({nct * rows}, opts), row_l = at::empty({nct * rows}, opts);
  at::Tensor col_m = at::empty({nrt_max * n}, opts), col_l = at::empty({nrt_max * n}, opts);
  const at::Tensor bt = b.t();

  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t bsz = std::min(rows, n - r0);
    at::Tensor panel = buf.narrow(0, 0, bsz);
    panel_gemm(panel, a.narrow(0, r0, bsz), bt);
    const int64_t nrt = ceil_div<int64_t>(bsz, TR);
    TORCH_CHECK(nrt <= 65535, "clip_fwd (cuda): panel of ", bsz, " rows exceeds the grid limit");
    clip_fwd_tile_kernel<T, RP><<<dim3(unsigned(nct), unsigned(nrt)), kThreads, 0, stream>>>(
        panel.const_data_ptr<T>(), int(bsz), int(n), s.const_data_ptr<T>(), row_m.mutable_data_ptr<T>(),
        row_l.mutable_data_ptr<T>(), col_m.mutable_data_ptr<T>(), col_l.mutable_data_ptr<T>());
    SO_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t span = std::max(n, bsz);
    clip_fwd_merge_kernel<T><<<unsigned(ceil_div<int64_t>(span, kThreads)), kThreads, 0, stream>>>(
        row_m.const_data_ptr<T>(), row_l.const_data_ptr<T>(), int(nct), int(bsz), int(r0), panel.const_data_ptr<T>(),
        s.const_data_ptr<T>(), lse_r.mutable_data_ptr<T>(), diag.mutable_data_ptr<T>(), col_m.const_data_ptr<T>(),
        col_l.const_data_ptr<T>(), int(nrt), int(n), run_m.mutable_data_ptr<T>(), run_l.mutable_data_ptr<T>());
    SO_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor loss64 = at::empty({}, a.options().dtype(at::kDouble));
  clip_fwd_finalize_kernel<T><<<1, kFinalThreads, 0, stream>>>(
      run_m.const_data_ptr<T>(), run_l.const_data_ptr<T>(), lse_r.const_data_ptr<T>(), diag.const_data_ptr<T>(),
      int(n), lse_c.mutable_data_ptr<T>(), loss64.mutable_data_ptr<double>());
  SO_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss64.to(image.scalar_type()), lse_r, lse_c};
}

// Half = void: fp32/fp64, W = s·dL written in place; otherwise E is written to e_half in the half dtype.
template <typename T, typename Half>
void launch_bwd_rows(at::Tensor& panel, at::Tensor* e_half, int64_t n, int64_t r0, const at::Tensor& s,
                     const at::Tensor& g, const at::Tensor& r, const at::Tensor& c, at::Tensor& ds_row,
                     cudaStream_t stream) {
  const unsigned blocks = unsigned(panel.size(0));
  if constexpr (std::is_same_v<Half, void>) {
    clip_bwd_rows_kernel<T, T, true><<<blocks, kThreads, 0, stream>>>(
        panel.mutable_data_ptr<T>(), nullptr, int(n), int(r0), s.const_data_ptr<T>(), g.const_data_ptr<T>(),
        r.const_data_ptr<T>(), c.const_data_ptr<T>(), ds_row.mutable_data_ptr<double>());
  } else {
    clip_bwd_rows_kernel<T, Half, false><<<blocks, kThreads, 0, stream>>>(
        panel.mutable_data_ptr<T>(), static_cast<Half*>(e_half->mutable_data_ptr()), int(n), int(r0),
        s.const_data_ptr<T>(), g.const_data_ptr<T>(), r.const_data_ptr<T>(), c.const_data_ptr<T>(),
        ds_row.mutable_data_ptr<double>());
  }
  SO_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_scale(at::Tensor& dst, const at::Tensor& src, const at::Tensor& s, const at::Tensor& g, int64_t n,
                  bool accumulate, cudaStream_t stream) {
  const int64_t count = dst.numel();
  const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(count, kThreads), 8192);
  scale_accumulate_kernel<<<unsigned(std::max<int64_t>(blocks, 1)), kThreads, 0, stream>>>(
      dst.mutable_data_ptr<float>(), src.const_data_ptr<float>(), count, s.const_data_ptr<float>(),
      g.const_data_ptr<float>(), int(n), accumulate);
  SO_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_bwd_impl(const at::Tensor& grad, const at::Tensor& image,
                                                             const at::Tensor& text, const at::Tensor& logit_scale,
                                                             const at::Tensor& lse_row, const at::Tensor& lse_col) {
  const at::Tensor a = image.contiguous(), b = text.contiguous();
  const int64_t n = a.size(0), d = a.size(1);
  const auto dev = a.device();
  const auto in_t = a.scalar_type();
  const bool half = is_half(in_t);
  const auto cdt = c10::CppTypeToScalarType<T>::value;
  const auto opts = a.options().dtype(cdt);
  cudaStream_t stream = cuda::current_stream(a);

  const at::Tensor s = device_scalar(logit_scale, dev, cdt), g = device_scalar(grad, dev, cdt);
  const at::Tensor r = lse_row.detach().reshape({n}).to(dev, cdt).contiguous();
  const at::Tensor c = lse_col.detach().reshape({n}).to(dev, cdt).contiguous();

  const int64_t bytes_per_row = int64_t(sizeof(T)) * n + (half ? int64_t(a.element_size()) * n : 0);
  const int64_t rows = panel_rows_from_memory(a, bytes_per_row, n);
  at::Tensor buf = at::empty({rows, n}, opts);
  at::Tensor ebuf = half ? at::empty({rows, n}, a.options()) : at::Tensor();
  at::Tensor ds_row = at::empty({n}, a.options().dtype(at::kDouble));
  // fp32/fp64: the GEMMs write the gradients directly; half: fp32 accumulators, rounded once at the end.
  const auto acc_opts = half ? a.options().dtype(at::kFloat) : a.options();
  at::Tensor da = at::empty({n, d}, acc_opts), db = at::zeros({n, d}, acc_opts);
  at::Tensor tmp_b = half ? at::empty({n, d}, acc_opts) : at::Tensor();

  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t bsz = std::min(rows, n - r0);
    at::Tensor panel = buf.narrow(0, 0, bsz);
    const at::Tensor a_rows = a.narrow(0, r0, bsz);
    panel_gemm(panel, a_rows, b.t());
    at::Tensor da_rows = da.narrow(0, r0, bsz);
    if (!half) {
      launch_bwd_rows<T, void>(panel, nullptr, n, r0, s, g, r, c, ds_row, stream);
      at::mm_out(da_rows, panel, b);           // dA_I = s·dL_I B   (rows written once)
      db.addmm_(panel.t(), a_rows);            // dB += s·dL_Iᵀ A_I (fixed panel order)
    } else {
      at::Tensor e = ebuf.narrow(0, 0, bsz);
      if (in_t == at::kBFloat16) {
        launch_bwd_rows<float, __nv_bfloat16>(panel, &e, n, r0, s, g, r, c, ds_row, stream);
      } else {
        launch_bwd_rows<float, __half>(panel, &e, n, r0, s, g, r, c, ds_row, stream);
      }
      at::mm_out(da_rows, e, b, at::kFloat);   // E_I B, then × s·g/2N
      launch_scale(da_rows, da_rows, s, g, n, false, stream);
      at::mm_out(tmp_b, e.t(), a_rows, at::kFloat);  // E_Iᵀ A_I, then dB += s·g/2N × it
      launch_scale(db, tmp_b, s, g, n, true, stream);
    }
  }
  at::Tensor ds64 = at::empty({}, a.options().dtype(at::kDouble));
  clip_bwd_finalize_kernel<T><<<1, kFinalThreads, 0, stream>>>(ds_row.const_data_ptr<double>(), int(n),
                                                               g.const_data_ptr<T>(), ds64.mutable_data_ptr<double>());
  SO_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor dscale = ds64.reshape(logit_scale.sizes()).to(logit_scale.options());
  if (half) return {da.to(in_t), db.to(text.scalar_type()), dscale};
  return {da, db, dscale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_fwd_cuda(const at::Tensor& image, const at::Tensor& text,
                                                             const at::Tensor& logit_scale) {
  check_clip(image, text, logit_scale, "clip_fwd");
  c10::cuda::CUDAGuard guard(image.device());
  if (image.scalar_type() == at::kDouble) return clip_fwd_impl<double>(image, text, logit_scale);
  return clip_fwd_impl<float>(image, text, logit_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_bwd_cuda(const at::Tensor& grad, const at::Tensor& image,
                                                             const at::Tensor& text, const at::Tensor& logit_scale,
                                                             const at::Tensor& lse_row, const at::Tensor& lse_col) {
  check_clip(image, text, logit_scale, "clip_bwd");
  const int64_t n = image.size(0);
  TORCH_CHECK(grad.numel() == 1, "clip_bwd (cuda): grad must hold exactly one value, got shape ", grad.sizes());
  TORCH_CHECK(lse_row.numel() == n, "clip_bwd (cuda): lse_row must hold N = ", n, " values, got shape ",
              lse_row.sizes());
  TORCH_CHECK(lse_col.numel() == n, "clip_bwd (cuda): lse_col must hold N = ", n, " values, got shape ",
              lse_col.sizes());
  c10::cuda::CUDAGuard guard(image.device());
  if (image.scalar_type() == at::kDouble) {
    return clip_bwd_impl<double>(grad, image, text, logit_scale, lse_row, lse_col);
  }
  return clip_bwd_impl<float>(grad, image, text, logit_scale, lse_row, lse_col);
}

}  // namespace

TORCH_LIBRARY_IMPL(structure_ops, CUDA, m) {
  m.impl("clip_fwd", &clip_fwd_cuda);
  m.impl("clip_bwd", &clip_bwd_cuda);
}

}  // namespace structure_ops
