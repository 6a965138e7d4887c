// CPU emulation of the CUDA subset used by csrc/cuda/*.cu (tests/emulation: see README.md there).
//
// Model: a launch runs its blocks one after another, in an order chosen by the test (in order, reversed or a
// seeded shuffle). A block runs every CUDA thread as a fiber (a user-level context on one OS thread) and
// switches only at the synchronization points: __syncthreads (a block barrier) and the warp-synchronous
// intrinsics (__shfl_sync, __shfl_xor_sync, __ballot_sync, __syncwarp: a warp barrier). Between two such points
// the threads of the block run one after another, in the chosen order (in order, reversed, or a fresh shuffle
// of all threads, so of warps and of lanes, at every phase), so a result that depends on which thread runs
// first between two barriers (a missing barrier, a race on shared or global memory) changes with the order.
// Checked while running: a barrier reached by only part of the block (the others exited), a warp-synchronous
// intrinsic reached by only part of a warp or out of step, a full mask on a partial warp, a launch with a
// block or grid outside CUDA's limits, and a block larger than the kernel's __launch_bounds__ (rewritten by
// build.py into a check at the top of the kernel body). __shared__ variables are static (blocks never overlap)
// and are filled with 0xFF bytes (NaN for floats, all ones for integers) before every block, as a read of
// shared memory that the block has not written returns garbage on a GPU.
//
// Test hooks (configure(), stats()): the block and grid orders and seed; a block size (and a grid size) that
// replaces the host's choice for the kernels named in a list (kernels whose result must not depend on it).
#pragma once

#include <math.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__linux__)
#define SO_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("so_emu_shared")))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace so_emu {

enum State { kReady, kBlockBar, kWarpBar, kDone, kFailed };
enum Order { kInOrder = 0, kReversed = 1, kShuffled = 2 };

struct Fiber {
  void* sp = nullptr;
#if !SO_EMU_ASM_SWITCH
  ucontext_t ctx;
#endif
  dim3 tid;
  int linear = 0, lane = 0, warp = 0;
  State st = kReady;
  uint32_t warp_ops = 0;  // warp-synchronous calls made so far (all lanes must agree at a warp barrier)
};

struct Config {
  int order = kInOrder;
  uint64_t seed = 0;
  int block = 0;             // > 0: block size for the kernels in block_kernels
  std::string block_kernels;  // ",name,name,"
  int grid = 0;              // > 0: grid size for the kernels in grid_kernels (grid-stride loops)
  std::string grid_kernels;
  bool poison = true;
};

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, switches = 0, overridden = 0, clamped = 0;
  int64_t max_block = 0;       // the largest block that ran
  int64_t max_overridden = 0;  // the largest block of a launch whose block or grid the test set
  std::map<std::string, int64_t> kernel_block;  // per kernel name: the largest block it ran with
};

// Thrown by the launch-bounds check of an overridden launch: relaunch with the kernel's bound.
struct Rebound {
  int bound;
};

struct Runtime {
  Config cfg;
  Stats stats;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
#if !SO_EMU_ASM_SWITCH
  ucontext_t sched_ctx;
#endif
  dim3 block_idx, block_dim, grid_dim;
  bool overridden = false;
  const char* kernel = "";
  std::vector<Fiber> fibers;
  std::vector<unsigned char> slots;  // per warp: 2 × 32 lanes × 16 bytes
  char* stacks = nullptr;
  size_t nstacks = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::exception_ptr err;
};

inline Runtime g_rt;
constexpr size_t kStack = size_t(128) << 10;
constexpr size_t kGuard = size_t(4) << 10;

inline std::string where() {
  const dim3 b = g_rt.block_idx;
  return std::string("kernel ") + g_rt.kernel + ", block (" + std::to_string(b.x) + "," + std::to_string(b.y) +
         "," + std::to_string(b.z) + ") of " + std::to_string(g_rt.block_dim.x * g_rt.block_dim.y * g_rt.block_dim.z) +
         " threads";
}

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("CUDA emulation: " + what); }

}  // namespace so_emu

#define threadIdx (::so_emu::g_rt.cur->tid)
#define blockIdx (::so_emu::g_rt.block_idx)
#define blockDim (::so_emu::g_rt.block_dim)
#define gridDim (::so_emu::g_rt.grid_dim)
#define warpSize 32

