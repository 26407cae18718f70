// CPU emulation of the CUDA features varlen_attention.cu uses, so that the kernel source itself
// (not a re-implementation) can be run and checked on a machine without a GPU. Force-included
// before the .cu (g++ -include emu_shim.h -DVIRNUC_VARLEN_EMULATE). Each CUDA thread of a block is a
// fiber (ucontext) of one OS thread, switched only at the synchronisation points (__syncthreads,
// warp shuffles/ballots, ldmatrix, mma), so blocks run deterministically.
//
// Semantics follow the PTX ISA: ldmatrix .m8n8.x4 (lane l gives the row address of matrix l/8,
// row l%8; lane t receives row t/4, columns 2(t%4), 2(t%4)+1 of each matrix, or the transposed
// element pairs with .trans), mma.m16n8k16 row.col fragment layouts, and cp.async with groups that
// land only at cp.async.wait_group (so reading a buffer before its wait sees stale data), or with
// EMU_CP_ASYNC=eager at their commit (so overwriting a buffer still being prefetched shows).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include "varlen_attention_launch.h"  // AlibiSlopes: the kernels' last parameter

#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <deque>
#include <string>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one block at a time: one instance shared by its fibers
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

namespace emu {
struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
struct Copy {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};
struct Fiber {
  ucontext_t ctx;
  Dim tid;
  bool done = false;
  std::vector<Copy> open;               // cp.async since the last commit
  std::deque<std::vector<Copy>> groups;  // committed, not yet landed
  uint64_t slot[8];                     // warp exchange
};
inline std::vector<Fiber>* fibers = nullptr;
inline int current = 0;
inline ucontext_t scheduler;
inline Dim block_idx, block_dim;
inline unsigned long long block_gen = 0, block_count = 0;
inline std::vector<unsigned long long> warp_gen, warp_count;
// EMU_CP_ASYNC=eager: cp.async groups land at their commit instead of at the wait that retires
// them. Lazy landing (default) catches reads before the wait; eager landing catches writes into a
// buffer whose prefetch is still in flight. check.sh runs both.
inline bool eager_copies = false;

inline Fiber& me() { return (*fibers)[current]; }
inline void yield() { swapcontext(&me().ctx, &scheduler); }

inline void block_barrier() {
  const unsigned long long gen = block_gen;
  if (++block_count == fibers->size()) {
    block_count = 0;
    ++block_gen;
  } else {
    while (block_gen == gen) yield();
  }
}
inline int lane() { return static_cast<int>(me().tid.x % 32); }
inline int warp() { return static_cast<int>(me().tid.x / 32); }
inline void warp_barrier() {
  const int w = warp();
  const unsigned long long gen = warp_gen[w];
  if (++warp_count[w] == 32) {
    warp_count[w] = 0;
    ++warp_gen[w];
  } else {
    while (warp_gen[w] == gen) yield();
  }
}
inline Fiber& lane_fiber(int l) { return (*fibers)[warp() * 32 + l]; }
}  // namespace emu

#define threadIdx (emu::me().tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp() { emu::warp_barrier(); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline void __sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= 8, "scalar");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::me().slot[0] = bits;
  emu::warp_barrier();
  const uint64_t other = emu::lane_fiber(emu::lane() ^ mask).slot[0];
  emu::warp_barrier();
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}
inline unsigned __ballot_sync(unsigned, bool pred) {
  emu::me().slot[0] = pred ? 1 : 0;
  emu::warp_barrier();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= static_cast<unsigned>(emu::lane_fiber(l).slot[0]) << l;
  emu::warp_barrier();
  return r;
}

namespace virnuc {
inline void ldmatrix_impl(uint32_t (&r)[4], const void* p, bool trans) {
  emu::me().slot[0] = reinterpret_cast<uint64_t>(p);
  emu::warp_barrier();
  const int t = emu::lane();
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = trans ? 2 * (t % 4) + h : t / 4;
      const int col = trans ? t / 4 : 2 * (t % 4) + h;
      const auto* rowp = reinterpret_cast<const uint16_t*>(emu::lane_fiber(i * 8 + row).slot[0]);
      e[h] = rowp[col];
    }
    r[i] = e[0] | (static_cast<uint32_t>(e[1]) << 16);
  }
  emu::warp_barrier();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, true); }

