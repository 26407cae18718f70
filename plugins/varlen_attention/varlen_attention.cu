// com.virnuc:VarlenAttention — the one CUDA kernel behind the ONNX Runtime CUDA custom op
// (runtime/cuda) and the TensorRT plugin (tensorrt/). Contract: README.md beside this file.
//
// Non-causal attention over packed sequences (`cu_seqlens`), rotary embedding fused into the loads
// of q and k, or ALiBi (contract version 2) added to the scores in registers. Flash-style: a block owns one tile of query rows of one sequence and one head, walks
// the key/value tiles of that sequence only, and keeps an online softmax, so memory is O(T).
//
// Grid sizing without `max_seqlen` on the host: sequence b owns the block slots
// [s_b, s_{b+1}) with s_b = floor(cu_seqlens[b] / BM) + b. Since
// s_{b+1} - s_b = floor(cu[b+1]/BM) - floor(cu[b]/BM) + 1 >= ceil(len_b / BM), every query tile of
// b has a slot, and the grid is floor(total_tokens / BM) + batch slots by num_heads. A block finds
// its sequence by a binary search over s_b (log2(batch) reads of cu_seqlens) and leaves at once if
// its slot is past the sequence's last tile. No workspace, no prefix pass, no host copy.
//
// Kernels (extern "C", one per mode, dtype and head dim, static shared memory < 48 KiB):
//   virnuc_varlen_attention_{f32,f16,bf16}_d{16,24,32,64,128}        rotary (rotary = 1) or none
//   virnuc_varlen_attention_alibi_{f32,f16,bf16}_d{16,24,32,64,128}  ALiBi (rotary code compiled out)
// Separate ALiBi entry points leave the rotary kernels' code and registers as they were (the fp16
// D = 64 and 128 ones sit near the register cap of two blocks an SM).
// Arguments: (qkv, cu_seqlens, position_ids, out, total_tokens, batch, num_heads, scale, rotary,
//   rotary_base, alibi) with `alibi` a virnuc::varlen::AlibiSlopes by value (one float per head;
//   read by the ALiBi kernels only). Grid: (total_tokens / BM + batch, num_heads). Block (threads, BM rows):
//   f16 D = 64: (128, 128); f16 D = 128: (64, 64) (32 query rows a warp, below);
//   f16 D <= 32 and bf16 D <= 64: (256, 128); bf16 D = 128: (128, 64); f32: (128, 32).
//   varlen_attention_launch.h (C++) and runtime/cuda (Rust) carry the same table.
//
// 16-bit types: tensor cores (mma.sync m16n8k16, fp32 accumulators), q·k, softmax and p·v in fp32.
// Tensor-core operands must be 16-bit, so rotated q/k and the probabilities p are rounded to the
// input type before the products. For fp16 that costs < 1e-3 relative. For bf16 (8-bit mantissa)
// it would cost about 2e-3, the contract's whole tolerance, so bf16 splits each rounded operand x
// into hi = bf16(x) and lo = bf16(x - hi) and adds the cross products (q·k: hi·hi + lo·hi + hi·lo
// when rotary is on, p·v: hi·v + lo·v): about 2.5x the tensor-core work of fp16, for an error
// of the order of the fp16 path's.
// fp32: plain fp32 FMA on CUDA cores (no TF32), 1e-5 relative.
//
// ALiBi: score = scale·q·k − slope_h·|i − j| (i, j offsets in the sequence). The bias enters the
// scores in registers right after q·k, as one FMA on |i − j| (an exact float: a row's offset minus a
// key's, both known per thread from the fragment layout), before the running maximum, so the online
// softmax is unchanged. No tables: no length limit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "varlen_attention_launch.h"  // AlibiSlopes, kMaxAlibiHeads

#define VIRNUC_VARLEN_ATTENTION_VERSION "2"

namespace virnuc {

// The 8-warp 16-bit kernel (bf16, and fp16 at D <= 32; fp16 at D = 64/128 runs attention_f16_v4):
// one warp per 16 query rows; 8 warps (128 rows) share each k/v tile, except at D = 128 where ~165
// registers a thread allow only 4 warps if two blocks are to fit an SM.
template <int D>
__host__ __device__ constexpr int warps16() {
  return D == 128 ? 4 : 8;
}
constexpr int kThreads32 = 128;  // fp32 kernel: 4 threads per query row
constexpr int kBlockM32 = 32;    // query rows per block, fp32 kernel

// ---------------------------------------------------------------------------------------------
// Shared by both kernels: where this block works, and the rotary frequencies.

struct Work {
  int start;  // first token of the sequence in the pack
  int len;    // tokens in the sequence
  int q0;     // first query row of this block's tile, relative to start
};

// Finds the sequence whose slot range holds blockIdx.x; false when the slot is unused.
__device__ __forceinline__ bool locate(const int* __restrict__ cu, int batch, int total, int bm,
                                       Work& w) {
  const int x = static_cast<int>(blockIdx.x);
  int lo = 0;
  int hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(cu + mid) / bm + mid <= x) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int start = __ldg(cu + lo);
  const int end = __ldg(cu + lo + 1);
  // Malformed cu_seqlens: write nothing rather than read or write out of bounds.
  if (start < 0 || end < start || end > total) return false;
  w.start = start;
  w.len = end - start;
  w.q0 = (x - (start / bm + lo)) * bm;
  return w.q0 >= 0 && w.q0 < w.len;
}

// inv_freq[i] = 1 / base ** (2i / D) in float32, the way HF's EsmRotaryEmbedding (and fair-esm, the
// exporter's reference graph and the CPU op) compute it: exponent 2i/D as a float32 division, the
// power rounded to float32 (evaluated in double here, so it is the correctly rounded value that
// glibc's powf also returns), then a float32 reciprocal.
template <int D>
__device__ __forceinline__ void rotary_frequencies(float* inv_freq, float base) {
  for (int i = static_cast<int>(threadIdx.x); i < D / 2; i += static_cast<int>(blockDim.x)) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(D);
    const float power = static_cast<float>(pow(static_cast<double>(base), static_cast<double>(exponent)));
    inv_freq[i] = 1.0f / power;
  }
}

// cos and sin of a float32 angle (|angle| up to ~1e5): two-step Cody–Waite reduction to
// [-pi, pi], then the hardware approximations (absolute error < 1e-6 there). Accurate sincosf
// would cost ~5x more and rotary is computed for every q and k element of every tile.
__device__ __forceinline__ void fast_sincos(float angle, float& s, float& c) {
  constexpr float kInv2Pi = 0.15915494309189535f;
  constexpr float k2PiHi = 6.28318548202514648f;     // float(2 pi)
  constexpr float k2PiLo = -1.74845553146951855e-7f;  // 2 pi - float(2 pi)
  const float k = rintf(angle * kInv2Pi);
  float r = fmaf(-k, k2PiHi, angle);
  r = fmaf(-k, k2PiLo, r);
  __sincosf(r, &s, &c);
}

// ---------------------------------------------------------------------------------------------
// 16-bit element helpers (storage as raw 16-bit words so shared arrays need no constructors).

template <typename T>
struct Half16;

template <>
struct Half16<__half> {
  __device__ __forceinline__ static float to_float(uint16_t b) {
    return __half2float(__ushort_as_half(b));
  }
  __device__ __forceinline__ static uint16_t from_float(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
};

template <>
struct Half16<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(uint16_t b) {
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
  }
  __device__ __forceinline__ static uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  return static_cast<uint32_t>(Half16<T>::from_float(a)) |
         (static_cast<uint32_t>(Half16<T>::from_float(b)) << 16);
}

