// k nearest neighbours by inner product on CUDA, diagonal excluded, best first, ties to the lower index.
//
//   idx_i = the k columns j ≠ i with the largest (A Aᵀ)_ij, best first
//
// Order (the CPU op's comparator, csrc/cpu/knn_cpu.cpp): similarity descending, then column ascending;
// NaN ranks as −inf (tied with −inf, so by index); −0.0 == +0.0.
//
// Pass structure, for row panels I of B rows (B from free device memory, capped by
//   STRUCTURE_OPS_CUDA_PANEL_MB, default 2048 MiB: panel_rows_from_memory, csrc/cuda/common.cuh):
//   S_I = A_I Aᵀ (at::mm: cuBLAS; half inputs with fp32 output, fp32 honours the matmul precision)  2 N² d
//   k ≤ 1024: knn_topk_rows_kernel, one block per row, streams the row once with a threshold filter
//             into a shared-memory candidate buffer that is compacted (bitonic sort, keep the best k)
//             whenever it could overflow; never a full sort of N, never an N × N matrix.
//   k > 1024: the row panel is sorted by at::sort (stable, descending; NaN → −inf, −0 → +0 first),
//             then the diagonal is dropped from the first k + 1 entries (knn_drop_diag_kernel).
//
// Key (why the selection needs no tie-breaking logic): for fp32, o(v) = the order-preserving unsigned
// image of v's bits (negative floats flipped, positive ones with the sign bit set), and
//   key = o(v) << 32 | (2³² − 1 − j)
// orders exactly like the comparator (larger key ⇔ larger value, or equal value and smaller j) and is
// unique per column, so "the k largest keys" is the answer and any exact selection is deterministic.
// fp64 uses the same construction in 128 bits (o64(v) << 64 | (2⁶⁴ − 1 − j)). The diagonal and the
// padding get key 0, below every real key (o(−inf) > 0), and k ≤ N − 1 real keys exist per row.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <tuple>

#include "../common/checks.h"
#include "common.cuh"