extern "C" __attribute__((used)) void so_emu_fiber_main(so_emu::Fiber* f);

#if SO_EMU_ASM_SWITCH
// so_emu_switch(save, to): push the callee-saved registers, store rsp in *save, load `to`, pop, return there.
// so_emu_trampoline: a new fiber's first return lands here with the Fiber* in r12.
extern "C" void so_emu_switch(void** save, void* to);
extern "C" void so_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .type so_emu_switch,@function
so_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size so_emu_switch,.-so_emu_switch
  .p2align 4
  .type so_emu_trampoline,@function
so_emu_trampoline:
  movq %r12, %rdi
  call so_emu_fiber_main@PLT
  ud2
  .size so_emu_trampoline,.-so_emu_trampoline
)");
#endif

namespace so_emu {

inline void to_scheduler(Fiber* f) {
#if SO_EMU_ASM_SWITCH
  so_emu_switch(&f->sp, g_rt.sched_sp);
#else
  swapcontext(&f->ctx, &g_rt.sched_ctx);
#endif
}

inline void yield(State s) {
  Fiber* f = g_rt.cur;
  f->st = s;
  to_scheduler(f);
}

#if !SO_EMU_ASM_SWITCH
inline void ucontext_entry() { so_emu_fiber_main(g_rt.cur); }
#endif

inline void ensure_stacks(size_t n) {
  if (n <= g_rt.nstacks) return;
  if (g_rt.stacks) munmap(g_rt.stacks, g_rt.nstacks * (kStack + kGuard));
  const size_t bytes = n * (kStack + kGuard);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fail("cannot map fiber stacks");
  g_rt.stacks = static_cast<char*>(p);
  g_rt.nstacks = n;
  for (size_t i = 0; i < n; ++i) mprotect(g_rt.stacks + i * (kStack + kGuard), kGuard, PROT_NONE);  // overflow traps
}

inline void start_fiber(Fiber& f) {
  char* base = g_rt.stacks + size_t(f.linear) * (kStack + kGuard) + kGuard;
#if SO_EMU_ASM_SWITCH
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + kStack) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 72);  // ≡ 8 (mod 16): after 6 pops and ret, rsp ≡ 0 (mod 16)
  sp[0] = nullptr;                                  // r15
  sp[1] = nullptr;                                  // r14
  sp[2] = nullptr;                                  // r13
  sp[3] = &f;                                       // r12: the trampoline's argument
  sp[4] = nullptr;                                  // rbx
  sp[5] = nullptr;                                  // rbp
  sp[6] = reinterpret_cast<void*>(&so_emu_trampoline);
  sp[7] = nullptr;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = base;
  f.ctx.uc_stack.ss_size = kStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &ucontext_entry, 0);
#endif
}

inline void resume(Fiber& f) {
  g_rt.cur = &f;
#if SO_EMU_ASM_SWITCH
  so_emu_switch(&g_rt.sched_sp, f.sp);
#else
  swapcontext(&g_rt.sched_ctx, &f.ctx);
#endif
  g_rt.cur = nullptr;
  ++g_rt.stats.switches;
}

// The bytes of every __shared__ variable of this library (one linker section).
extern "C" char __start_so_emu_shared[] __attribute__((weak));
extern "C" char __stop_so_emu_shared[] __attribute__((weak));

inline void poison_shared() {
  if (__start_so_emu_shared && __stop_so_emu_shared && __stop_so_emu_shared > __start_so_emu_shared)
    std::memset(__start_so_emu_shared, 0xFF, size_t(__stop_so_emu_shared - __start_so_emu_shared));
}

inline std::vector<int> order_of(int n, std::mt19937_64& rng) {
  std::vector<int> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  if (g_rt.cfg.order == kReversed) std::reverse(v.begin(), v.end());
  if (g_rt.cfg.order == kShuffled) std::shuffle(v.begin(), v.end(), rng);
  return v;
}