// N 16-bit words (N = 4 or 8) loaded/stored in one 8- or 16-byte access.
template <int N>
__device__ __forceinline__ void load_vec(const uint16_t* p, uint16_t (&out)[N]) {
  static_assert(N == 4 || N == 8, "vector of 4 or 8");
  if constexpr (N == 8) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = static_cast<uint16_t>(w[i] & 0xffffu);
      out[2 * i + 1] = static_cast<uint16_t>(w[i] >> 16);
    }
  } else {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    const uint32_t w[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      out[2 * i] = static_cast<uint16_t>(w[i] & 0xffffu);
      out[2 * i + 1] = static_cast<uint16_t>(w[i] >> 16);
    }
  }
}

template <int N>
__device__ __forceinline__ void store_vec(uint16_t* p, const uint16_t (&in)[N]) {
  if constexpr (N == 8) {
    uint4 u;
    u.x = in[0] | (static_cast<uint32_t>(in[1]) << 16);
    u.y = in[2] | (static_cast<uint32_t>(in[3]) << 16);
    u.z = in[4] | (static_cast<uint32_t>(in[5]) << 16);
    u.w = in[6] | (static_cast<uint32_t>(in[7]) << 16);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
    uint2 u;
    u.x = in[0] | (static_cast<uint32_t>(in[1]) << 16);
    u.y = in[2] | (static_cast<uint32_t>(in[3]) << 16);
    *reinterpret_cast<uint2*>(p) = u;
  }
}

#ifndef VIRNUC_VARLEN_EMULATE  // (tools/gpu/varlen_attention/emulate: CPU versions)
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a · b, m16n8k16, fp32 accumulators (specialized for __half and __nv_bfloat16).
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1);

template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Loads R rows of q or k (D columns starting at `col`) into shared memory with rotary applied in
// fp32, rounded to T (hi) and optionally the rounding remainder (lo). Rows past `nvalid` are
// zeros. Either destination may be null.
template <typename T, int D, int R, int LDS>
__device__ __forceinline__ void load_qk(uint16_t* hi, uint16_t* lo, const uint16_t* qkv,
                                        long long row_stride, int col, int tok0, int nvalid,
                                        const long long* __restrict__ pos, const float* inv_freq,
                                        bool rotary) {
  constexpr int HALF = D / 2;
  constexpr int VEC = (HALF % 8 == 0) ? 8 : 4;
  constexpr int CH = HALF / VEC;
  for (int u = static_cast<int>(threadIdx.x); u < R * CH; u += static_cast<int>(blockDim.x)) {
    const int r = u / CH;
    const int c = (u % CH) * VEC;
    float x1[VEC];
    float x2[VEC];
    if (r < nvalid) {
      const uint16_t* src = qkv + static_cast<long long>(tok0 + r) * row_stride + col + c;
      uint16_t a[VEC];
      uint16_t b[VEC];
      load_vec<VEC>(src, a);
      load_vec<VEC>(src + HALF, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        x1[j] = Half16<T>::to_float(a[j]);
        x2[j] = Half16<T>::to_float(b[j]);
      }
      if (rotary) {
        const float p = static_cast<float>(__ldg(pos + tok0 + r));
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float s;
          float co;
          fast_sincos(__fmul_rn(p, inv_freq[c + j]), s, co);
          const float y1 = x1[j] * co - x2[j] * s;
          const float y2 = x2[j] * co + x1[j] * s;
          x1[j] = y1;
          x2[j] = y2;
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        x1[j] = 0.0f;
        x2[j] = 0.0f;
      }
    }
    uint16_t h1[VEC];
    uint16_t h2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      h1[j] = Half16<T>::from_float(x1[j]);
      h2[j] = Half16<T>::from_float(x2[j]);
    }
    if (hi != nullptr) {
      store_vec<VEC>(hi + r * LDS + c, h1);
      store_vec<VEC>(hi + r * LDS + c + HALF, h2);
    }
    if (lo != nullptr) {
      uint16_t l1[VEC];
      uint16_t l2[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        l1[j] = Half16<T>::from_float(x1[j] - Half16<T>::to_float(h1[j]));
        l2[j] = Half16<T>::from_float(x2[j] - Half16<T>::to_float(h2[j]));
      }
      store_vec<VEC>(lo + r * LDS + c, l1);
      store_vec<VEC>(lo + r * LDS + c + HALF, l2);
    }
  }
}

// Asynchronous global -> shared copies (sm_80+); a source size of 0 writes zeros (rows past the
// sequence's end) without reading global memory.
#ifndef VIRNUC_VARLEN_EMULATE  // (tools/gpu/varlen_attention/emulate: CPU versions)
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
  const uint32_t n = valid ? BYTES : 0;
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// Issues the copies of R rows x D columns (at `col`) into `dst`; rows past `nvalid` become zeros.
template <int D, int R, int LDS>
__device__ __forceinline__ void issue_rows(uint16_t* dst, const uint16_t* qkv, long long row_stride,
                                           int col, int tok0, int nvalid) {
  constexpr int VEC = (D % 8 == 0) ? 8 : 4;
  constexpr int CH = D / VEC;
  for (int u = static_cast<int>(threadIdx.x); u < R * CH; u += static_cast<int>(blockDim.x)) {
    const int r = u / CH;
    const int c = (u % CH) * VEC;
    const bool valid = r < nvalid;
    const uint16_t* src = valid ? qkv + static_cast<long long>(tok0 + r) * row_stride + col + c : qkv;
    cp_async<VEC * 2>(dst + r * LDS + c, src, valid);
  }
}

// Rotary from a raw k tile in shared memory into another (rows past `nvalid` written as zeros).
template <typename T, int D, int R, int LDS>
__device__ __forceinline__ void rotate_tile(uint16_t* dst, const uint16_t* src, int tok0, int nvalid,
                                            const long long* __restrict__ pos, const float* inv_freq) {
  constexpr int HALF = D / 2;
  constexpr int VEC = (HALF % 8 == 0) ? 8 : 4;
  constexpr int CH = HALF / VEC;
  for (int u = static_cast<int>(threadIdx.x); u < R * CH; u += static_cast<int>(blockDim.x)) {
    const int r = u / CH;
    const int c = (u % CH) * VEC;
    uint16_t h1[VEC];
    uint16_t h2[VEC];
    if (r < nvalid) {
      uint16_t a[VEC];
      uint16_t b[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        a[j] = src[r * LDS + c + j];
        b[j] = src[r * LDS + c + HALF + j];
      }
      const float p = static_cast<float>(__ldg(pos + tok0 + r));
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float x1 = Half16<T>::to_float(a[j]);
        const float x2 = Half16<T>::to_float(b[j]);
        float sn;
        float co;
        fast_sincos(__fmul_rn(p, inv_freq[c + j]), sn, co);
        h1[j] = Half16<T>::from_float(x1 * co - x2 * sn);
        h2[j] = Half16<T>::from_float(x2 * co + x1 * sn);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        h1[j] = 0;
        h2[j] = 0;
      }
    }
    store_vec<VEC>(dst + r * LDS + c, h1);
    store_vec<VEC>(dst + r * LDS + c + HALF, h2);
  }
}

// Loads R rows of v (D columns at `col`), rows past `nvalid` zero.
template <int D, int R, int LDS>
__device__ __forceinline__ void load_v(uint16_t* dst, const uint16_t* qkv, long long row_stride,
                                       int col, int tok0, int nvalid) {
  constexpr int VEC = (D % 8 == 0) ? 8 : 4;
  constexpr int CH = D / VEC;
  for (int u = static_cast<int>(threadIdx.x); u < R * CH; u += static_cast<int>(blockDim.x)) {
    const int r = u / CH;
    const int c = (u % CH) * VEC;
    uint16_t a[VEC];
    if (r < nvalid) {
      load_vec<VEC>(qkv + static_cast<long long>(tok0 + r) * row_stride + col + c, a);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) a[j] = 0;
    }
    store_vec<VEC>(dst + r * LDS + c, a);
  }
}

