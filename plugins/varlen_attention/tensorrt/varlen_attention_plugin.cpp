// TensorRT IPluginV3 wrapper of the VarlenAttention kernel (contract version 2: rotary, none, or ALiBi
// with the alibi_slopes field, passed to the launcher by value). Thin on purpose: shape/attribute rules
// live in varlen_attention_launch.h and attributes.h (tested with g++ by build.sh), the math in
// varlen_attention.cu (tested on the GPU machine). Every TensorRT-facing method is noexcept and
// wraps its body in try/catch. Never linked or run here (no TensorRT in this workplace); compiled
// against the public TensorRT 10.9 / 11.1 headers (build.sh with TENSORRT_INCLUDE_DIR).
#include "varlen_attention_plugin.h"

#include <cstdio>
#include <exception>
#include <string>

#include "attributes.h"

extern "C" cudaError_t virnuc_varlen_attention_launch(cudaStream_t stream, const void* qkv, const int* cu_seqlens,
                                                      const long long* position_ids, void* out, int total_tokens,
                                                      int batch, int num_heads, int head_dim, int onnx_dtype,
                                                      float scale, int rotary, float rotary_base,
                                                      const virnuc::varlen::AlibiSlopes* alibi);

namespace virnuc {
namespace trt {
namespace {

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

constexpr const char* kName = varlen::kOpType;  // "VarlenAttention"
constexpr const char* kNamespace = "";          // the ONNX parser's default

int32_t fail(const char* where, const std::string& message) noexcept {
  std::fprintf(stderr, "[VarlenAttention plugin] %s: %s\n", where, message.c_str());
  return -1;
}

int onnx_dtype(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return varlen::kOnnxFloat;
    case DataType::kHALF: return varlen::kOnnxFloat16;
    case DataType::kBF16: return varlen::kOnnxBfloat16;
    default: return 0;
  }
}

varlen::FieldType field_type(PluginFieldType t) {
  switch (t) {
    case PluginFieldType::kINT32: return varlen::FieldType::kInt32;
    case PluginFieldType::kINT64: return varlen::FieldType::kInt64;
    case PluginFieldType::kFLOAT32: return varlen::FieldType::kFloat32;
    case PluginFieldType::kFLOAT64: return varlen::FieldType::kFloat64;
    default: return varlen::FieldType::kOther;
  }
}

// Shapes of one call as the header's validator wants them.
std::string validate_descs(const varlen::Attributes& a, const nvinfer1::PluginTensorDesc* in, int32_t nbInputs,
                           varlen::Problem& p) {
  if (nbInputs != 2 && nbInputs != 3) return "expects 2 or 3 inputs (qkv, cu_seqlens[, position_ids])";
  const auto& q = in[0].dims;
  const auto& cu = in[1].dims;
  const long long pos_len = nbInputs == 3 ? (in[2].dims.nbDims == 1 ? in[2].dims.d[0] : -2) : -1;
  return varlen::validate(a, q.nbDims, q.nbDims > 0 ? q.d[0] : 0, q.nbDims > 1 ? q.d[1] : 0, onnx_dtype(in[0].type),
                          cu.nbDims, cu.nbDims > 0 ? cu.d[0] : 0, nbInputs == 3 ? in[2].dims.nbDims : 1, pos_len, p);
}

}  // namespace

VarlenAttentionPlugin::VarlenAttentionPlugin(const varlen::Attributes& attrs) : attrs_(attrs) {}

nvinfer1::IPluginCapability* VarlenAttentionPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept {
  try {
    switch (type) {
      case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
      case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    }
  } catch (const std::exception& e) {
    fail("getCapabilityInterface", e.what());
  }
  return nullptr;
}

nvinfer1::IPluginV3* VarlenAttentionPlugin::clone() noexcept {
  try {
    auto* copy = new VarlenAttentionPlugin(attrs_);
    copy->nb_inputs_ = nb_inputs_;
    return copy;
  } catch (const std::exception& e) {
    fail("clone", e.what());
    return nullptr;
  }
}

const char* VarlenAttentionPlugin::getPluginName() const noexcept { return kName; }
const char* VarlenAttentionPlugin::getPluginVersion() const noexcept { return varlen::kPluginVersion; }
const char* VarlenAttentionPlugin::getPluginNamespace() const noexcept { return kNamespace; }

int32_t VarlenAttentionPlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nbInputs,
                                               const nvinfer1::DynamicPluginTensorDesc* out,
                                               int32_t nbOutputs) noexcept {
  try {
    if (in == nullptr || out == nullptr || nbOutputs != 1 || (nbInputs != 2 && nbInputs != 3)) {
      return fail("configurePlugin", "expects 2 or 3 inputs and 1 output");
    }
    if (in[0].desc.dims.nbDims != 2 || in[1].desc.dims.nbDims != 1) {
      return fail("configurePlugin", "qkv must be 2-D and cu_seqlens 1-D");
    }
    if (attrs_.rotary == 1 && nbInputs != 3) return fail("configurePlugin", "rotary = 1 needs position_ids");
    nb_inputs_ = nbInputs;
    // The width is usually static: check head_dim now rather than at the first enqueue.
    const long long width = in[0].desc.dims.d[1];
    if (width > 0 && attrs_.num_heads > 0 &&
        (width % (3 * attrs_.num_heads) != 0 || !varlen::supported_head_dim(width / (3 * attrs_.num_heads)))) {
      return fail("configurePlugin", "qkv width " + std::to_string(width) +
                                         " gives no supported head_dim for num_heads " +
                                         std::to_string(attrs_.num_heads));
    }
    return 0;
  } catch (const std::exception& e) {
    return fail("configurePlugin", e.what());
  }
}

