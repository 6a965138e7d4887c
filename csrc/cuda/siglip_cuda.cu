// Pairwise sigmoid (SigLIP) loss on CUDA: value and gradient in one streamed pass, O(B·N) extra memory.
//
//   z = s · A Bᵀ + β  (rows already normalized by the caller; s, β device scalars), y_ij = +1 if j = o + i else −1
//   loss = (1/N) Σ_ij softplus(−y_ij z_ij)                  (op contract: csrc/common/siglip.h)
//   w_ij = ∂loss/∂z_ij = −y_ij σ(−y_ij z_ij) / N
//   dA = s · w B,  dB = s · wᵀ A,  ds = Σ_ij w_ij (A Bᵀ)_ij,  dβ = Σ_ij w_ij
//
// Pass structure, for row panels I of B rows of A (B from free device memory, capped by STRUCTURE_OPS_CUDA_PANEL_MB,
// default 2048 MiB: panel_rows_from_memory, csrc/cuda/common.cuh):
//   P_I = A_I Bᵀ (at::mm: cuBLAS, tensor cores, honours the fp32 matmul precision)                  2 M N d
//   siglip_rows_kernel (one block per panel row): term, w and the row sums of the loss, Σ w P, Σ w
//     (per-thread partials, then a fixed-order block reduction in fp64); with a gradient it writes s·w over
//     P in place (fp32/fp64) or N·w = ±σ ∈ [−1, 1] in the input dtype (bf16/fp16)
//   dA_I = (s·w_I) B (at::mm), dB += (s·w_I)ᵀ A_I (at::addmm)                                       4 M N d
//   siglip_finalize_kernel (one block): the three sums over all rows, in a fixed order, / N.
// 6 N² d GEMM FLOPs with gradients (M = N), 2 N² d without. Deterministic: no atomics, every reduction in
// an order that depends only on (M, N, B). No host synchronization: s, β are read by the kernels.
//
// Stability: e = exp(−|z|) ∈ (0, 1], softplus(u) = max(u, 0) + log1p(e) for u = ±z, σ(u) = (u ≥ 0 ? 1 : e)/(1 + e):
// one exponential per pair, no overflow for any finite z; NaN propagates.
// Dtypes: fp32 (statistics fp32), fp64, bf16/fp16 (fp32 GEMM output, fp32 statistics; the gradient GEMMs take
// N·w rounded to the input dtype and the factor s/N is applied to their fp32 results, as in clip_cuda.cu).
// Returns the CPU op's conventions (csrc/cpu/siglip_cpu.cpp).
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
#include <tuple>
#include <type_traits>

#include "../common/siglip.h"
#include "common.cuh"