// ALIBI: score −= slope · |i − j| (rotary compiled out); `slope` is this block's head's.
template <typename T, int D, bool ALIBI>
__device__ __forceinline__ void attention_16bit(const uint16_t* __restrict__ qkv,
                                                const int* __restrict__ cu,
                                                const long long* __restrict__ pos,
                                                uint16_t* __restrict__ out, int total, int batch,
                                                int heads, float scale, int rotary_flag,
                                                float base, float slope) {
  constexpr int WARPS = warps16<D>();
  constexpr int THREADS = WARPS * 32;
  constexpr int BM = WARPS * 16;
  constexpr int BN = D <= 64 ? 64 : 32;  // keys per tile; 32 at D=128 keeps shared memory < 48 KiB
  constexpr int DP = (D + 15) / 16 * 16;  // k-dimension padded to the mma's 16
  constexpr int LDS = DP + 8;             // +16 bytes a row: conflict-free ldmatrix
  constexpr int KSTEPS = DP / 16;
  constexpr int NT = BN / 8;
  constexpr int DT = DP / 8;
  constexpr bool SPLIT = sizeof(T) == 2 && !__is_same(T, __half);  // bf16: hi/lo operands
  static_assert(DT % 2 == 0 && NT % 2 == 0, "tiles come in pairs for ldmatrix.x4");

  // q is needed in shared memory only before the key loop (to build its register fragments) and
  // after it (to stage the output), so the k/v tiles share its space: with the same row stride,
  // the zero padding columns of the rows coincide.
  // fp16: k/v tiles double-buffered with cp.async (the next tile's loads overlap this tile's
  // math): raw k x2, v x2, rotated k. bf16 (whose split operands need more room) loads
  // synchronously: k, v, k lo.
  constexpr bool PIPE = !SPLIT;
  constexpr int KV = (PIPE ? 5 : SPLIT ? 3 : 2) * BN * LDS;
  constexpr int SMEM = BM * LDS > KV ? BM * LDS : KV;
  __shared__ __align__(16) uint16_t smem[SMEM];
  __shared__ float inv_freq[D / 2];
  uint16_t* const sQ = smem;
  uint16_t* const sK = smem;  // rotated (PIPE) or loaded (not PIPE) k
  uint16_t* const sV = smem + BN * LDS;
  uint16_t* const sKlo = smem + 2 * BN * LDS;
  // PIPE buffers: raw k at [1 + buf], v at [3 + buf] tiles from the start.
  uint16_t* const sKraw = smem + BN * LDS;
  uint16_t* const sVbuf = smem + 3 * BN * LDS;

  Work w;
  if (!locate(cu, batch, total, BM, w)) return;
  const bool rotary = !ALIBI && rotary_flag != 0;
  const int head = static_cast<int>(blockIdx.y);
  const long long row_stride = 3LL * heads * D;
  const int qcol = head * D;
  const int kcol = heads * D + head * D;
  const int vcol = 2 * heads * D + head * D;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  // ALiBi in the exp2 domain of the softmax below: s·sl2 − |i − j|·slope·log2 e.
  [[maybe_unused]] const float slope_l2 = slope * 1.4426950408889634f;
  // Offset in the sequence of this thread's first query row minus that of its first key column
  // (fragment layout below: rows lane/4 and lane/4 + 8 of the warp's 16, keys j·8 + (lane%4)·2 + e&1).
  [[maybe_unused]] const int rel0 = w.q0 + warp * 16 + lane / 4 - (lane % 4) * 2;

  // Zero everything once: the padded columns D..DP must be zero for the q·k products.
  for (int i = tid; i < SMEM; i += THREADS) smem[i] = 0;
  if (rotary) rotary_frequencies<D>(inv_freq, base);
  __syncthreads();

  const int nq = min(BM, w.len - w.q0);
  load_qk<T, D, BM, LDS>(sQ, nullptr, qkv, row_stride, qcol, w.start + w.q0, nq, pos, inv_freq,
                         rotary);
  __syncthreads();

  // q fragments stay in registers for the whole key loop.
  uint32_t qa[KSTEPS][4];
  uint32_t qlo[SPLIT ? KSTEPS : 1][4];
  {
    const uint16_t* base_ptr = sQ + (warp * 16 + (lane % 16)) * LDS + (lane / 16) * 8;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) ldmatrix_x4(qa[ks], base_ptr + ks * 16);
  }
  if constexpr (SPLIT) {
    if (rotary) {
      __syncthreads();
      load_qk<T, D, BM, LDS>(nullptr, sQ, qkv, row_stride, qcol, w.start + w.q0, nq, pos,
                             inv_freq, rotary);
      __syncthreads();
      const uint16_t* base_ptr = sQ + (warp * 16 + (lane % 16)) * LDS + (lane / 16) * 8;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) ldmatrix_x4(qlo[ks], base_ptr + ks * 16);
    }
  }

  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[d][e] = 0.0f;
  }
  float m0 = -INFINITY;
  float m1 = -INFINITY;
  float l0 = 0.0f;
  float l1 = 0.0f;
  const float sl2 = scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2 e)
  const bool active = warp * 16 < nq;

  if constexpr (PIPE) {
    __syncthreads();  // q fragments read: the buffers alias sQ
    issue_rows<D, BN, LDS>(sKraw, qkv, row_stride, kcol, w.start, min(BN, w.len));
    issue_rows<D, BN, LDS>(sVbuf, qkv, row_stride, vcol, w.start, min(BN, w.len));
    cp_async_commit();
  }
  for (int kv0 = 0, tile = 0; kv0 < w.len; kv0 += BN, ++tile) {
    const int nk = min(BN, w.len - kv0);
    const uint16_t* kt = sK;
    const uint16_t* vt = sV;
    __syncthreads();  // previous tile fully consumed (and q fragments read)
    if constexpr (PIPE) {
      const int buf = tile & 1;
      const int next = kv0 + BN;
      if (next < w.len) {  // prefetch the next tile into the other buffer
        const int nn = min(BN, w.len - next);
        issue_rows<D, BN, LDS>(sKraw + (buf ^ 1) * BN * LDS, qkv, row_stride, kcol, w.start + next, nn);
        issue_rows<D, BN, LDS>(sVbuf + (buf ^ 1) * BN * LDS, qkv, row_stride, vcol, w.start + next, nn);
      }
      cp_async_commit();
      cp_async_wait<1>();  // this tile's group has landed
      __syncthreads();
      vt = sVbuf + buf * BN * LDS;
      if (rotary) {
        rotate_tile<T, D, BN, LDS>(sK, sKraw + buf * BN * LDS, w.start + kv0, nk, pos, inv_freq);
        __syncthreads();
      } else {
        kt = sKraw + buf * BN * LDS;
      }
    } else {
      load_qk<T, D, BN, LDS>(sK, (SPLIT && rotary) ? sKlo : nullptr, qkv, row_stride, kcol,
                             w.start + kv0, nk, pos, inv_freq, rotary);
      load_v<D, BN, LDS>(sV, qkv, row_stride, vcol, w.start + kv0, nk);
      __syncthreads();
    }
    // Warps whose 16 rows are all past the sequence's end only help with the loads.
    if (!active) continue;

    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        const int off = (j * 8 + (lane % 8) + (lane / 16) * 8) * LDS + ks * 16 + ((lane / 8) & 1) * 8;
        uint32_t b[4];
        ldmatrix_x4(b, kt + off);
        mma<T>(s[j], qa[ks], b[0], b[1]);
        mma<T>(s[j + 1], qa[ks], b[2], b[3]);
        if constexpr (SPLIT) {
          if (rotary) {
            mma<T>(s[j], qlo[ks], b[0], b[1]);
            mma<T>(s[j + 1], qlo[ks], b[2], b[3]);
            uint32_t bl[4];
            ldmatrix_x4(bl, sKlo + off);
            mma<T>(s[j], qa[ks], bl[0], bl[1]);
            mma<T>(s[j + 1], qa[ks], bl[2], bl[3]);
          }
        }
      }
    }

    // Online softmax. This thread holds rows lane/4 (e = 0, 1) and lane/4 + 8 (e = 2, 3).
    float mx0 = -INFINITY;
    float mx1 = -INFINITY;
    [[maybe_unused]] const float rel = static_cast<float>(rel0 - kv0);  // exact: |offsets| < 2^24
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = j * 8 + (lane % 4) * 2 + (e & 1);
        if constexpr (ALIBI) {
          const float dist = fabsf(rel + static_cast<float>((e >> 1) * 8 - j * 8 - (e & 1)));
          s[j][e] = key < nk ? fmaf(-slope_l2, dist, s[j][e] * sl2) : -INFINITY;
        } else {
          s[j][e] = key < nk ? s[j][e] * sl2 : -INFINITY;
        }
      }
      mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // Key 0 of every tile is valid, so the new maxima are finite.
    const float n0 = fmaxf(m0, mx0);
    const float n1 = fmaxf(m1, mx1);
    const float c0 = exp2f(m0 - n0);
    const float c1 = exp2f(m1 - n1);
    m0 = n0;
    m1 = n1;
    float r0 = 0.0f;
    float r1 = 0.0f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] = exp2f(s[j][0] - n0);
      s[j][1] = exp2f(s[j][1] - n0);
      s[j][2] = exp2f(s[j][2] - n1);
      s[j][3] = exp2f(s[j][3] - n1);
      r0 += s[j][0] + s[j][1];
      r1 += s[j][2] + s[j][3];
    }
    l0 = l0 * c0 + r0;  // partial over this thread's columns; reduced across the quad at the end
    l1 = l1 * c1 + r1;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[d][0] *= c0;
      o[d][1] *= c0;
      o[d][2] *= c1;
      o[d][3] *= c1;
    }

    // o += p · v; the S accumulator layout of two key tiles is the A fragment of one k-step.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      uint32_t plo[4];
      if constexpr (SPLIT) {
        const float* f[4] = {&s[2 * kk][0], &s[2 * kk][2], &s[2 * kk + 1][0], &s[2 * kk + 1][2]};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float a = f[i][0];
          const float b = f[i][1];
          const float ah = Half16<T>::to_float(static_cast<uint16_t>(pa[i] & 0xffffu));
          const float bh = Half16<T>::to_float(static_cast<uint16_t>(pa[i] >> 16));
          plo[i] = pack2<T>(a - ah, b - bh);
        }
      }
