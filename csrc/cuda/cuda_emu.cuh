// Host emulation of the CUDA subset used by csrc/cuda/sinkhorn.cu and csrc/cuda/sinkhorn/, for verification
// without a GPU: compiled only when WKD_CUDA_EMULATE is defined (python_tests/cuda_emulation/ builds it), never by
// setup.py.
//
// A launch runs the blocks one after another; the threads of a block are cooperative fibers (ucontext), run
// round-robin, each until it reaches a barrier: __syncthreads() waits for every live thread of the block,
// __shfl_xor_sync() for every live lane of the warp (exchange through a per-warp buffer, then a second barrier).
// Each fiber runs as far as it can before the others start, so a missing barrier shows up as stale data, and a
// barrier not reached by all threads (divergent __syncthreads, a shuffle in divergent code) aborts with a
// deadlock message. __shared__ variables become function statics: one copy, shared by the threads of the
// running block; dynamic shared memory is one buffer per launch (dyn_smem(), NaN-filled for each block).
// Memory fences and atomics are trivial (one fiber runs at a time). launch_count() counts the launches,
// launch_log() keeps the shapes of the latest ones.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }
typedef void* cudaStream_t;

namespace wkd_emu {

enum State { kRun = 0, kBlockBarrier = 1, kWarpBarrier = 2, kDone = 3 };

struct Block {
  int nthreads = 0;
  int cur = 0;
  std::vector<ucontext_t> ctx;
  std::vector<int> state;
  ucontext_t sched;
  std::function<void()> body;
  std::vector<unsigned char> shfl;  // [warps][32][8]
};

inline Block*& current() {
  static Block* b = nullptr;
  return b;
}
inline dim3& grid_dim() {
  static dim3 d;
  return d;
}
inline dim3& block_dim() {
  static dim3 d;
  return d;
}
inline dim3& block_idx() {
  static dim3 d;
  return d;
}
inline dim3 thread_idx() { return dim3(static_cast<unsigned>(current()->cur)); }

inline void yield(int st) {
  Block* b = current();
  const int t = b->cur;
  b->state[t] = st;
  swapcontext(&b->ctx[t], &b->sched);
}

inline void fiber_entry() {
  Block* b = current();
  b->body();
  b->state[b->cur] = kDone;  // returning resumes the scheduler (uc_link)
}

inline void run_block(Block& b) {
  constexpr size_t kStack = 256 * 1024;
  static std::vector<std::vector<char>> stacks;
  if (stacks.size() < size_t(b.nthreads)) stacks.resize(b.nthreads);
  b.ctx.assign(b.nthreads, ucontext_t{});
  b.state.assign(b.nthreads, kRun);
  for (int t = 0; t < b.nthreads; ++t) {
    if (stacks[t].size() < kStack) stacks[t].resize(kStack);
    getcontext(&b.ctx[t]);
    b.ctx[t].uc_stack.ss_sp = stacks[t].data();
    b.ctx[t].uc_stack.ss_size = kStack;
    b.ctx[t].uc_link = &b.sched;
    makecontext(&b.ctx[t], fiber_entry, 0);
  }
  const int nwarps = (b.nthreads + 31) / 32;
  for (;;) {
    for (int t = 0; t < b.nthreads; ++t) {
      if (b.state[t] != kRun) continue;
      b.cur = t;
      swapcontext(&b.sched, &b.ctx[t]);
    }
    // Every live fiber now waits at a barrier (or all are done).
    bool released = false, all_done = true;
    for (int w = 0; w < nwarps; ++w) {
      bool any = false, all_at_warp = true;
      for (int t = w * 32; t < std::min(b.nthreads, w * 32 + 32); ++t) {
        if (b.state[t] == kDone) continue;
        any = true;
        if (b.state[t] != kWarpBarrier) all_at_warp = false;
      }
      if (any) all_done = false;
      if (any && all_at_warp) {
        for (int t = w * 32; t < std::min(b.nthreads, w * 32 + 32); ++t)
          if (b.state[t] == kWarpBarrier) b.state[t] = kRun;
        released = true;
      }
    }
    if (all_done) return;
    if (released) continue;
    bool all_at_block = true;
    for (int t = 0; t < b.nthreads; ++t)
      if (b.state[t] != kDone && b.state[t] != kBlockBarrier) all_at_block = false;
    if (!all_at_block) {
      std::fprintf(stderr, "wkd_emu: deadlock in block (%u,%u): threads wait at different barriers\n",
                   block_idx().x, block_idx().y);
      std::abort();
    }
    for (int t = 0; t < b.nthreads; ++t)
      if (b.state[t] == kBlockBarrier) b.state[t] = kRun;
  }
}

inline void check_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "wkd_emu: misaligned 16-byte access at %p in block (%u,%u) thread %d\n", p,
                 block_idx().x, block_idx().y, current()->cur);
    std::abort();
  }
}