namespace structure_ops {
namespace {

using cuda::ceil_div;

constexpr int kThreads = 256;        // row kernel: 8 warps
constexpr int kFinalThreads = 1024;  // one-block finalize kernel

__device__ __forceinline__ float sexp(float x) { return expf(x); }  // full-precision (no fast math)
__device__ __forceinline__ double sexp(double x) { return exp(x); }
__device__ __forceinline__ float slog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double slog1p(double x) { return log1p(x); }

template <typename H>
__device__ __forceinline__ H to_half_rn(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 to_half_rn<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half to_half_rn<__half>(float x) {
  return __float2half_rn(x);
}

// ------------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------------
// Math: panel row i (global image row gi = r0 + i, positive column pos = o + gi), P_ij = (A Bᵀ)_ij:
//   z = s·P + β, u = −z (j = pos) or z, e = exp(−|z|), term = max(u, 0) + log1p(e), N·w = ±(u ≥ 0 ? 1 : e)/(1 + e)
//   sums[gi], sums[M + gi], sums[2M + gi] = Σ_j term, Σ_j N·w·P, Σ_j N·w   (fixed-order block reductions)
//   kGrad && kScaled (fp32/fp64): P ← (s/N)·N·w in place, so that dA_I = P B and dB += Pᵀ A_I
//   kGrad && !kScaled (bf16/fp16): e_out ← N·w in the input dtype (the factor s/N is applied after the GEMMs)
template <typename T, typename EOut, bool kGrad, bool kScaled>
__global__ void __launch_bounds__(kThreads) siglip_rows_kernel(T* __restrict__ panel, EOut* __restrict__ e_out, int n,
                                                               int m, int r0, int offset, const T* __restrict__ s_ptr,
                                                               const T* __restrict__ beta_ptr,
                                                               double* __restrict__ sums) {
  const int i = blockIdx.x, gi = r0 + i, pos = offset + gi;
  T* row = panel + int64_t(i) * n;
  const T s = *s_ptr, beta = *beta_ptr;
  const T coef = s / T(n);
  T loss = 0, ds = 0, db = 0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const T p = row[j];
    const T z = s * p + beta;
    const bool positive = j == pos;
    const T u = positive ? -z : z;
    const T e = sexp(-fabs(z));
    const T sig = (u >= T(0) ? T(1) : e) / (T(1) + e);
    const T w = positive ? -sig : sig;
    loss += (u > T(0) ? u : T(0)) + slog1p(e);
    ds += w * p;
    db += w;
    if constexpr (kGrad) {
      if constexpr (kScaled) {
        row[j] = coef * w;
      } else {
        e_out[int64_t(i) * n + j] = to_half_rn<EOut>(float(w));
      }
    }
  }
  const double tl = cuda::block_sum(double(loss));
  const double ts = cuda::block_sum(double(ds));
  const double tb = cuda::block_sum(double(db));
  if (threadIdx.x == 0) {
    sums[gi] = tl;
    sums[int64_t(m) + gi] = ts;
    sums[2 * int64_t(m) + gi] = tb;
  }
}

// out[k] = (1/N) Σ_i sums[k·M + i], k = 0 (loss), 1 (ds), 2 (dβ): one block, fixed order.
__global__ void __launch_bounds__(kFinalThreads) siglip_finalize_kernel(const double* __restrict__ sums, int m, int n,
                                                                        double* __restrict__ out) {
  for (int k = 0; k < 3; ++k) {
    double acc = 0;
    for (int i = threadIdx.x; i < m; i += blockDim.x) acc += sums[int64_t(k) * m + i];
    const double total = cuda::block_sum(acc);
    if (threadIdx.x == 0) out[k] = total / double(n);
  }
}

// Half-input gradients: dst = f·src (accumulate = false) or dst += f·src, f = s/N, elementwise fp32.
// dst and src may be the same buffer (in-place scaling): no __restrict__ on them.
__global__ void __launch_bounds__(kThreads) siglip_scale_kernel(float* dst, const float* src, int64_t count,
                                                                const float* __restrict__ s_ptr, int n,
                                                                bool accumulate) {
  const float f = *s_ptr / float(n);
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < count; k += int64_t(gridDim.x) * blockDim.x) {
    const float v = f * src[k];
    dst[k] = accumulate ? dst[k] + v : v;
  }
}

// ------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------
bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

void check_cuda_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
                       int64_t offset) {
  check_siglip(a, b, scale, bias, offset, "siglip_fwd");
  TORCH_CHECK(a.is_cuda(), "siglip_fwd (cuda): image must be a CUDA tensor, got ", a.device());
  const auto t = a.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(t == at::kFloat || t == at::kDouble || is_half(t),
                              "siglip_fwd (cuda): dtype ", t, " is not supported (float32, float64, bfloat16, float16)");
  TORCH_CHECK(b.size(0) <= INT32_MAX, "siglip_fwd (cuda): N = ", b.size(0), " rows exceeds the kernels' int32 range");
}

at::Tensor device_scalar(const at::Tensor& t, const at::Device& dev, at::ScalarType dt) {
  return t.detach().reshape({1}).to(dev, dt).contiguous();
}

// P = A_I Bᵀ in the statistics dtype: half inputs go through tensor cores with fp32 output.
void panel_gemm(at::Tensor& out, const at::Tensor& a_rows, const at::Tensor& b_t) {
  if (is_half(a_rows.scalar_type())) {
    at::mm_out(out, a_rows, b_t, at::kFloat);
  } else {
    at::mm_out(out, a_rows, b_t);
  }
}