#pragma unroll
      for (int d = 0; d < DT; d += 2) {
        const uint16_t* p =
            vt + (kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8) * LDS + d * 8 + (lane / 16) * 8;
        uint32_t b[4];
        ldmatrix_x4_trans(b, p);
        mma<T>(o[d], pa, b[0], b[1]);
        mma<T>(o[d + 1], pa, b[2], b[3]);
        if constexpr (SPLIT) {
          mma<T>(o[d], plo, b[0], b[1]);
          mma<T>(o[d + 1], plo, b[2], b[3]);
        }
      }
    }
  }

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float i0 = 1.0f / l0;
  const float i1 = 1.0f / l1;

  // Stage the tile in shared memory (sQ is free) for 16-byte coalesced stores.
  if constexpr (PIPE) cp_async_wait<0>();
  __syncthreads();
  {
    const int row = warp * 16 + lane / 4;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      const int col = d * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(sQ + row * LDS + col) = pack2<T>(o[d][0] * i0, o[d][1] * i0);
      *reinterpret_cast<uint32_t*>(sQ + (row + 8) * LDS + col) =
          pack2<T>(o[d][2] * i1, o[d][3] * i1);
    }
  }
  __syncthreads();
  {
    constexpr int VEC = (D % 8 == 0) ? 8 : 4;
    constexpr int CH = D / VEC;
    const long long out_stride = static_cast<long long>(heads) * D;
    for (int u = tid; u < nq * CH; u += THREADS) {
      const int r = u / CH;
      const int c = (u % CH) * VEC;
      uint16_t v[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = sQ[r * LDS + c + j];
      store_vec<VEC>(out + static_cast<long long>(w.start + w.q0 + r) * out_stride + qcol + c, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fp16 at head_dim 64 and 128 ("v4"): 32 query rows a warp, as two m16 tiles (rows w*16 and
// BM/2 + w*16 of the block's BM), so every k and v fragment a warp loads from shared memory with
// ldmatrix feeds two mma instead of one. The 8-warp kernel above (bf16, and fp16 at D <= 32) issues
// one ldmatrix.x4 (512 bytes) per two m16n8k16 mma, which at 128 bytes a clock of shared memory
// bandwidth an SM caps the tensor cores near half their mma.sync rate; 32 rows a warp halve that
// traffic per FLOP (as FlashAttention-2 does with its 4 warps over 128 rows). Softmax on raw
// scores with the scale folded into one FFMA before ex2.approx (the max taken on raw scores, so a
// negative scale is folded into q's sign instead, which is exact); key masking only on the last,
// partial tile. D = 64: 4 warps, 128 threads over 128 rows; D = 128: 2 warps, 64 threads over 64
// rows: the same grids as the 8-warp kernel would have (BM = 128 and 64), two blocks an SM.
template <typename T, int D>
__host__ __device__ constexpr bool use_v4() {
  return __is_same(T, __half) && (D == 64 || D == 128);
}
// Warps a block: 4 (128 query rows) at D = 64; 2 (64 rows, 64 threads) at D = 128, where the
// o accumulators of two m16 tiles take 128 registers, so that key tiles of 32 rows keep shared
// memory under 48 KiB with the same slot layout (q = two key tiles) and the grid stays BM = 64.
template <int D>
__host__ __device__ constexpr int v4_warps() {
  return D == 128 ? 2 : 4;
}

// Threads of the 16-bit kernel for T and D (varlen_attention_launch.h mirrors it).
template <typename T, int D>
__host__ __device__ constexpr int threads16() {
  return use_v4<T, D>() ? v4_warps<D>() * 32 : warps16<D>() * 32;
}

#ifndef VIRNUC_VARLEN_EMULATE  // (tools/gpu/varlen_attention/emulate: CPU versions)
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#endif

// Two floats rounded to one f16x2 register (a in the low half: the mma fragments' order).
__device__ __forceinline__ uint32_t half2_bits(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// locate() with a 32-ary search by each warp instead of a binary search by each thread: the
// predicate "slot start s_b = cu[b] / bm + b <= blockIdx.x" holds for a prefix of b (s_0 = 0), so
// each round lets 32 lanes probe 32 evenly spaced b and keeps the stretch between the last true
// and the first false probe: one round of coalesced loads up to 32 sequences, two up to 1024,
// where the binary search waits on log2(batch) dependent loads before any other load can start.
// Same result as locate() for valid cu_seqlens (and the same bounds checks for invalid ones).
__device__ __forceinline__ bool locate_warp(const int* __restrict__ cu, int batch, int total, int bm,
                                            Work& w) {
  const int x = static_cast<int>(blockIdx.x);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  int lo = 0;          // the predicate holds at lo
  int hi = batch - 1;  // the answer is in [lo, hi]
  while (lo < hi) {
    const int step = (hi - lo + 31) / 32;  // probes lo + step, lo + 2 step, ..., up to hi
    const int b = lo + (lane + 1) * step;
    const bool in = b <= hi && __ldg(cu + b) / bm + b <= x;
    const int c = __popc(__ballot_sync(0xffffffffu, in));  // leading probes that hold
    lo += c * step;
    hi = min(hi, lo + step - 1);
  }
  const int start = __ldg(cu + lo);
  const int end = __ldg(cu + lo + 1);
  if (start < 0 || end < start || end > total) return false;
  w.start = start;
  w.len = end - start;
  w.q0 = (x - (start / bm + lo)) * bm;
  return w.q0 >= 0 && w.q0 < w.len;
}

// One key/value tile through the first MT (1 or 2) of this warp's m16 tiles; PARTIAL: the
// sequence's last tile with nk < BN valid keys (a template argument, so that the full tiles' body
// has no branch splitting it for the scheduler). Fragment layouts as
// in attention_16bit: this thread holds rows lane/4 (e = 0, 1) and lane/4 + 8 (e = 2, 3) of each
// m16 tile, keys j*8 + (lane%4)*2 + (e&1). m: running max of log2e-scaled scores; l: this
// thread's partial row sums (quad-reduced at the end).
// QR: m16 tiles whose q fragments are in registers (qa); with QR = 1 the second tile's are loaded
// from shared memory at q1 (this lane's ldmatrix address) for each k-step, sign-flipped by `sign`.
// ALIBI: the scores get −slope·|i − j| (in the exp2 domain: slope_l2 = slope·log2 e) before the
// maximum; `rel` is this thread's first query row offset minus its first key offset (the second m16
// tile's rows are BN further: HM = BN).
template <int MT, bool PARTIAL, int QR, int D, int BN, int LDS, bool ALIBI>
__device__ __forceinline__ void v4_tile(const uint32_t (&qa)[QR][D / 16][4], const uint16_t* q1,
                                        uint32_t sign, float (&o)[2][D / 8][4], float (&m)[2][2],
                                        float (&l)[2][2], const uint16_t* kt, const uint16_t* vt,
                                        int nk, float sl2, int lane, float rel, float slope_l2) {
  constexpr int KSTEPS = D / 16;
  constexpr int NT = BN / 8;
  constexpr int DT = D / 8;
  float s[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][j][e] = 0.0f;
    }
  }
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    uint32_t a1[4];  // the second tile's q fragment when it is not kept in registers
    if constexpr (MT == 2 && QR == 1) {
      ldmatrix_x4(a1, q1 + ks * 16);
#pragma unroll
      for (int e = 0; e < 4; ++e) a1[e] ^= sign;
    }
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      const int off = (j * 8 + (lane % 8) + (lane / 16) * 8) * LDS + ks * 16 + ((lane / 8) & 1) * 8;
      uint32_t b[4];
      ldmatrix_x4(b, kt + off);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        if (QR == 1 && i == 1) {
          mma<__half>(s[i][j], a1, b[0], b[1]);
          mma<__half>(s[i][j + 1], a1, b[2], b[3]);
        } else {
          mma<__half>(s[i][j], qa[i < QR ? i : 0][ks], b[0], b[1]);
          mma<__half>(s[i][j + 1], qa[i < QR ? i : 0][ks], b[2], b[3]);
        }
      }
    }
  }
  // ALiBi: scaled scores with the bias, then a unit scale below (before the mask, so that masked
  // keys are -inf whatever the scale).
  if constexpr (ALIBI) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float dist = fabsf(rel + static_cast<float>(i * BN + (e >> 1) * 8 - j * 8 - (e & 1)));
          s[i][j][e] = fmaf(-slope_l2, dist, s[i][j][e] * sl2);
        }
      }
    }
  }
  const float k2 = ALIBI ? 1.0f : sl2;  // the scale still to apply
  if constexpr (PARTIAL) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (j * 8 + (lane % 4) * 2 + (e & 1) >= nk) s[i][j][e] = -INFINITY;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    float mx0 = -INFINITY;
    float mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      mx0 = fmaxf(mx0, fmaxf(s[i][j][0], s[i][j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[i][j][2], s[i][j][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // Key 0 of every tile is valid, so the maxima are finite; k2 >= 0, so scaling keeps the max.
    const float n0 = fmaxf(m[i][0], mx0 * k2);
    const float n1 = fmaxf(m[i][1], mx1 * k2);
    const float c0 = ex2(m[i][0] - n0);  // 0 on the first tile (m = -inf)
    const float c1 = ex2(m[i][1] - n1);
    m[i][0] = n0;
    m[i][1] = n1;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[i][j][0] = ex2(fmaf(s[i][j][0], k2, -n0));
      s[i][j][1] = ex2(fmaf(s[i][j][1], k2, -n0));
      s[i][j][2] = ex2(fmaf(s[i][j][2], k2, -n1));
      s[i][j][3] = ex2(fmaf(s[i][j][3], k2, -n1));
    }
    if constexpr (PARTIAL) {  // -inf · 0 is NaN when scale = 0: masked keys are zeroed explicitly
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (j * 8 + (lane % 4) * 2 + (e & 1) >= nk) s[i][j][e] = 0.0f;
        }
      }
    }
    float r0 = 0.0f;
    float r1 = 0.0f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      r0 += s[i][j][0] + s[i][j][1];
      r1 += s[i][j][2] + s[i][j][3];
    }
    l[i][0] = l[i][0] * c0 + r0;
    l[i][1] = l[i][1] * c1 + r1;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[i][d][0] *= c0;
      o[i][d][1] *= c0;
      o[i][d][2] *= c1;
      o[i][d][3] *= c1;
    }
  }
  // o += p · v: the S accumulators of two key tiles are the A fragment of one k-step; each v
  // fragment serves both m16 tiles.
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t pa[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      pa[i][0] = half2_bits(s[i][2 * kk][0], s[i][2 * kk][1]);
      pa[i][1] = half2_bits(s[i][2 * kk][2], s[i][2 * kk][3]);
      pa[i][2] = half2_bits(s[i][2 * kk + 1][0], s[i][2 * kk + 1][1]);
      pa[i][3] = half2_bits(s[i][2 * kk + 1][2], s[i][2 * kk + 1][3]);
    }