// Verification-only switches of the emulated device, set through wkd_cuda_emu::configure
// (python_tests/cuda_emulation/): small < 0 applies the size rule of the single-launch kernels, 0 / 1 forces them
// off / on (where they apply: shared cost, C <= 256); smem_limit: the emulated opt-in shared memory per block
// (sm_90: 227 KiB); regs_per_thread: the registers per thread of every emulated kernel, for resident_ctas_per_sm
// (default: what ptxas reports for small_forward_kernel<float, false> on sm_90 with nvcc 13). (The tile of the
// per-half-iteration kernels and the rows per CTA of the single-launch kernels are per-call arguments of the tuning
// ops instead.)
struct Config {
  int small = -1;
  int smem_limit = 227 * 1024;
  int regs_per_thread = 64;
};
inline Config& config() {
  static Config c;
  return c;
}

// The emulated multiprocessor count: the environment variable WKD_EMU_SMS, 8 when unset.
inline int sm_count() {
  const char* env = std::getenv("WKD_EMU_SMS");
  return env ? std::max(1, std::atoi(env)) : 8;
}

// CTAs of `threads` threads and `smem` bytes of dynamic shared memory that one SM of the emulated device holds at
// once, by the occupancy calculator's limits of sm_90: 2048 threads and 32 CTAs per SM, 65536 registers allocated
// per warp in units of 256 (config().regs_per_thread per thread), 228 KiB of shared memory per SM with 1 KiB
// reserved per CTA. At least 1.
inline int resident_ctas_per_sm(int threads, size_t smem) {
  const int warps = (threads + 31) / 32;
  const int by_threads = 2048 / (warps * 32);
  const int regs_per_warp = (config().regs_per_thread * 32 + 255) / 256 * 256;
  const int by_regs = 65536 / (regs_per_warp * warps);
  const int by_smem = static_cast<int>(size_t(228 * 1024) / (smem + 1024));
  return std::max(1, std::min(std::min(32, by_threads), std::min(by_regs, by_smem)));
}

// Number of kernel launches since the library was loaded (the tests assert launch counts through it).
inline long& launch_count() {
  static long c = 0;
  return c;
}

// The shapes of the most recent launches (at most kLaunchLogCap; the tests check which kernel configuration ran):
// grid (x, y, z), threads per block, dynamic shared memory bytes.
struct LaunchRecord {
  unsigned grid_x, grid_y, grid_z, threads;
  size_t smem_bytes;
};
constexpr size_t kLaunchLogCap = 4096;
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

// Dynamic shared memory of the running launch (extern __shared__ in CUDA): one buffer, shared by the blocks,
// which run one after another. Filled with NaNs for every block, so a read before a write shows up.
inline std::vector<double>& dyn_smem_buf() {
  static std::vector<double> buf;
  return buf;
}
inline void* dyn_smem() { return dyn_smem_buf().data(); }

template <class F>
void launch(dim3 grid, dim3 block, F&& f, size_t smem_bytes = 0) {
  ++launch_count();
  auto& log = launch_log();
  if (log.size() >= kLaunchLogCap) log.erase(log.begin(), log.begin() + kLaunchLogCap / 2);
  log.push_back({grid.x, grid.y, grid.z, block.x * block.y * block.z, smem_bytes});
  const size_t smem_words = (smem_bytes + sizeof(double) - 1) / sizeof(double) + 2;
  Block b;
  b.nthreads = int(block.x * block.y * block.z);
  b.body = std::function<void()>(f);
  b.shfl.assign(size_t((b.nthreads + 31) / 32) * 32 * 8, 0);
  Block* saved = current();
  current() = &b;
  grid_dim() = grid;
  block_dim() = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx() = dim3(x, y, z);
        dyn_smem_buf().assign(smem_words, std::nan(""));
        run_block(b);
      }
  current() = saved;
}

}  // namespace wkd_emu

#define threadIdx (::wkd_emu::thread_idx())
#define blockIdx (::wkd_emu::block_idx())
#define blockDim (::wkd_emu::block_dim())
#define gridDim (::wkd_emu::grid_dim())

inline void __syncthreads() { ::wkd_emu::yield(::wkd_emu::kBlockBarrier); }
inline void __threadfence() {}

template <typename V>
V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
  wkd_emu::Block* b = wkd_emu::current();
  const int t = b->cur, w = t / 32, l = t % 32;
  std::memcpy(&b->shfl[(size_t(w) * 32 + l) * 8], &v, sizeof(V));
  wkd_emu::yield(wkd_emu::kWarpBarrier);
  V r;
  std::memcpy(&r, &b->shfl[(size_t(w) * 32 + (l ^ lane_mask)) * 8], sizeof(V));
  wkd_emu::yield(wkd_emu::kWarpBarrier);
  return r;
}

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
template <typename V>
V __ldcg(const V* p) {
  return *p;
}