// Runs the current block (g_rt.block_idx/block_dim set) to completion.
inline void run_block(std::mt19937_64& rng) {
  const dim3 bd = g_rt.block_dim;
  const int nt = int(bd.x * bd.y * bd.z);
  ensure_stacks(size_t(nt));
  g_rt.fibers.assign(size_t(nt), Fiber{});
  const int nw = (nt + 31) / 32;
  g_rt.slots.assign(size_t(nw) * 2 * 32 * 16, 0);
  for (int t = 0; t < nt; ++t) {
    Fiber& f = g_rt.fibers[size_t(t)];
    f.linear = t;
    f.tid = dim3(unsigned(t) % bd.x, (unsigned(t) / bd.x) % bd.y, unsigned(t) / (bd.x * bd.y));
    f.lane = t % 32;
    f.warp = t / 32;
    start_fiber(f);
  }
  if (g_rt.cfg.poison) poison_shared();
  for (;;) {
    for (int t : order_of(nt, rng)) {
      Fiber& f = g_rt.fibers[size_t(t)];
      if (f.st != kReady) continue;
      resume(f);
      if (f.st == kFailed) std::rethrow_exception(g_rt.err);
    }
    bool released = false;
    for (int w = 0; w < nw; ++w) {
      const int lanes = std::min(32, nt - 32 * w);
      int at = 0;
      for (int l = 0; l < lanes; ++l) at += g_rt.fibers[size_t(32 * w + l)].st == kWarpBar;
      if (at == 0) continue;
      if (at != lanes)
        fail(where() + ", warp " + std::to_string(w) + ": a warp-synchronous intrinsic (__shfl*_sync, __ballot_sync, "
             "__syncwarp) was reached by " + std::to_string(at) + " of its " + std::to_string(lanes) +
             " lanes; the others exited or wait at __syncthreads (a deadlock or undefined behaviour on a GPU)");
      const uint32_t ops = g_rt.fibers[size_t(32 * w)].warp_ops;
      for (int l = 0; l < lanes; ++l) {
        Fiber& f = g_rt.fibers[size_t(32 * w + l)];
        if (f.warp_ops != ops)
          fail(where() + ", warp " + std::to_string(w) + ": lanes meet at different warp-synchronous calls (" +
               std::to_string(f.warp_ops) + " vs " + std::to_string(ops) + ")");
        f.st = kReady;
      }
      released = true;
    }
    if (released) continue;
    int bar = 0, done = 0;
    for (const Fiber& f : g_rt.fibers) {
      bar += f.st == kBlockBar;
      done += f.st == kDone;
    }
    if (bar == 0) break;  // every thread returned
    if (done > 0)
      fail(where() + ": __syncthreads reached by " + std::to_string(bar) + " threads while " + std::to_string(done) +
           " had exited (every thread of the block must reach it)");
    for (Fiber& f : g_rt.fibers) f.st = kReady;
  }
  g_rt.stats.threads += nt;
  g_rt.stats.max_block = std::max<int64_t>(g_rt.stats.max_block, nt);
  if (g_rt.overridden) g_rt.stats.max_overridden = std::max<int64_t>(g_rt.stats.max_overridden, nt);
  ++g_rt.stats.blocks;
}

template <class F>
void thunk(void* p) {
  (*static_cast<F*>(p))();
}

inline bool listed(const std::string& list, const char* name) {
  return list.find("," + std::string(name) + ",") != std::string::npos;
}

inline void check_config(const char* name, dim3 g, dim3 b) {
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64)
    fail(std::string("kernel ") + name + ": invalid block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," +
         std::to_string(b.z) + ") (CUDA: at most 1024 threads, z ≤ 64)");
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    fail(std::string("kernel ") + name + ": invalid grid (" + std::to_string(g.x) + "," + std::to_string(g.y) + "," +
         std::to_string(g.z) + ") (CUDA: x < 2^31, y and z ≤ 65535, none 0)");
}

template <class... P>
struct Launch {
  const char* name;
  void (*k)(P...);
  dim3 g, b;
  template <class... A>
  void operator()(A... a) const {
    const Config& c = g_rt.cfg;
    dim3 grid = g, block = b;
    const bool ob = c.block > 0 && listed(c.block_kernels, name);
    const bool og = c.grid > 0 && listed(c.grid_kernels, name);
    if (ob) block = dim3(unsigned(c.block));
    if (og) grid = dim3(unsigned(c.grid));
    check_config(name, grid, block);
    auto call = [&] { k(a...); };
    for (;;) {
      try {
        run(grid, block, ob || og, &thunk<decltype(call)>, &call);
        return;
      } catch (const Rebound& r) {  // the override exceeded the kernel's __launch_bounds__: use the bound
        block = dim3(unsigned(r.bound));
        ++g_rt.stats.clamped;
      }
    }
  }