#pragma unroll
    for (int d = 0; d < DT; d += 2) {
      const uint16_t* p =
          vt + (kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8) * LDS + d * 8 + (lane / 16) * 8;
      uint32_t b[4];
      ldmatrix_x4_trans(b, p);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        mma<__half>(o[i][d], pa[i], b[0], b[1]);
        mma<__half>(o[i][d + 1], pa[i], b[2], b[3]);
      }
    }
  }
}

template <int D, bool ALIBI>
__device__ __forceinline__ void attention_f16_v4(const uint16_t* __restrict__ qkv,
                                                 const int* __restrict__ cu,
                                                 const long long* __restrict__ pos,
                                                 uint16_t* __restrict__ out, int total, int batch,
                                                 int heads, float scale, int rotary_flag,
                                                 float base, float slope) {
  using T = __half;
  constexpr int THREADS = v4_warps<D>() * 32;
  constexpr int BM = v4_warps<D>() * 32;  // warps x 2 m16 tiles
  constexpr int HM = BM / 2;              // rows of a warp's second m16 tile start HM further
  constexpr int BN = BM / 2;              // 64 keys a tile at D = 64, 32 at D = 128
  constexpr int LDS = D + 8;  // +16 bytes a row: conflict-free ldmatrix
  constexpr int KSTEPS = D / 16;
  constexpr int DT = D / 8;
  static_assert(D % 16 == 0, "no padded columns: shared memory need not be zeroed");
  static_assert(threads16<T, D>() == THREADS, "launch geometry");
  // Five tiles of BN rows: slots 0-1 hold q until its fragments are in registers, then raw k of
  // odd tiles (slot 0) and rotated k (slot 1); raw k of even tiles in slot 2, v in slots 3 + tile&1.
  // So q and the first k/v tile are all in flight at once (cp.async) right after locate.
  // D = 128 (registers): the second m16 tiles' q stays in slot 1 and is read there for each tile;
  // k is rotated in place in its raw buffer instead.
  constexpr int QR = D == 128 ? 1 : 2;
  constexpr int TILE = BN * LDS;
  static_assert(BM == 2 * BN, "q fills slots 0-1");
  static_assert(HM == BN, "v4_tile's ALiBi offsets: the second m16 tile's rows are BN further");
  constexpr int SMEM = 5 * TILE;
  __shared__ __align__(16) uint16_t smem[SMEM];
  __shared__ float inv_freq[D / 2];
  uint16_t* const sQ = smem;
  uint16_t* const sK = smem + TILE;  // rotated k
  auto kraw = [&](int buf) { return smem + (buf == 0 ? 2 : 0) * TILE; };
  auto vbuf = [&](int buf) { return smem + (3 + buf) * TILE; };

  Work w;
  if (!locate_warp(cu, batch, total, BM, w)) return;
  const bool rotary = !ALIBI && rotary_flag != 0;
  const int head = static_cast<int>(blockIdx.y);
  const long long row_stride = 3LL * heads * D;
  const int qcol = head * D;
  const int kcol = heads * D + head * D;
  const int vcol = 2 * heads * D + head * D;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;

  const int nq = min(BM, w.len - w.q0);
  issue_rows<D, BM, LDS>(sQ, qkv, row_stride, qcol, w.start + w.q0, nq);  // rows past nq: zeros
  issue_rows<D, BN, LDS>(kraw(0), qkv, row_stride, kcol, w.start, min(BN, w.len));
  issue_rows<D, BN, LDS>(vbuf(0), qkv, row_stride, vcol, w.start, min(BN, w.len));
  cp_async_commit();
  if (rotary) rotary_frequencies<D>(inv_freq, base);
  cp_async_wait<0>();
  __syncthreads();
  if (rotary) {  // in place: each thread reads and writes only its own elements
    rotate_tile<T, D, BM, LDS>(sQ, sQ, w.start + w.q0, nq, pos, inv_freq);
    __syncthreads();
  }

  // q fragments of both m16 tiles stay in registers for the whole key loop (rows past nq are 0).
  uint32_t qa[QR][KSTEPS][4];
  const uint32_t sign = scale < 0.0f ? 0x80008000u : 0u;  // softmax(s·q·k) = softmax(|s|·(−q)·k)
  const uint16_t* const q1 = sQ + (HM + warp * 16 + (lane % 16)) * LDS + (lane / 16) * 8;
#pragma unroll
  for (int i = 0; i < QR; ++i) {
    const uint16_t* base_ptr = sQ + (i * HM + warp * 16 + (lane % 16)) * LDS + (lane / 16) * 8;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      ldmatrix_x4(qa[i][ks], base_ptr + ks * 16);
#pragma unroll
      for (int e = 0; e < 4; ++e) qa[i][ks][e] ^= sign;
    }
  }
  const float sl2 = fabsf(scale) * 1.4426950408889634f;  // exp(x) = exp2(x · log2 e)
  // m16 tiles of this warp holding rows of the sequence (the second one's rows are HM further).
  const int mtiles = (warp * 16 < nq ? 1 : 0) + (HM + warp * 16 < nq ? 1 : 0);
  // ALiBi: the first query row offset of this thread minus its first key offset, at kv0 = 0.
  const int rel0 = w.q0 + warp * 16 + lane / 4 - (lane % 4) * 2;
  const float slope_l2 = slope * 1.4426950408889634f;

  float o[2][DT][4];
  float m[2][2];
  float l[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int d = 0; d < DT; ++d) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][d][e] = 0.0f;
    }
    m[i][0] = m[i][1] = -INFINITY;
    l[i][0] = l[i][1] = 0.0f;
  }

  for (int kv0 = 0, tile = 0; kv0 < w.len; kv0 += BN, ++tile) {
    const int nk = min(BN, w.len - kv0);
    const int buf = tile & 1;
    __syncthreads();  // previous tile fully consumed (tile 0: q fragments read, slots 0-1 free)
    const int next = kv0 + BN;
    if (next < w.len) {  // prefetch the next tile into the other buffers
      const int nn = min(BN, w.len - next);
      issue_rows<D, BN, LDS>(kraw(buf ^ 1), qkv, row_stride, kcol, w.start + next, nn);
      issue_rows<D, BN, LDS>(vbuf(buf ^ 1), qkv, row_stride, vcol, w.start + next, nn);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group has landed (tile 0: the prologue's)
    __syncthreads();
    const uint16_t* kt = kraw(buf);
    const uint16_t* vt = vbuf(buf);
    if (rotary) {
      if constexpr (QR == 2) {
        rotate_tile<T, D, BN, LDS>(sK, kt, w.start + kv0, nk, pos, inv_freq);
        kt = sK;
      } else {  // in place (slot 1 keeps q)
        rotate_tile<T, D, BN, LDS>(kraw(buf), kt, w.start + kv0, nk, pos, inv_freq);
      }
      __syncthreads();
    }
    // Warp- and block-uniform branches: whole-tile bodies without control flow inside.
    const float rel = static_cast<float>(rel0 - kv0);  // exact: |offsets| < 2^24
    if (nk == BN) {
      if (mtiles == 2) {
        v4_tile<2, false, QR, D, BN, LDS, ALIBI>(qa, q1, sign, o, m, l, kt, vt, nk, sl2, lane, rel, slope_l2);
      } else if (mtiles == 1) {
        v4_tile<1, false, QR, D, BN, LDS, ALIBI>(qa, q1, sign, o, m, l, kt, vt, nk, sl2, lane, rel, slope_l2);
      }
    } else {
      if (mtiles == 2) {
        v4_tile<2, true, QR, D, BN, LDS, ALIBI>(qa, q1, sign, o, m, l, kt, vt, nk, sl2, lane, rel, slope_l2);
      } else if (mtiles == 1) {
        v4_tile<1, true, QR, D, BN, LDS, ALIBI>(qa, q1, sign, o, m, l, kt, vt, nk, sl2, lane, rel, slope_l2);
      }
    }
  }

  // Stage the tile in shared memory (sQ is free) for 16-byte coalesced stores.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l0 = l[i][0];
    float l1 = l[i][1];
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;  // 0: an m16 tile past the sequence's end
    const float i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int row = i * HM + warp * 16 + lane / 4;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      const int col = d * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(sQ + row * LDS + col) = half2_bits(o[i][d][0] * i0, o[i][d][1] * i0);
      *reinterpret_cast<uint32_t*>(sQ + (row + 8) * LDS + col) =
          half2_bits(o[i][d][2] * i1, o[i][d][3] * i1);
    }
  }
  __syncthreads();
  {
    constexpr int VEC = 8;
    constexpr int CH = D / VEC;
    const long long out_stride = static_cast<long long>(heads) * D;
    for (int u = tid; u < nq * CH; u += THREADS) {
      const int r = u / CH;
      const int c = (u % CH) * VEC;
      const uint4 v = *reinterpret_cast<const uint4*>(sQ + r * LDS + c);
      *reinterpret_cast<uint4*>(out + static_cast<long long>(w.start + w.q0 + r) * out_stride + qcol + c) = v;
    }
  }
}

