// Parsing of VarlenAttention's attributes from (name, type, value) fields, shared by the TensorRT
// plugin (PluginField) and testable without TensorRT: int attributes may arrive as int32 or int64
// (TensorRT's ONNX parser has used both), float ones as float32 or float64; alibi_slopes is a list
// of `length` floats.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "varlen_attention_launch.h"

namespace virnuc {
namespace varlen {

enum class FieldType { kInt32, kInt64, kFloat32, kFloat64, kOther };

// Applies one field to `a`; returns an error message, empty when accepted (unknown names ignored:
// the ONNX parser also passes plugin_version / plugin_namespace).
inline std::string apply_field(Attributes& a, const char* name, FieldType type, const void* data, int32_t length) {
  if (name == nullptr) return "attribute without a name";
  const bool is_int = type == FieldType::kInt32 || type == FieldType::kInt64;
  const bool is_float = type == FieldType::kFloat32 || type == FieldType::kFloat64;
  auto as_int = [&]() -> long long {
    if (type == FieldType::kInt32) {
      int32_t v;
      std::memcpy(&v, data, sizeof v);
      return v;
    }
    int64_t v;
    std::memcpy(&v, data, sizeof v);
    return static_cast<long long>(v);
  };
  auto as_float = [&]() -> float {
    if (type == FieldType::kFloat32) {
      float v;
      std::memcpy(&v, data, sizeof v);
      return v;
    }
    double v;
    std::memcpy(&v, data, sizeof v);
    return static_cast<float>(v);
  };
  const std::string n(name);
  if (n == "alibi_slopes") {  // a list: `length` floats (0: no ALiBi)
    if (!is_float) return "attribute alibi_slopes must be a list of floats";
    if (length < 0 || (length > 0 && data == nullptr)) return "attribute alibi_slopes has no data";
    a.alibi_slopes.assign(static_cast<size_t>(length), 0.0f);
    for (int32_t i = 0; i < length; ++i) {
      if (type == FieldType::kFloat32) {
        std::memcpy(&a.alibi_slopes[i], static_cast<const char*>(data) + i * sizeof(float), sizeof(float));
      } else {
        double v;
        std::memcpy(&v, static_cast<const char*>(data) + i * sizeof(double), sizeof v);
        a.alibi_slopes[i] = static_cast<float>(v);
      }
    }
    return std::string();
  }
  const bool known = n == "num_heads" || n == "rotary" || n == "scale" || n == "rotary_base";
  if (!known) return std::string();
  if (data == nullptr || length != 1) return "attribute " + n + " must be a single value";
  if (n == "num_heads" || n == "rotary") {
    if (!is_int) return "attribute " + n + " must be an integer";
    (n == "num_heads" ? a.num_heads : a.rotary) = as_int();
  } else {
    if (!is_float) return "attribute " + n + " must be a float";
    if (n == "scale") {
      a.scale = as_float();
      a.has_scale = true;
    } else {
      a.rotary_base = as_float();
    }
  }
  return std::string();
}

}  // namespace varlen
}  // namespace virnuc