template <typename T>
inline float emu_to_float(uint16_t b) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(b));
  } else {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
}

// c += a · b (m16n8k16, fp32 accumulation of exact 16-bit products).
template <typename T>
inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& s = emu::me().slot;
  for (int i = 0; i < 4; ++i) s[i] = a[i];
  s[4] = b0;
  s[5] = b1;
  emu::warp_barrier();
  float A[16][16];
  float B[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto& o = emu::lane_fiber(l).slot;
    const int g = l / 4;
    const int q = l % 4;
    for (int h = 0; h < 2; ++h) {
      auto el = [&](uint64_t reg) { return emu_to_float<T>(static_cast<uint16_t>(reg >> (16 * h))); };
      A[g][2 * q + h] = el(o[0]);
      A[g + 8][2 * q + h] = el(o[1]);
      A[g][2 * q + 8 + h] = el(o[2]);
      A[g + 8][2 * q + 8 + h] = el(o[3]);
      B[2 * q + h][g] = el(o[4]);
      B[2 * q + 8 + h][g] = el(o[5]);
    }
  }
  emu::warp_barrier();
  const int g = emu::lane() / 4;
  const int q = emu::lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0);
    const int col = 2 * q + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[e] = acc;
  }
}

template <int BYTES>
inline void cp_async(void* dst, const void* src, bool valid) {
  emu::me().open.push_back({dst, src, BYTES, valid});
}
template <int N>
inline void cp_async_wait() {
  auto& g = emu::me().groups;
  while (g.size() > static_cast<size_t>(N)) {
    for (const auto& c : g.front()) {
      if (c.valid) {
        std::memcpy(c.dst, c.src, c.bytes);
      } else {
        std::memset(c.dst, 0, c.bytes);
      }
    }
    g.pop_front();
  }
}
inline void cp_async_commit() {
  emu::me().groups.push_back(std::move(emu::me().open));
  emu::me().open.clear();
  if (emu::eager_copies) cp_async_wait<0>();
}
inline float ex2(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;  // .ftz
}
}  // namespace virnuc

namespace emu {
using virnuc::cp_async_commit;
using virnuc::cp_async_wait;
using Kernel = void (*)(const void*, const int*, const long long*, void*, int, int, int, float, int,
                        float, virnuc::varlen::AlibiSlopes);
struct LaunchArgs {
  Kernel k;
  const void* qkv;
  const int* cu;
  const long long* pos;
  void* out;
  int total, batch, heads;
  float scale;
  int rotary;
  float base;
  virnuc::varlen::AlibiSlopes alibi;
};
inline LaunchArgs* args = nullptr;
inline void fiber_main() {
  const LaunchArgs& a = *args;
  a.k(a.qkv, a.cu, a.pos, a.out, a.total, a.batch, a.heads, a.scale, a.rotary, a.base, a.alibi);
  // Pending cp.async groups of a thread that left land (as they would on the hardware).
  cp_async_commit();
  cp_async_wait<0>();
  me().done = true;
  swapcontext(&me().ctx, &scheduler);
}

// Runs every block of the grid, one after the other.
inline void launch(LaunchArgs a, unsigned gx, unsigned gy, unsigned threads) {
  args = &a;
  const char* mode = std::getenv("EMU_CP_ASYNC");
  eager_copies = mode != nullptr && std::string(mode) == "eager";
  std::vector<Fiber> fs(threads);
  fibers = &fs;
  // One stack per thread for the whole grid (allocating and zeroing 256 KiB per thread per block
  // took most of the emulator's time).
  std::vector<std::vector<char>> stacks(threads, std::vector<char>(1 << 18));
  block_dim = {threads, 1, 1};
  warp_gen.assign(threads / 32, 0);
  warp_count.assign(threads / 32, 0);
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      block_idx = {bx, by, 0};
      block_gen = block_count = 0;
      for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = fs[t];
        f = Fiber();
        f.tid = {t, 0, 0};
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[t].data();
        f.ctx.uc_stack.ss_size = stacks[t].size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
      }
      for (bool any = true; any;) {
        any = false;
        for (unsigned t = 0; t < threads; ++t) {
          if (fs[t].done) continue;
          any = true;
          current = static_cast<int>(t);
          swapcontext(&scheduler, &fs[t].ctx);
        }
      }
    }
  }
  fibers = nullptr;
}
}  // namespace emu