// The 16-bit entry: fp16 at D = 64/128 the 32-rows-a-warp kernel above, else the 8-warp (4 at
// D = 128) kernel.
template <typename T, int D, bool ALIBI>
__device__ __forceinline__ void attention_16bit_entry(const uint16_t* __restrict__ qkv,
                                                      const int* __restrict__ cu,
                                                      const long long* __restrict__ pos,
                                                      uint16_t* __restrict__ out, int total,
                                                      int batch, int heads, float scale,
                                                      int rotary_flag, float base, float slope) {
  if constexpr (use_v4<T, D>()) {
    attention_f16_v4<D, ALIBI>(qkv, cu, pos, out, total, batch, heads, scale, rotary_flag, base,
                               slope);
  } else {
    attention_16bit<T, D, ALIBI>(qkv, cu, pos, out, total, batch, heads, scale, rotary_flag, base,
                                 slope);
  }
}


// ---------------------------------------------------------------------------------------------
// fp32: CUDA-core FMA. 32 query rows a block, 4 threads a row (a quad of one warp), so the
// softmax of a row and its p·v never need a block barrier.

template <int R, int D, int LDS>
__device__ __forceinline__ void load_qk_f32(float* dst, const float* qkv, long long row_stride,
                                            int col, int tok0, int nvalid,
                                            const long long* __restrict__ pos,
                                            const float* inv_freq, bool rotary) {
  constexpr int HALF = D / 2;
  constexpr int VEC = 4;
  constexpr int CH = HALF / VEC;
  static_assert(HALF % VEC == 0, "D/2 must be a multiple of 4");
  for (int u = static_cast<int>(threadIdx.x); u < R * CH; u += static_cast<int>(blockDim.x)) {
    const int r = u / CH;
    const int c = (u % CH) * VEC;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    float4 b = a;
    if (r < nvalid) {
      const float* src = qkv + static_cast<long long>(tok0 + r) * row_stride + col + c;
      a = __ldg(reinterpret_cast<const float4*>(src));
      b = __ldg(reinterpret_cast<const float4*>(src + HALF));
    }
    float x1[4] = {a.x, a.y, a.z, a.w};
    float x2[4] = {b.x, b.y, b.z, b.w};
    if (rotary && r < nvalid) {
      const float p = static_cast<float>(__ldg(pos + tok0 + r));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float s;
        float co;
        fast_sincos(__fmul_rn(p, inv_freq[c + j]), s, co);
        const float y1 = x1[j] * co - x2[j] * s;
        const float y2 = x2[j] * co + x1[j] * s;
        x1[j] = y1;
        x2[j] = y2;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      dst[r * LDS + c + j] = x1[j];
      dst[r * LDS + c + HALF + j] = x2[j];
    }
  }
}