int32_t VarlenAttentionPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                                  const DataType* inputTypes, int32_t nbInputs) const noexcept {
  try {
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != 1 || nbInputs < 2) {
      return fail("getOutputDataTypes", "bad arguments");
    }
    outputTypes[0] = inputTypes[0];
    return 0;
  } catch (const std::exception& e) {
    return fail("getOutputDataTypes", e.what());
  }
}

int32_t VarlenAttentionPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                                               const nvinfer1::DimsExprs* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                                               nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                               nvinfer1::IExprBuilder& exprBuilder) noexcept {
  try {
    if (inputs == nullptr || outputs == nullptr || nbOutputs != 1 || nbInputs < 2 || inputs[0].nbDims != 2) {
      return fail("getOutputShapes", "qkv must be 2-D");
    }
    // out = [total_tokens, qkv.shape[1] / 3]
    outputs[0].nbDims = 2;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] =
        exprBuilder.operation(nvinfer1::DimensionOperation::kFLOOR_DIV, *inputs[0].d[1], *exprBuilder.constant(3));
    return 0;
  } catch (const std::exception& e) {
    return fail("getOutputShapes", e.what());
  }
}

bool VarlenAttentionPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut,
                                                      int32_t nbInputs, int32_t nbOutputs) noexcept {
  try {
    if (inOut == nullptr || pos < 0 || pos >= nbInputs + nbOutputs) return false;
    const auto& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
    if (pos == 0) return d.type == DataType::kFLOAT || d.type == DataType::kHALF || d.type == DataType::kBF16;
    if (pos == 1) return d.type == DataType::kINT32;
    if (pos == 2 && nbInputs == 3) return d.type == DataType::kINT64;
    return d.type == inOut[0].desc.type;  // the output
  } catch (const std::exception& e) {
    fail("supportsFormatCombination", e.what());
    return false;
  }
}

int32_t VarlenAttentionPlugin::getNbOutputs() const noexcept { return 1; }

size_t VarlenAttentionPlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* /*inputs*/,
                                               int32_t /*nbInputs*/,
                                               const nvinfer1::DynamicPluginTensorDesc* /*outputs*/,
                                               int32_t /*nbOutputs*/) const noexcept {
  return 0;  // grid sized from cu_seqlens on the device: no workspace, no prefix pass
}

int32_t VarlenAttentionPlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs,
                                             const nvinfer1::PluginTensorDesc* /*out*/,
                                             int32_t /*nbOutputs*/) noexcept {
  try {
    varlen::Problem p;
    const std::string err = validate_descs(attrs_, in, nbInputs, p);
    if (!err.empty()) return fail("onShapeChange", err);
    nb_inputs_ = nbInputs;  // enqueue gets no input count
    return 0;
  } catch (const std::exception& e) {
    return fail("onShapeChange", e.what());
  }
}

int32_t VarlenAttentionPlugin::enqueue(const nvinfer1::PluginTensorDesc* inputDesc,
                                       const nvinfer1::PluginTensorDesc* /*outputDesc*/, const void* const* inputs,
                                       void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr) return fail("enqueue", "null arguments");
    varlen::Problem p;
    const std::string err = validate_descs(attrs_, inputDesc, nb_inputs_, p);
    if (!err.empty()) return fail("enqueue", err);
    const cudaError_t rc = virnuc_varlen_attention_launch(
        stream, inputs[0], static_cast<const int*>(inputs[1]),
        p.rotary ? static_cast<const long long*>(inputs[2]) : nullptr, outputs[0], static_cast<int>(p.total_tokens),
        static_cast<int>(p.batch), static_cast<int>(p.num_heads), static_cast<int>(p.head_dim),
        onnx_dtype(inputDesc[0].type), p.scale, p.rotary ? 1 : 0, p.rotary_base, p.alibi ? &p.slopes : nullptr);
    return rc == cudaSuccess ? 0 : fail("enqueue", cudaGetErrorString(rc));
  } catch (const std::exception& e) {
    return fail("enqueue", e.what());
  }
}