  void run(dim3 grid, dim3 block, bool overridden, void (*body)(void*), void* arg) const {
    g_rt.kernel = name;
    g_rt.grid_dim = grid;
    g_rt.block_dim = block;
    g_rt.overridden = overridden;
    g_rt.body = body;
    g_rt.body_arg = arg;
    g_rt.err = nullptr;
    std::mt19937_64 rng(g_rt.cfg.seed * 0x9E3779B97F4A7C15ull + uint64_t(g_rt.stats.launches));
    const int64_t nb = int64_t(grid.x) * grid.y * grid.z;
    std::vector<int64_t> blocks(static_cast<size_t>(nb));
    std::iota(blocks.begin(), blocks.end(), int64_t(0));
    if (g_rt.cfg.order == kReversed) std::reverse(blocks.begin(), blocks.end());
    if (g_rt.cfg.order == kShuffled) std::shuffle(blocks.begin(), blocks.end(), rng);
    for (int64_t lb : blocks) {
      g_rt.block_idx = dim3(unsigned(lb % grid.x), unsigned((lb / grid.x) % grid.y), unsigned(lb / (int64_t(grid.x) * grid.y)));
      run_block(rng);
    }
    ++g_rt.stats.launches;
    g_rt.stats.overridden += overridden;
    int64_t& kb = g_rt.stats.kernel_block[name];
    kb = std::max<int64_t>(kb, int64_t(block.x) * block.y * block.z);
  }
};

template <class... P>
Launch<P...> launch(const char* name, void (*k)(P...), dim3 g, dim3 b, size_t smem = 0, void* = nullptr) {
  if (smem != 0) fail(std::string("kernel ") + name + ": dynamic shared memory is not emulated");
  return Launch<P...>{name, k, g, b};
}

// Inserted by build.py at the top of every kernel with __launch_bounds__(max_threads, ...).
inline void check_launch_bounds(int bound) {
  const int threads = int(g_rt.block_dim.x * g_rt.block_dim.y * g_rt.block_dim.z);
  if (threads <= bound) return;
  if (g_rt.overridden) throw Rebound{bound};  // first statement of the kernel: nothing was written yet
  fail(where() + ": the block exceeds the kernel's __launch_bounds__(" + std::to_string(bound) +
       ") (on a GPU: a launch error, too many resources requested)");
}

// ---------------------------------------------------------------------------------------------------------
// Device intrinsics
// ---------------------------------------------------------------------------------------------------------
inline void warp_sync_point(unsigned mask) {
  Fiber* f = g_rt.cur;
  const int nt = int(g_rt.block_dim.x * g_rt.block_dim.y * g_rt.block_dim.z);
  const int lanes = std::min(32, nt - 32 * f->warp);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != 0xffffffffu || lanes != 32)
    fail(where() + ": warp-synchronous intrinsic with mask " + std::to_string(mask) + " on a warp of " +
         std::to_string(lanes) + " lanes (only full masks on full warps are emulated; expected " +
         std::to_string(full) + ")");
  yield(kWarpBar);
}

// Lane l stores v, the warp meets, lane l reads lane src(l)'s value. Two slot sets alternate by call count, so a
// fast lane's next store never overwrites a value a slow lane has still to read.
template <class T>
T exchange(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  Fiber* f = g_rt.cur;
  const uint32_t parity = f->warp_ops & 1u;
  unsigned char* base = g_rt.slots.data() + (size_t(f->warp) * 2 + parity) * 32 * 16;
  std::memcpy(base + f->lane * 16, &v, sizeof(T));
  ++f->warp_ops;
  warp_sync_point(mask);
  T r;
  std::memcpy(&r, base + (src & 31) * 16, sizeof(T));
  return r;
}

}  // namespace so_emu

