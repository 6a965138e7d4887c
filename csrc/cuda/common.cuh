// Helpers shared by the CUDA kernels of structure_ops (csrc/cuda/*.cu).
//
// Device part (always available, CUDA headers only): ceil_div, warp and block all-reductions for sum and max.
// The reductions are deterministic: a fixed butterfly (xor-shuffle) inside each warp, then every warp reduces
// the per-warp partials from shared memory in the same order, so every thread of the block gets the same bits
// and two runs with the same launch configuration give bitwise-equal results (no atomics).
//
// Host part (skipped when SO_CUDA_KERNELS_ONLY is defined, for kernel-only translation units compiled without
// the torch headers): SO_CUDA_CHECK / SO_CUDA_KERNEL_LAUNCH_CHECK (TORCH_CHECK with the CUDA error string),
// current_stream(tensor) (the caller's current stream on the tensor's device: every launch goes there, so the
// ops compose with torch streams and CUDA graphs), sm_count(device) (cached multiprocessor count),
// available_device_bytes and panel_rows_from_memory (the row-panel height rule of every CUDA op that works in
// B × N row panels: structure level 1, clip, knn).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace structure_ops {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // 1024 threads per block

template <typename T>
__host__ __device__ __forceinline__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
  template <typename T>
  __device__ __forceinline__ static constexpr T identity() {
    return T(0);
  }
};

// max that skips NaN (as std::max with NaN second, and the CPU row_max): a NaN logit still poisons the
// row through the sums, which is where the CPU code propagates it.
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return b > a ? b : a;
  }
  template <typename T>
  __device__ __forceinline__ static constexpr T identity() {
    return -__builtin_huge_val();
  }
};

// All lanes of a full warp get op over the warp. Lanes i and i^k combine the same two values (op is
// commutative bitwise for + and max), so all lanes hold identical results.
template <typename Op, typename T>
__device__ __forceinline__ T warp_all_reduce(T v, Op op = Op()) {
#pragma unroll
  for (int k = kWarpSize / 2; k > 0; k >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, k));
  return v;
}

// All threads of the block get op over the block. blockDim.x must be a multiple of 32 (≤ 1024) and every
// thread of the block must call it (it synchronizes). Safe to call back to back: the leading barrier keeps
// one call's shared-memory writes from racing the previous call's reads.
template <typename Op, typename T>
__device__ __forceinline__ T block_all_reduce(T v, Op op = Op()) {
  __shared__ T partial[kMaxWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  v = warp_all_reduce<Op>(v, op);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? partial[lane] : Op::template identity<T>();
  return warp_all_reduce<Op>(r, op);
}

template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  return block_all_reduce<SumOp>(v);
}

template <typename T>
__device__ __forceinline__ T block_max(T v) {
  return block_all_reduce<MaxOp>(v);
}

}  // namespace cuda
}  // namespace structure_ops

#if !defined(SO_CUDA_KERNELS_ONLY)
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>

// TORCH_CHECK (a c10::Error, i.e. a Python RuntimeError) with the CUDA error string and the failing call.
#define SO_CUDA_CHECK(expr)                                                                                  \
  do {                                                                                                       \
    const cudaError_t so_cuda_err_ = (expr);                                                                 \
    TORCH_CHECK(so_cuda_err_ == cudaSuccess, "CUDA error ", int(so_cuda_err_), " (",                         \
                cudaGetErrorString(so_cuda_err_), ") from ", #expr, " at ", __FILE__, ":", __LINE__);         \
  } while (0)

// After every <<<...>>> launch: configuration errors (bad grid, too many threads or registers) surface here.
#define SO_CUDA_KERNEL_LAUNCH_CHECK() SO_CUDA_CHECK(cudaGetLastError())

namespace structure_ops {
namespace cuda {

// The current CUDA stream of the tensor's device (what ATen's own kernels on that tensor use).
inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Multiprocessor count of a device, queried once per device (used to size launches, never for results).
inline int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) {
    int v = 0;
    SO_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    return v;
  }
  if (cache[device] == 0) {
    int v = 0;
    SO_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = v;
  }
  return cache[device];
}

// Device memory a call can use now: free device memory (cudaMemGetInfo) plus what torch's caching allocator
// holds reserved but unused. free_out (optional): the cudaMemGetInfo part alone.
inline double available_device_bytes(const at::Device& device, double* free_out = nullptr) {
  size_t free_b = 0, total_b = 0;
  SO_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  // index 0 = StatType::AGGREGATE (its namespace moved between torch releases; the index did not)
  const double cached = double(stats.reserved_bytes[0].current - stats.allocated_bytes[0].current);
  if (free_out) *free_out = double(free_b);
  return double(free_b) + std::max(0.0, cached);
}

// Row panels sized from free device memory (docs/kernels.md §10), ONE rule for every CUDA op that works in
// B × N row panels (structure level 1, clip forward and backward, knn): the panel buffers (bytes_per_row each
// row) take at most kPanelMemFraction of the available device memory and at most the cap:
// STRUCTURE_OPS_CUDA_PANEL_MB when set (> 0, read on every call), else kDefaultPanelCapMb (the issue-14 target:
// level 1 at N = 262 144 within 2 GiB beyond inputs and outputs). Without the knob, at least kMinPanelRows rows
// when memory allows (the backward GEMMs have the panel height as inner dimension); with it, exactly its budget
// when memory allows (down to one row, for tests of many and ragged panels). Heights ≥ 4·kPanelMultiple rows
// are multiples of kPanelMultiple (GEMM-friendly); the result is in [1, max_rows].
constexpr double kPanelMemFraction = 0.5;
constexpr double kDefaultPanelCapMb = 2048.0;
constexpr int64_t kMinPanelRows = 256;
constexpr int64_t kPanelMultiple = 16;

inline int64_t panel_rows_from_memory(const at::Tensor& like, int64_t bytes_per_row, int64_t max_rows) {
  const char* env = std::getenv("STRUCTURE_OPS_CUDA_PANEL_MB");
  const double knob = env ? std::atof(env) : 0.0;
  const bool capped_by_knob = knob > 0;
  const double cap = (capped_by_knob ? knob : kDefaultPanelCapMb) * double(1 << 20);
  const double mem = kPanelMemFraction * available_device_bytes(like.device());
  const double bpr = double(std::max<int64_t>(1, bytes_per_row));
  int64_t rows = int64_t(std::min(cap, mem) / bpr);
  if (!capped_by_knob) rows = std::max(rows, std::min(kMinPanelRows, int64_t(mem / bpr)));
  if (rows >= 4 * kPanelMultiple) rows -= rows % kPanelMultiple;
  return std::max<int64_t>(1, std::min(rows, max_rows));
}

}  // namespace cuda
}  // namespace structure_ops
#endif  // SO_CUDA_KERNELS_ONLY