nvinfer1::IPluginV3* VarlenAttentionPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  return clone();
}

const nvinfer1::PluginFieldCollection* VarlenAttentionPlugin::getFieldsToSerialize() noexcept {
  try {
    fields_.clear();
    fields_.emplace_back("num_heads", &attrs_.num_heads, PluginFieldType::kINT64, 1);
    fields_.emplace_back("rotary", &attrs_.rotary, PluginFieldType::kINT64, 1);
    fields_.emplace_back("rotary_base", &attrs_.rotary_base, PluginFieldType::kFLOAT32, 1);
    if (attrs_.has_scale) fields_.emplace_back("scale", &attrs_.scale, PluginFieldType::kFLOAT32, 1);
    if (!attrs_.alibi_slopes.empty()) {
      fields_.emplace_back("alibi_slopes", attrs_.alibi_slopes.data(), PluginFieldType::kFLOAT32,
                           static_cast<int32_t>(attrs_.alibi_slopes.size()));
    }
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
    return &collection_;
  } catch (const std::exception& e) {
    fail("getFieldsToSerialize", e.what());
    return nullptr;
  }
}

VarlenAttentionPluginCreator::VarlenAttentionPluginCreator() {
  fields_.emplace_back("num_heads", nullptr, PluginFieldType::kINT64, 1);
  fields_.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
  fields_.emplace_back("rotary", nullptr, PluginFieldType::kINT64, 1);
  fields_.emplace_back("rotary_base", nullptr, PluginFieldType::kFLOAT32, 1);
  fields_.emplace_back("alibi_slopes", nullptr, PluginFieldType::kFLOAT32, 0);  // one per head
  collection_.nbFields = static_cast<int32_t>(fields_.size());
  collection_.fields = fields_.data();
}

const char* VarlenAttentionPluginCreator::getPluginName() const noexcept { return kName; }
const char* VarlenAttentionPluginCreator::getPluginVersion() const noexcept { return varlen::kPluginVersion; }
const char* VarlenAttentionPluginCreator::getPluginNamespace() const noexcept { return kNamespace; }
const nvinfer1::PluginFieldCollection* VarlenAttentionPluginCreator::getFieldNames() noexcept { return &collection_; }

nvinfer1::IPluginV3* VarlenAttentionPluginCreator::createPlugin(const char* /*name*/,
                                                                const nvinfer1::PluginFieldCollection* fc,
                                                                nvinfer1::TensorRTPhase /*phase*/) noexcept {
  try {
    varlen::Attributes attrs;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      const PluginField& f = fc->fields[i];
      const std::string err = varlen::apply_field(attrs, f.name, field_type(f.type), f.data, f.length);
      if (!err.empty()) {
        fail("createPlugin", err);
        return nullptr;
      }
    }
    if (attrs.num_heads <= 0) {
      fail("createPlugin", "required attribute num_heads is missing or not positive");
      return nullptr;
    }
    // rotary 0/1; with alibi_slopes rotary = 0 and one slope per head (at most kMaxAlibiHeads).
    const std::string err = varlen::check_attributes(attrs);
    if (!err.empty()) {
      fail("createPlugin", err);
      return nullptr;
    }
    return new VarlenAttentionPlugin(attrs);
  } catch (const std::exception& e) {
    fail("createPlugin", e.what());
    return nullptr;
  }
}

}  // namespace trt
}  // namespace virnuc

// Two ways TensorRT finds the creator; a library loaded both ways would register it twice, so the
// build picks (CMake option VIRNUC_TRT_STATIC_REGISTRATION):
#ifdef VIRNUC_TRT_STATIC_REGISTRATION
// registration when the library is dlopen'ed: ONNX Runtime's trt_extra_plugin_lib_paths,
// trtexec --plugins, ctypes.CDLL in Python;
using virnuc::trt::VarlenAttentionPluginCreator;
REGISTER_TENSORRT_PLUGIN(VarlenAttentionPluginCreator);
#endif

// the entry point IPluginRegistry::loadLibrary looks up (trtexec --dynamicPlugins); harmless when
// the library is only dlopen'ed.
extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static virnuc::trt::VarlenAttentionPluginCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