inline void __syncthreads() { ::so_emu::yield(::so_emu::kBlockBar); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ++::so_emu::g_rt.cur->warp_ops;
  ::so_emu::warp_sync_point(mask);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int k, int width = 32) {
  if (width != 32) ::so_emu::fail("__shfl_xor_sync with width != 32 is not emulated");
  return ::so_emu::exchange(mask, v, ::so_emu::g_rt.cur->lane ^ k);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  if (width != 32) ::so_emu::fail("__shfl_sync with width != 32 is not emulated");
  return ::so_emu::exchange(mask, v, src);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  using namespace so_emu;
  Fiber* f = g_rt.cur;
  const uint32_t parity = f->warp_ops & 1u;
  unsigned char* base = g_rt.slots.data() + (size_t(f->warp) * 2 + parity) * 32 * 16;
  base[f->lane * 16] = pred ? 1 : 0;
  ++f->warp_ops;
  warp_sync_point(mask);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= unsigned(base[l * 16] != 0) << l;
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
// Atomics: the fibers of a block never run at the same time, so a plain read-modify-write is atomic.
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = v > old ? v : old;
  return old;
}
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
inline long long __double_as_longlong(double v) {
  long long u;
  std::memcpy(&u, &v, 8);
  return u;
}
inline double __longlong_as_double(long long u) {
  double v;
  std::memcpy(&v, &u, 8);
  return v;
}

extern "C" __attribute__((used)) void so_emu_fiber_main(so_emu::Fiber* f) {
  using namespace so_emu;
  try {
    g_rt.body(g_rt.body_arg);
    f->st = kDone;
  } catch (...) {
    g_rt.err = std::current_exception();
    f->st = kFailed;
  }
  to_scheduler(f);
  __builtin_trap();  // a finished fiber is never resumed
}

// ---------------------------------------------------------------------------------------------------------
// Host API (CUDA runtime stubs)
// ---------------------------------------------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }  // launch errors throw at the launch
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = 132;  // an H100/H200
  return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* f, size_t* t) {
  const char* env = std::getenv("SO_EMU_FREE_BYTES");  // tests: the free device memory the emulated GPU reports
  *f = env ? size_t(std::strtoull(env, nullptr, 10)) : size_t(1) << 36;
  *t = *f;
  return cudaSuccess;
}

#if defined(SO_EMU_WITH_TORCH)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

using __nv_bfloat16 = c10::BFloat16;
using __half = c10::Half;
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return c10::BFloat16(x); }  // round to nearest even
inline __half __float2half_rn(float x) { return c10::Half(x); }

namespace c10 {
namespace cuda {
struct CUDAGuard {
  template <class D>
  explicit CUDAGuard(const D&) {}
};
namespace CUDACachingAllocator {
struct Stat {
  int64_t current = 0;
};
struct Stats {
  Stat reserved_bytes[4], allocated_bytes[4];
};
inline Stats getDeviceStats(int) { return {}; }
}  // namespace CUDACachingAllocator
}  // namespace cuda
}  // namespace c10

namespace so_emu {
// at::empty with its bytes poisoned (NaN for floating dtypes, 0xA5 bytes otherwise): device memory that a
// kernel leaves unwritten is garbage on a GPU, and a missed element must not read as a plausible 0 here.
inline at::Tensor empty(at::IntArrayRef size, at::TensorOptions opts) {
  at::Tensor t = at::empty(size, opts);
  if (!g_rt.cfg.poison || t.numel() == 0) return t;
  if (t.is_floating_point()) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    std::memset(t.data_ptr(), 0xA5, size_t(t.nbytes()));
  }
  return t;
}
// at::mm_out with an fp32 output for half operands (cuBLAS/tensor cores: exact products, fp32 sums): the CPU
// has no mm.dtype kernel, so the operands are upcast (exactly) first.
inline at::Tensor& mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { return at::mm_out(out, a, b); }
inline at::Tensor& mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, at::ScalarType dt) {
  return at::mm_out(out, a.to(dt), b.to(dt));
}
// at::addmm_out with out_dtype (half operands, fp32 self/out, beta and alpha as cuBLAS applies them): the same.
inline at::Tensor& addmm_out(at::Tensor& out, const at::Tensor& self, const at::Tensor& a, const at::Tensor& b,
                             at::ScalarType dt, const at::Scalar& beta = 1, const at::Scalar& alpha = 1) {
  return at::addmm_out(out, self, a.to(dt), b.to(dt), beta, alpha);
}
}  // namespace so_emu
#endif