template <int D, bool ALIBI>
__device__ __forceinline__ void attention_f32(const float* __restrict__ qkv,
                                              const int* __restrict__ cu,
                                              const long long* __restrict__ pos,
                                              float* __restrict__ out, int total, int batch,
                                              int heads, float scale, int rotary_flag,
                                              float base, float slope) {
  constexpr int BM = kBlockM32;
  constexpr int BN = D <= 64 ? 32 : 16;
  constexpr int LDS = D + 1;  // odd stride: q·k reads of one column by a warp hit distinct banks
  constexpr int DPT = D / 4;  // output columns per thread
  __shared__ float sQ[BM * LDS];
  __shared__ float sK[BN * LDS];
  __shared__ float sV[BN * D];
  __shared__ float sP[BM * (BN + 1)];
  __shared__ float inv_freq[D / 2];

  Work w;
  if (!locate(cu, batch, total, BM, w)) return;
  const bool rotary = !ALIBI && rotary_flag != 0;
  const int head = static_cast<int>(blockIdx.y);
  const long long row_stride = 3LL * heads * D;
  const int qcol = head * D;
  const int kcol = heads * D + head * D;
  const int vcol = 2 * heads * D + head * D;
  const int tid = static_cast<int>(threadIdx.x);
  const int row = tid / 4;
  const int sub = tid % 4;
  // ALiBi: this row's offset in the sequence minus that of key `sub` of the tile at kv0 = 0.
  [[maybe_unused]] const int rel0 = w.q0 + row - sub;

  if (rotary) rotary_frequencies<D>(inv_freq, base);
  __syncthreads();
  const int nq = min(BM, w.len - w.q0);
  load_qk_f32<BM, D, LDS>(sQ, qkv, row_stride, qcol, w.start + w.q0, nq, pos, inv_freq, rotary);

  float acc[DPT];
#pragma unroll
  for (int i = 0; i < DPT; ++i) acc[i] = 0.0f;
  float m = -INFINITY;
  float l = 0.0f;

  for (int kv0 = 0; kv0 < w.len; kv0 += BN) {
    const int nk = min(BN, w.len - kv0);
    __syncthreads();
    load_qk_f32<BN, D, LDS>(sK, qkv, row_stride, kcol, w.start + kv0, nk, pos, inv_freq, rotary);
    for (int u = tid; u < BN * (D / 4); u += kThreads32) {
      const int r = u / (D / 4);
      const int c = (u % (D / 4)) * 4;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (r < nk) {
        v = __ldg(reinterpret_cast<const float4*>(
            qkv + static_cast<long long>(w.start + kv0 + r) * row_stride + vcol + c));
      }
      sV[r * D + c] = v.x;
      sV[r * D + c + 1] = v.y;
      sV[r * D + c + 2] = v.z;
      sV[r * D + c + 3] = v.w;
    }
    __syncthreads();

    // Scores of row `row`, columns sub, sub+4, ...
    float mx = -INFINITY;
#pragma unroll
    for (int cc = 0; cc < BN / 4; ++cc) {
      const int key = sub + 4 * cc;
      float dot = 0.0f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) dot = fmaf(sQ[row * LDS + d], sK[key * LDS + d], dot);
      float sc = dot * scale;
      if constexpr (ALIBI) {
        sc = fmaf(-slope, fabsf(static_cast<float>(rel0 - kv0 - 4 * cc)), sc);
      }
      sc = key < nk ? sc : -INFINITY;
      sP[row * (BN + 1) + key] = sc;
      mx = fmaxf(mx, sc);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn = fmaxf(m, mx);
    const float corr = expf(m - mn);
    m = mn;
    float rs = 0.0f;
#pragma unroll
    for (int cc = 0; cc < BN / 4; ++cc) {
      const int key = sub + 4 * cc;
      const float p = expf(sP[row * (BN + 1) + key] - mn);
      sP[row * (BN + 1) + key] = p;
      rs += p;
    }
    rs += __shfl_xor_sync(0xffffffffu, rs, 1);
    rs += __shfl_xor_sync(0xffffffffu, rs, 2);
    l = l * corr + rs;
    __syncwarp();  // the quad's p values are in shared memory
#pragma unroll
    for (int i = 0; i < DPT; ++i) acc[i] *= corr;
    for (int key = 0; key < nk; ++key) {
      const float p = sP[row * (BN + 1) + key];
#pragma unroll
      for (int i = 0; i < DPT; ++i) acc[i] = fmaf(p, sV[key * D + sub + 4 * i], acc[i]);
    }
  }
  if (row < nq) {
    const float inv = 1.0f / l;
    float* dst = out + static_cast<long long>(w.start + w.q0 + row) * heads * D + qcol;
#pragma unroll
    for (int i = 0; i < DPT; ++i) dst[sub + 4 * i] = acc[i] * inv;
  }
}

}  // namespace virnuc

