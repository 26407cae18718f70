// Host-side facts of com.virnuc:VarlenAttention that need neither CUDA nor TensorRT: version,
// dtype codes, launch geometry, and validation of shapes and attributes. Used by the TensorRT
// plugin and the C++ host launcher; tested with plain g++ (tests/validate_test.cpp). The Rust
// loader (runtime/cuda) mirrors these constants and checks them against this file in its tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace virnuc {
namespace varlen {

constexpr const char* kVersion = "2";         // VARLEN_ATTENTION_VERSION in README.md
constexpr const char* kOpType = "VarlenAttention";
constexpr const char* kDomain = "com.virnuc";
// The TensorRT plugin version: what TensorRT's ONNX parser looks up for a node without a
// plugin_version attribute. Contract version 2 only added an optional attribute, so it stays "1".
constexpr const char* kPluginVersion = "1";

// ALiBi slopes reach the kernels by value, in the kernel parameter space (4 KiB): one float per
// head, at most kMaxAlibiHeads heads (the CPU op has no such limit).
constexpr int kMaxAlibiHeads = 128;
struct AlibiSlopes {
  float slope[kMaxAlibiHeads];
};

// ONNX TensorProto data types (the dtype argument of every launcher).
constexpr int kOnnxFloat = 1;
constexpr int kOnnxFloat16 = 10;
constexpr int kOnnxBfloat16 = 16;

// Launch geometry of the kernels in varlen_attention.cu (static shared memory: no size to pass).
// fp16 at head_dim 64 and 128: 32 query rows a warp, 4 warps (128 threads, 128 rows) at 64 and
// 2 warps (64 threads, 64 rows) at 128. Other 16-bit kernels: one warp per 16 query rows, 8 warps
// (4 at head_dim 128). fp32: 128 threads, 32 rows.
inline int threads(int onnx_dtype, long long head_dim) {
  if (onnx_dtype == kOnnxFloat) return 128;
  if (onnx_dtype == kOnnxFloat16 && head_dim == 64) return 128;
  if (onnx_dtype == kOnnxFloat16 && head_dim == 128) return 64;
  return head_dim == 128 ? 128 : 256;
}
inline int block_m(int onnx_dtype, long long head_dim) {
  if (onnx_dtype == kOnnxFloat) return 32;
  if (onnx_dtype == kOnnxFloat16 && (head_dim == 64 || head_dim == 128)) {
    return threads(onnx_dtype, head_dim);  // 32 rows a warp
  }
  return threads(onnx_dtype, head_dim) / 2;  // 16 rows per 32-thread warp
}

struct Grid {
  long long x;
  long long y;
};

// Slots: floor(total / BM) + batch per head (see the kernel's header comment for the proof).
inline Grid grid(long long total_tokens, long long batch, long long num_heads, long long head_dim,
                 int onnx_dtype) {
  if (total_tokens <= 0 || batch <= 0 || num_heads <= 0) return Grid{0, 0};
  return Grid{total_tokens / block_m(onnx_dtype, head_dim) + batch, num_heads};
}

inline bool supported_head_dim(long long d) {
  return d == 16 || d == 24 || d == 32 || d == 64 || d == 128;
}

inline bool supported_dtype(int onnx_dtype) {
  return onnx_dtype == kOnnxFloat || onnx_dtype == kOnnxFloat16 || onnx_dtype == kOnnxBfloat16;
}

struct Attributes {
  long long num_heads = 0;
  bool has_scale = false;
  float scale = 0.0f;
  long long rotary = 1;
  float rotary_base = 10000.0f;
  std::vector<float> alibi_slopes;  // empty: no ALiBi (the attribute absent, or an empty list)
};

// The checked shape of one call.
struct Problem {
  long long total_tokens = 0;
  long long batch = 0;
  long long num_heads = 0;
  long long head_dim = 0;
  float scale = 0.0f;
  bool rotary = true;
  float rotary_base = 10000.0f;
  bool alibi = false;   // ALiBi mode: the kernels virnuc_varlen_attention_alibi_*, with `slopes`
  AlibiSlopes slopes{};  // slopes of heads 0..num_heads-1, zeros after
};

// The rules on the attributes alone (the TensorRT plugin checks them at creation, before any
// shape is known): num_heads > 0, rotary 0 or 1, and with ALiBi rotary = 0 and one finite slope
// per head, at most kMaxAlibiHeads heads. Empty string when they hold.
inline std::string check_attributes(const Attributes& a) {
  if (a.num_heads <= 0) return "attribute num_heads must be positive";
  if (a.rotary != 0 && a.rotary != 1) return "attribute rotary must be 0 or 1";
  if (a.alibi_slopes.empty()) return std::string();
  if (a.rotary != 0) return "alibi_slopes needs rotary = 0 (rotary and ALiBi exclude each other)";
  if (static_cast<long long>(a.alibi_slopes.size()) != a.num_heads) {
    return "alibi_slopes has " + std::to_string(a.alibi_slopes.size()) +
           " entries, expected num_heads (" + std::to_string(a.num_heads) + ")";
  }
  if (a.num_heads > kMaxAlibiHeads) {
    return "ALiBi on the GPU takes at most " + std::to_string(kMaxAlibiHeads) + " heads, got " +
           std::to_string(a.num_heads);
  }
  for (float s : a.alibi_slopes) {
    if (!std::isfinite(s)) return "alibi_slopes must be finite";
  }
  return std::string();
}

// Validates input shapes (qkv [T, 3HD], cu_seqlens [B+1], position_ids [T] or empty; with ALiBi
// or rotary = 0 position_ids is never read) and attributes; on success fills `out` and returns an empty string, else the reason.
// `position_ids_len` < 0 means the optional input is absent.
inline std::string validate(const Attributes& a, int qkv_rank, long long qkv_rows,
                            long long qkv_cols, int onnx_dtype, int cu_rank, long long cu_len,
                            int pos_rank, long long position_ids_len, Problem& out) {
  if (!supported_dtype(onnx_dtype)) {
    return "qkv dtype " + std::to_string(onnx_dtype) +
           " is not supported (float32=1, float16=10, bfloat16=16)";
  }
  const std::string attributes = check_attributes(a);
  if (!attributes.empty()) return attributes;
  if (qkv_rank != 2) return "qkv must be 2-D [total_tokens, 3*num_heads*head_dim]";
  if (qkv_rows < 0 || qkv_cols <= 0) return "qkv has a negative or empty dimension";
  if (qkv_cols % (3 * a.num_heads) != 0) {
    return "qkv width " + std::to_string(qkv_cols) + " is not a multiple of 3*num_heads (" +
           std::to_string(3 * a.num_heads) + ")";
  }
  const long long d = qkv_cols / (3 * a.num_heads);
  if (!supported_head_dim(d)) {
    return "head_dim " + std::to_string(d) + " is not supported on GPU (16, 24, 32, 64, 128)";
  }
  if (cu_rank != 1 || cu_len < 1) return "cu_seqlens must be 1-D with batch+1 >= 1 entries";
  if (a.rotary == 1) {
    if (position_ids_len < 0) return "position_ids is required when rotary = 1";
    if (pos_rank != 1 || position_ids_len != qkv_rows) {
      return "position_ids must be 1-D with total_tokens (" + std::to_string(qkv_rows) +
             ") entries";
    }
    if (!(a.rotary_base > 0.0f) || !std::isfinite(a.rotary_base)) {
      return "attribute rotary_base must be a positive finite number";
    }
  }
  const float scale = a.has_scale ? a.scale : 1.0f / std::sqrt(static_cast<float>(d));
  if (!std::isfinite(scale)) return "attribute scale must be finite";
  // Kernel indices are 32-bit: tokens and element offsets within a row.
  if (qkv_rows > 0x7fffffffLL || cu_len - 1 > 0x7fffffffLL || qkv_cols > 0x7fffffffLL) {
    return "pack too large for 32-bit token indices";
  }
  out.total_tokens = qkv_rows;
  out.batch = cu_len - 1;
  out.num_heads = a.num_heads;
  out.head_dim = d;
  out.scale = scale;
  out.rotary = a.rotary == 1;
  out.rotary_base = a.rotary_base;
  out.alibi = !a.alibi_slopes.empty();
  out.slopes = AlibiSlopes{};
  for (size_t h = 0; h < a.alibi_slopes.size(); ++h) out.slopes.slope[h] = a.alibi_slopes[h];
  return std::string();
}

}  // namespace varlen
}  // namespace virnuc