namespace structure_ops {
namespace {

using cuda::ceil_div;

constexpr int kThreads = 256;
constexpr int kItems = 2;                        // columns per thread per chunk
constexpr int kChunk = kThreads * kItems;        // columns streamed between two buffer checks
constexpr int kCap = 2048;                       // candidate buffer (keys) in shared memory
constexpr int64_t kFusedMaxK = 1024;             // needs k ≤ kCap − kChunk; larger k take the sort path

using u64 = unsigned long long;
using u128 = unsigned __int128;

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = u64;
};
template <>
struct KeyOf<double> {
  using type = u128;
};

// NaN → −inf (the CPU comparator's key), −0.0 → +0.0 (equal values must tie on the index).
__device__ __forceinline__ u64 make_key(float v, int j) {
  v = (v != v) ? -INFINITY : v;
  v = (v == 0.0f) ? 0.0f : v;
  const unsigned b = __float_as_uint(v);
  const unsigned o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (u64(o) << 32) | u64(0xFFFFFFFFu - unsigned(j));
}

__device__ __forceinline__ u128 make_key(double v, int j) {
  v = (v != v) ? -INFINITY : v;
  v = (v == 0.0) ? 0.0 : v;
  const u64 b = u64(__double_as_longlong(v));
  const u64 o = (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
  return (u128(o) << 64) | u128(~0ull - u64(j));
}

__device__ __forceinline__ int64_t index_of(u64 key) { return int64_t(0xFFFFFFFFu - unsigned(key & 0xFFFFFFFFull)); }
__device__ __forceinline__ int64_t index_of(u128 key) { return int64_t(~0ull - u64(key)); }

// Bitonic sort, descending, of buf[0, count) in shared memory by the whole block; [count, P) is padded
// with key 0 (P = the next power of two ≥ count ≤ kCap). Every thread must call it with the same count.
template <typename Key>
__device__ void block_sort_desc(Key* buf, int count) {
  int p2 = 1;
  while (p2 < count) p2 <<= 1;
  for (int t = count + int(threadIdx.x); t < p2; t += blockDim.x) buf[t] = Key(0);
  __syncthreads();
  for (int size = 2; size <= p2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < p2 / 2; t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1));  // the partner pair (i, i + stride), bit `stride` of i clear
        const bool desc = (i & size) == 0;         // run direction; the last merge (size = p2) is all descending
        const Key x = buf[i], y = buf[i + stride];
        if ((x < y) == desc) {
          buf[i] = y;
          buf[i + stride] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Math: for the panel row i (global gi = r0 + i), the k largest keys key(S_ij, j), j ≠ gi, descending.
// Streaming selection: a key enters the shared buffer only if it beats the threshold τ (the k-th best key
// at the last compaction; 0 before the first), appended by warp-aggregated atomics (one shared atomic
// per warp and chunk item). When the buffer could not take another chunk (count > limit − kChunk) it is
// sorted and cut to its best k, and τ tightens to the k-th of them. Keys are unique, so neither the
// nondeterministic append order nor τ's ties matter: the final sort of the buffer is exact and
// deterministic. Random rows accept ≈ k·ln(N/limit) keys after the first compaction; an adversarial
// (ascending) row compacts every (limit − k)/kChunk chunks, which is slower but still exact.
template <typename T>
__global__ void __launch_bounds__(kThreads) knn_topk_rows_kernel(const T* __restrict__ panel, int n, int r0, int k,
                                                                 int limit, int64_t* __restrict__ out) {
  using Key = typename KeyOf<T>::type;
  __shared__ Key buf[kCap];
  __shared__ int count;
  const int i = blockIdx.x, gi = r0 + i;
  const T* row = panel + int64_t(i) * n;
  const int lane = threadIdx.x & 31;
  const unsigned lower_lanes = (1u << lane) - 1u;
  if (threadIdx.x == 0) count = 0;
  Key thresh = Key(0);
  __syncthreads();
  for (int base = 0; base < n; base += kChunk) {
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int j = base + it * kThreads + int(threadIdx.x);
      const Key key = (j < n && j != gi) ? make_key(row[j], j) : Key(0);
      const bool take = key > thresh;
      const unsigned ballot = __ballot_sync(0xffffffffu, take);
      if (ballot) {  // warp-uniform
        int pos = 0;
        if (lane == 0) pos = atomicAdd(&count, __popc(ballot));
        pos = __shfl_sync(0xffffffffu, pos, 0);
        if (take) buf[pos + __popc(ballot & lower_lanes)] = key;
      }
    }
    __syncthreads();
    const int cnt = count;
    __syncthreads();  // all threads have read count before the next chunk's appends change it
    if (cnt > limit - kChunk) {  // block-uniform: no room for another chunk
      block_sort_desc(buf, cnt);
      thresh = buf[k - 1];
      if (threadIdx.x == 0) count = k;
      __syncthreads();
    }
  }
  const int cnt = count;
  block_sort_desc(buf, cnt);
  for (int t = threadIdx.x; t < k; t += blockDim.x) out[int64_t(gi) * k + t] = index_of(buf[t]);
}

// Sort path preprocessing: NaN → −inf and −0.0 → +0.0, so that the stable sort orders like the comparator.
template <typename T>
__global__ void __launch_bounds__(kThreads) knn_sanitize_kernel(T* x, int64_t count) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < count; t += int64_t(gridDim.x) * blockDim.x) {
    const T v = x[t];
    x[t] = (v != v) ? T(-INFINITY) : (v == T(0) ? T(0) : v);
  }
}