// ---------------------------------------------------------------------------------------------
// Entry points (names are the ABI the loaders look up).

// Two blocks an SM for fp16 (caps registers at 128 with 8 warps, at 255 with the 4 or 2 warps of
// D = 64/128); bf16's split operands need more.
// ALIBI entry points read their head's slope from the by-value `alibi` once per block; a head past
// kMaxAlibiHeads (num_heads too large: refused by every launcher) writes nothing.
#define VIRNUC_KERNEL_16(NAME, T, D, ALIBI)                                                    \
  extern "C" __global__ void __launch_bounds__((virnuc::threads16<T, D>()),                  \
                                               __is_same(T, __half) ? 2 : 1)                  \
      NAME(const void* qkv, const int* cu_seqlens, const long long* position_ids, void* out,   \
           int total_tokens, int batch, int num_heads, float scale, int rotary,                \
           float rotary_base, virnuc::varlen::AlibiSlopes alibi) {                             \
    if (ALIBI && blockIdx.y >= static_cast<unsigned>(virnuc::varlen::kMaxAlibiHeads)) return;   \
    virnuc::attention_16bit_entry<T, D, ALIBI>(                                                \
        static_cast<const uint16_t*>(qkv), cu_seqlens, position_ids,                           \
        static_cast<uint16_t*>(out), total_tokens, batch, num_heads, scale, rotary,            \
        rotary_base, ALIBI ? alibi.slope[blockIdx.y] : 0.0f);                                  \
  }

#define VIRNUC_KERNEL_32(NAME, D, ALIBI)                                                       \
  extern "C" __global__ void __launch_bounds__(virnuc::kThreads32)                             \
      NAME(const void* qkv, const int* cu_seqlens, const long long* position_ids, void* out,   \
           int total_tokens, int batch, int num_heads, float scale, int rotary,                \
           float rotary_base, virnuc::varlen::AlibiSlopes alibi) {                             \
    if (ALIBI && blockIdx.y >= static_cast<unsigned>(virnuc::varlen::kMaxAlibiHeads)) return;   \
    virnuc::attention_f32<D, ALIBI>(static_cast<const float*>(qkv), cu_seqlens, position_ids,  \
                                    static_cast<float*>(out), total_tokens, batch, num_heads,  \
                                    scale, rotary, rotary_base,                                \
                                    ALIBI ? alibi.slope[blockIdx.y] : 0.0f);                   \
  }

VIRNUC_KERNEL_16(virnuc_varlen_attention_f16_d16, __half, 16, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_f16_d24, __half, 24, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_f16_d32, __half, 32, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_f16_d64, __half, 64, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_f16_d128, __half, 128, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_bf16_d16, __nv_bfloat16, 16, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_bf16_d24, __nv_bfloat16, 24, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_bf16_d32, __nv_bfloat16, 32, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_bf16_d64, __nv_bfloat16, 64, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_bf16_d128, __nv_bfloat16, 128, false)
VIRNUC_KERNEL_32(virnuc_varlen_attention_f32_d16, 16, false)
VIRNUC_KERNEL_32(virnuc_varlen_attention_f32_d24, 24, false)
VIRNUC_KERNEL_32(virnuc_varlen_attention_f32_d32, 32, false)
VIRNUC_KERNEL_32(virnuc_varlen_attention_f32_d64, 64, false)
VIRNUC_KERNEL_32(virnuc_varlen_attention_f32_d128, 128, false)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_f16_d16, __half, 16, true)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_f16_d24, __half, 24, true)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_f16_d32, __half, 32, true)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_f16_d64, __half, 64, true)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_f16_d128, __half, 128, true)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_bf16_d16, __nv_bfloat16, 16, true)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_bf16_d24, __nv_bfloat16, 24, true)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_bf16_d32, __nv_bfloat16, 32, true)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_bf16_d64, __nv_bfloat16, 64, true)
VIRNUC_KERNEL_16(virnuc_varlen_attention_alibi_bf16_d128, __nv_bfloat16, 128, true)
VIRNUC_KERNEL_32(virnuc_varlen_attention_alibi_f32_d16, 16, true)
VIRNUC_KERNEL_32(virnuc_varlen_attention_alibi_f32_d24, 24, true)
VIRNUC_KERNEL_32(virnuc_varlen_attention_alibi_f32_d32, 32, true)
VIRNUC_KERNEL_32(virnuc_varlen_attention_alibi_f32_d64, 64, true)
VIRNUC_KERNEL_32(virnuc_varlen_attention_alibi_f32_d128, 128, true)

// ---------------------------------------------------------------------------------------------
// Host launcher for C++ hosts that link this file (the TensorRT plugin). The Rust runtime loads
// the fatbin through the driver API instead and computes the same grid (runtime/cuda).
#ifdef VIRNUC_VARLEN_ATTENTION_HOST_LAUNCHER

extern "C" cudaError_t virnuc_varlen_attention_launch(cudaStream_t stream, const void* qkv,
                                                      const int* cu_seqlens,
                                                      const long long* position_ids, void* out,
                                                      int total_tokens, int batch, int num_heads,
                                                      int head_dim, int onnx_dtype, float scale,
                                                      int rotary, float rotary_base,
                                                      const virnuc::varlen::AlibiSlopes* alibi) {
  using Kernel = void (*)(const void*, const int*, const long long*, void*, int, int, int, float,
                          int, float, virnuc::varlen::AlibiSlopes);
  Kernel k = nullptr;
#define VIRNUC_PICK(DT, PREFIX)                                   \
  if (onnx_dtype == DT) {                                         \
    switch (head_dim) {                                           \
      case 16: k = PREFIX##_d16; break;                           \
      case 24: k = PREFIX##_d24; break;                           \
      case 32: k = PREFIX##_d32; break;                           \
      case 64: k = PREFIX##_d64; break;                           \
      case 128: k = PREFIX##_d128; break;                         \
      default: break;                                             \
    }                                                             \
  }
  if (alibi != nullptr) {  // ALiBi: its own entry points, rotary off
    if (rotary != 0 || num_heads > virnuc::varlen::kMaxAlibiHeads) return cudaErrorInvalidValue;
    VIRNUC_PICK(virnuc::varlen::kOnnxFloat, virnuc_varlen_attention_alibi_f32)
    VIRNUC_PICK(virnuc::varlen::kOnnxFloat16, virnuc_varlen_attention_alibi_f16)
    VIRNUC_PICK(virnuc::varlen::kOnnxBfloat16, virnuc_varlen_attention_alibi_bf16)
  } else {
    VIRNUC_PICK(virnuc::varlen::kOnnxFloat, virnuc_varlen_attention_f32)
    VIRNUC_PICK(virnuc::varlen::kOnnxFloat16, virnuc_varlen_attention_f16)
    VIRNUC_PICK(virnuc::varlen::kOnnxBfloat16, virnuc_varlen_attention_bf16)
  }
#undef VIRNUC_PICK
  if (k == nullptr) return cudaErrorInvalidValue;
  const virnuc::varlen::Grid g =
      virnuc::varlen::grid(total_tokens, batch, num_heads, head_dim, onnx_dtype);
  if (g.x == 0 || g.y == 0) return cudaSuccess;
  const dim3 blocks(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y));
  const unsigned threads = static_cast<unsigned>(virnuc::varlen::threads(onnx_dtype, head_dim));
  const virnuc::varlen::AlibiSlopes slopes = alibi != nullptr ? *alibi : virnuc::varlen::AlibiSlopes{};
  k<<<blocks, threads, 0, stream>>>(qkv, cu_seqlens, position_ids, out, total_tokens, batch,
                                     num_heads, scale, rotary, rotary_base, slopes);
  return cudaGetLastError();
}
#endif
