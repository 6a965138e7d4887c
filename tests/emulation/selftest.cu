// Kernels that test the emulation layer itself (tests/emulation/test_emulation_layer.py): one correct block
// reduction (csrc/cuda/common.cuh's block_sum) and kernels with deliberate bugs that the emulation must expose,
// either as a result that changes with the execution order or as an error. Built without torch (ctypes).
#define SO_CUDA_KERNELS_ONLY 1
#include "common_emu.cuh"

#include <cstdio>
#include <cstring>

using structure_ops::cuda::block_max;
using structure_ops::cuda::block_sum;

// Correct: out[b] = Σ_i x[b·n + i] by a strided loop and block_sum (fixed tree, any block size).
__global__ void __launch_bounds__(1024) good_sum_kernel(const float* x, int n, float* out) {
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[int64_t(blockIdx.x) * n + i];
  s = block_sum(s);
  const float m = block_max(s);  // back to back: the leading barrier of block_all_reduce is needed
  if (threadIdx.x == 0) out[blockIdx.x] = s + 0.f * m;
}

// BUG: thread 0 sums the per-thread partials without a __syncthreads after they are written.
__global__ void racy_sum_kernel(const float* x, int n, float* out) {
  __shared__ float part[1024];
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[int64_t(blockIdx.x) * n + i];
  part[threadIdx.x] = s;
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (unsigned i = 0; i < blockDim.x; ++i) t += part[i];
    out[blockIdx.x] = t;
  }
}

// BUG: block b reads what block b − 1 wrote (blocks are not ordered on a GPU).
__global__ void chain_kernel(const float*, int, float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = (blockIdx.x ? out[blockIdx.x - 1] : 0.f) + 1.f;
}

// BUG: half of the block returns before a __syncthreads the other half waits at.
__global__ void early_exit_kernel(const float*, int, float* out) {
  if (threadIdx.x >= blockDim.x / 2) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// BUG: a full-mask shuffle executed by half a warp.
__global__ void partial_warp_kernel(const float*, int, float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// BUG: element 0 of the shared array is read but never written.
__global__ void uninit_shared_kernel(const float*, int, float* out) {
  __shared__ float s[1024];
  if (threadIdx.x > 0) s[threadIdx.x] = 1.f;
  __syncthreads();
  out[int64_t(blockIdx.x) * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// BUG (when launched with more than 64 threads): the block exceeds the kernel's launch bounds.
__global__ void __launch_bounds__(64) bounded_kernel(const float*, int, float* out) { out[threadIdx.x] = 1.f; }

// Correct: warp shuffles, a ballot and a shared-memory atomic (the knn kernel's append pattern): out[b] is the
// number of x values > 0 in block b's slice, counted by warp-aggregated atomics.
__global__ void ballot_count_kernel(const float* x, int n, float* out) {
  __shared__ int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  const unsigned lane = threadIdx.x & 31;
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + int(threadIdx.x);
    const bool take = i < n && x[int64_t(blockIdx.x) * n + i] > 0.f;
    const unsigned ballot = __ballot_sync(0xffffffffu, take);
    int pos = 0;
    if (lane == 0) pos = atomicAdd(&count, __popc(ballot));
    pos = __shfl_sync(0xffffffffu, pos, 0);
    (void)pos;
  }
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = float(count);
}

extern "C" __attribute__((visibility("default"))) int so_emu_selftest(const char* kernel, int order, unsigned long long seed,
                                                                      int grid, int block, const float* x, int n,
                                                                      float* out, char* err, int errlen) {
  auto& c = ::so_emu::g_rt.cfg;
  c = ::so_emu::Config{};
  c.order = order;
  c.seed = seed;
  try {
    const std::string k(kernel);
    if (k == "good_sum") {
      good_sum_kernel<<<grid, block>>>(x, n, out);
    } else if (k == "racy_sum") {
      racy_sum_kernel<<<grid, block>>>(x, n, out);
    } else if (k == "chain") {
      chain_kernel<<<grid, block>>>(x, n, out);
    } else if (k == "early_exit") {
      early_exit_kernel<<<grid, block>>>(x, n, out);
    } else if (k == "partial_warp") {
      partial_warp_kernel<<<grid, block>>>(x, n, out);
    } else if (k == "uninit_shared") {
      uninit_shared_kernel<<<grid, block>>>(x, n, out);
    } else if (k == "bounded") {
      bounded_kernel<<<grid, block>>>(x, n, out);
    } else if (k == "ballot_count") {
      ballot_count_kernel<<<grid, block>>>(x, n, out);
    } else {
      std::snprintf(err, size_t(errlen), "unknown kernel %s", kernel);
      return 2;
    }
  } catch (const std::exception& e) {
    std::snprintf(err, size_t(errlen), "%s", e.what());
    return 1;
  }
  return 0;
}

extern "C" __attribute__((visibility("default"))) long long so_emu_selftest_max_block() {
  return ::so_emu::g_rt.stats.max_block;
}