// Sort path: order holds each panel row's columns by descending similarity, ties by index (stable sort).
// Drop the diagonal from the first k + 1 and keep k (removing one entry keeps the others in order).
__global__ void __launch_bounds__(kThreads) knn_drop_diag_kernel(const int64_t* __restrict__ order, int64_t ld,
                                                                 int r0, int k, int64_t* __restrict__ out) {
  __shared__ int diag_pos;
  const int i = blockIdx.x, gi = r0 + i;
  const int64_t* o = order + int64_t(i) * ld;
  if (threadIdx.x == 0) diag_pos = k + 1;  // absent: then the (k+1)-th entry is the one dropped
  __syncthreads();
  for (int p = threadIdx.x; p <= k; p += blockDim.x)
    if (o[p] == gi) diag_pos = p;  // at most one writer: the column indices of a row are distinct
  __syncthreads();
  const int dp = diag_pos;
  for (int p = threadIdx.x; p <= k; p += blockDim.x) {
    if (p == dp) continue;
    const int dst = p < dp ? p : p - 1;
    if (dst < k) out[int64_t(gi) * k + dst] = o[p];
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

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

template <typename T>
void knn_impl(const at::Tensor& a, int64_t k, at::Tensor& out) {
  const int64_t n = a.size(0);
  const auto cdt = c10::CppTypeToScalarType<T>::value;
  cudaStream_t stream = cuda::current_stream(a);
  const bool fused = k <= kFusedMaxK;
  // the sort path also holds the sorted values, the int64 order and the sort's scratch per panel row
  const int64_t bytes_per_row = fused ? int64_t(sizeof(T)) * n : (3 * int64_t(sizeof(T)) + 24) * n;
  const int64_t rows = panel_rows_from_memory(a, bytes_per_row, n);
  at::Tensor buf = at::empty({rows, n}, a.options().dtype(cdt));
  const at::Tensor at_ = a.t();
  // buffer size at which a compaction starts: small for small k (a cheap sort and an early threshold),
  // at least k + kChunk so that a compaction always frees room for a chunk
  const int limit = int(std::min<int64_t>(kCap, std::max<int64_t>(1024, next_pow2(2 * k + kChunk))));
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t bsz = std::min(rows, n - r0);
    at::Tensor panel = buf.narrow(0, 0, bsz);
    if (is_half(a.scalar_type())) {
      at::mm_out(panel, a.narrow(0, r0, bsz), at_, at::kFloat);
    } else {
      at::mm_out(panel, a.narrow(0, r0, bsz), at_);
    }
    if (fused) {
      knn_topk_rows_kernel<T><<<unsigned(bsz), kThreads, 0, stream>>>(
          panel.const_data_ptr<T>(), int(n), int(r0), int(k), limit, out.mutable_data_ptr<int64_t>());
      SO_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t count = panel.numel();
      knn_sanitize_kernel<T><<<unsigned(std::min<int64_t>(ceil_div<int64_t>(count, kThreads), 8192)), kThreads, 0,
                               stream>>>(panel.mutable_data_ptr<T>(), count);
      SO_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor order = std::get<1>(at::sort(panel, /*stable=*/true, /*dim=*/1, /*descending=*/true)).contiguous();
      knn_drop_diag_kernel<<<unsigned(bsz), kThreads, 0, stream>>>(order.const_data_ptr<int64_t>(), n, int(r0), int(k),
                                                                  out.mutable_data_ptr<int64_t>());
      SO_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

at::Tensor knn_cuda(const at::Tensor& a_in, int64_t k) {
  check_matrix(a_in, "a");
  TORCH_CHECK(a_in.is_cuda(), "knn (cuda): a must be a CUDA tensor, got ", a_in.device());
  const int64_t n = a_in.size(0);
  TORCH_CHECK(k >= 1 && k <= n - 1, "k must satisfy 1 <= k <= N - 1 = ", n - 1, " (diagonal excluded), got ", k);
  const auto t = a_in.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(t == at::kFloat || t == at::kDouble || is_half(t), "knn (cuda): dtype ", t,
                              " is not supported (float32, float64, bfloat16, float16)");
  TORCH_CHECK(n <= INT32_MAX, "knn (cuda): N = ", n, " rows exceeds the kernels' int32 range");
  c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  at::Tensor out = at::empty({n, k}, a.options().dtype(at::kLong));
  if (t == at::kDouble) {
    knn_impl<double>(a, k, out);
  } else {
    knn_impl<float>(a, k, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(structure_ops, CUDA, m) { m.impl("knn", &knn_cuda); }

}  // namespace structure_ops