template <typename T, typename EOut, bool kGrad, bool kScaled>
void launch_rows(at::Tensor& panel, at::Tensor* e_half, int64_t n, int64_t m, int64_t r0, int64_t offset,
                 const at::Tensor& s, const at::Tensor& beta, at::Tensor& sums, cudaStream_t stream) {
  EOut* e_ptr = e_half ? static_cast<EOut*>(e_half->mutable_data_ptr()) : nullptr;
  siglip_rows_kernel<T, EOut, kGrad, kScaled><<<unsigned(panel.size(0)), kThreads, 0, stream>>>(
      panel.mutable_data_ptr<T>(), e_ptr, int(n), int(m), int(r0), int(offset), s.const_data_ptr<T>(),
      beta.const_data_ptr<T>(), sums.mutable_data_ptr<double>());
  SO_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_scale(at::Tensor& dst, const at::Tensor& src, const at::Tensor& s, int64_t n, bool accumulate,
                  cudaStream_t stream) {
  const int64_t count = dst.numel();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div<int64_t>(count, kThreads), 8192));
  siglip_scale_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(dst.mutable_data_ptr<float>(),
                                                                  src.const_data_ptr<float>(), count,
                                                                  s.const_data_ptr<float>(), int(n), accumulate);
  SO_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_impl(
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale, const at::Tensor& logit_bias,
    int64_t offset, bool grad_image, bool grad_text) {
  const at::Tensor a = image.contiguous(), b = text.contiguous();
  const int64_t m = a.size(0), n = b.size(0), d = a.size(1);
  const auto dev = a.device();
  const auto in_t = a.scalar_type();
  const bool half = is_half(in_t);
  const bool want = grad_image || grad_text;
  const auto cdt = c10::CppTypeToScalarType<T>::value;
  const auto opts = a.options().dtype(cdt);
  cudaStream_t stream = cuda::current_stream(a);

  const at::Tensor s = device_scalar(logit_scale, dev, cdt), beta = device_scalar(logit_bias, dev, cdt);
  // fp32/fp64: the GEMMs write the gradients directly; half: fp32 accumulators, rounded once at the end.
  const auto acc_opts = half ? a.options().dtype(at::kFloat) : a.options();
  at::Tensor da = grad_image ? at::empty({m, d}, acc_opts) : at::Tensor();
  at::Tensor db = grad_text ? at::zeros({n, d}, acc_opts) : at::Tensor();
  at::Tensor tmp_b = (half && grad_text) ? at::empty({n, d}, acc_opts) : at::Tensor();
  at::Tensor sums = at::empty({3 * std::max<int64_t>(m, 1)}, a.options().dtype(at::kDouble));
  at::Tensor out3 = at::zeros({3}, a.options().dtype(at::kDouble));

  if (m > 0) {
    const int64_t bytes_per_row = int64_t(sizeof(T)) * n + ((half && want) ? int64_t(a.element_size()) * n : 0);
    const int64_t rows = cuda::panel_rows_from_memory(a, bytes_per_row, m);  // the rule of every CUDA op
    at::Tensor buf = at::empty({rows, n}, opts);
    at::Tensor ebuf = (half && want) ? at::empty({rows, n}, a.options()) : at::Tensor();
    const at::Tensor bt = b.t();
    for (int64_t r0 = 0; r0 < m; r0 += rows) {
      const int64_t bsz = std::min(rows, m - r0);
      at::Tensor panel = buf.narrow(0, 0, bsz);
      const at::Tensor a_rows = a.narrow(0, r0, bsz);
      panel_gemm(panel, a_rows, bt);
      if (!want) {
        launch_rows<T, T, false, true>(panel, nullptr, n, m, r0, offset, s, beta, sums, stream);
      } else if (!half) {
        launch_rows<T, T, true, true>(panel, nullptr, n, m, r0, offset, s, beta, sums, stream);
        if (grad_image) {
          at::Tensor da_rows = da.narrow(0, r0, bsz);
          at::mm_out(da_rows, panel, b);  // dA_I = s·w_I B (rows written once)
        }
        if (grad_text) db.addmm_(panel.t(), a_rows);  // dB += s·w_Iᵀ A_I (fixed panel order)
      } else {
        at::Tensor e = ebuf.narrow(0, 0, bsz);
        if (in_t == at::kBFloat16) {
          launch_rows<float, __nv_bfloat16, true, false>(panel, &e, n, m, r0, offset, s, beta, sums, stream);
        } else {
          launch_rows<float, __half, true, false>(panel, &e, n, m, r0, offset, s, beta, sums, stream);
        }
        if (grad_image) {
          at::Tensor da_rows = da.narrow(0, r0, bsz);
          at::mm_out(da_rows, e, b, at::kFloat);  // (N·w_I) B, then × s/N
          launch_scale(da_rows, da_rows, s, n, false, stream);
        }
        if (grad_text) {
          at::Tensor tb = tmp_b;
          at::mm_out(tb, e.t(), a_rows, at::kFloat);  // (N·w_I)ᵀ A_I, then dB += s/N × it
          launch_scale(db, tb, s, n, true, stream);
        }
      }
    }
    siglip_finalize_kernel<<<1, kFinalThreads, 0, stream>>>(sums.const_data_ptr<double>(), int(m), int(n),
                                                            out3.mutable_data_ptr<double>());
    SO_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor loss = out3.select(0, 0).to(in_t);
  at::Tensor g_scale = out3.select(0, 1).reshape(logit_scale.sizes()).to(logit_scale.options());
  at::Tensor g_bias = out3.select(0, 2).reshape(logit_bias.sizes()).to(logit_bias.options());
  at::Tensor ga = grad_image ? da.to(in_t) : at::empty({0}, image.options());
  at::Tensor gb = grad_text ? db.to(text.scalar_type()) : at::empty({0}, text.options());
  return {loss, ga, gb, g_scale, g_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fwd_cuda(
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale, const at::Tensor& logit_bias,
    int64_t row_offset, bool grad_image, bool grad_text) {
  check_cuda_inputs(image, text, logit_scale, logit_bias, row_offset);
  c10::cuda::CUDAGuard guard(image.device());
  if (image.scalar_type() == at::kDouble) {
    return siglip_impl<double>(image, text, logit_scale, logit_bias, row_offset, grad_image, grad_text);
  }
  return siglip_impl<float>(image, text, logit_scale, logit_bias, row_offset, grad_image, grad_text);
}

}  // namespace

TORCH_LIBRARY_IMPL(structure_ops, CUDA, m) {
  m.impl("siglip_fwd", &siglip_fwd_cuda);
}

}  // namespace structure_ops
