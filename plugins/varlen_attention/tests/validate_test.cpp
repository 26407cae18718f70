// Host-side checks of varlen_attention_launch.h with plain g++ (no CUDA, no TensorRT): the shape
// and attribute validation the TensorRT plugin runs, and the launch grid's slot bound.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "attributes.h"
#include "varlen_attention_launch.h"

using virnuc::varlen::Attributes;
using virnuc::varlen::Problem;

static int failures = 0;

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

static bool contains(const std::string& s, const char* needle) {
  return s.find(needle) != std::string::npos;
}

static void test_validation() {
  Attributes a;
  a.num_heads = 20;
  Problem p;
  // ESM-2 650M: H=20, D=64, fp16, 100 tokens, 3 sequences.
  CHECK(virnuc::varlen::validate(a, 2, 100, 3 * 20 * 64, 10, 1, 4, 1, 100, p).empty());
  CHECK(p.head_dim == 64 && p.batch == 3 && p.total_tokens == 100 && p.rotary);
  CHECK(p.scale == 0.125f);  // 64 ** -0.5, the default
  a.has_scale = true;
  a.scale = 0.5f;
  CHECK(virnuc::varlen::validate(a, 2, 100, 3 * 20 * 64, 10, 1, 4, 1, 100, p).empty());
  CHECK(p.scale == 0.5f);
  // Every supported head dim and dtype; an unsupported one of each.
  for (int d : {16, 24, 32, 64, 128}) {
    for (int dt : {1, 10, 16}) {
      CHECK(virnuc::varlen::validate(a, 2, 7, 3 * 20 * d, dt, 1, 2, 1, 7, p).empty());
      CHECK(p.head_dim == d);
    }
  }
  CHECK(contains(virnuc::varlen::validate(a, 2, 7, 3 * 20 * 48, 10, 1, 2, 1, 7, p), "head_dim 48"));
  CHECK(contains(virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64, 11, 1, 2, 1, 7, p), "dtype 11"));
  // Width not a multiple of 3H, wrong ranks, missing or short position_ids.
  CHECK(contains(virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64 + 1, 10, 1, 2, 1, 7, p), "multiple"));
  CHECK(!virnuc::varlen::validate(a, 3, 7, 3 * 20 * 64, 10, 1, 2, 1, 7, p).empty());
  CHECK(!virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64, 10, 2, 2, 1, 7, p).empty());
  CHECK(!virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64, 10, 1, 0, 1, 7, p).empty());
  CHECK(contains(virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64, 10, 1, 2, 1, -1, p), "required"));
  CHECK(contains(virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64, 10, 1, 2, 1, 6, p), "position_ids"));
  // rotary = 0: position_ids may be absent.
  a.rotary = 0;
  CHECK(virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64, 10, 1, 2, 1, -1, p).empty());
  CHECK(!p.rotary);
  a.rotary = 2;
  CHECK(contains(virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64, 10, 1, 2, 1, 7, p), "rotary"));
  a.rotary = 1;
  a.rotary_base = -1.0f;
  CHECK(contains(virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64, 10, 1, 2, 1, 7, p), "rotary_base"));
  a.rotary_base = 10000.0f;
  a.num_heads = 0;
  CHECK(contains(virnuc::varlen::validate(a, 2, 7, 3 * 20 * 64, 10, 1, 2, 1, 7, p), "num_heads"));
}

// The kernel's slot scheme: sequence b owns slots [s_b, s_{b+1}), s_b = cu[b]/BM + b, and needs
// ceil(len_b/BM) of them; the grid has grid().x slots. Checked on random packs, including empty
// sequences and lengths at tile boundaries.
static void test_slots() {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    const int dtype = (trial % 3 == 0) ? 1 : (trial % 3 == 1) ? 10 : 16;
    const long long head_dim = (trial % 5 == 0) ? 128 : 64;
    const long long bm = virnuc::varlen::block_m(dtype, head_dim);
    const int batch = 1 + static_cast<int>(rng() % 300);
    std::vector<long long> cu(batch + 1, 0);
    for (int b = 0; b < batch; ++b) {
      const int kind = static_cast<int>(rng() % 4);
      long long len = kind == 0 ? 0 : kind == 1 ? bm * static_cast<long long>(rng() % 4) : static_cast<long long>(rng() % 1100);
      cu[b + 1] = cu[b] + len;
    }
    const long long total = cu[batch];
    const auto g = virnuc::varlen::grid(total, batch, 20, head_dim, dtype);
    if (total == 0) {
      CHECK(g.x == 0);
      continue;
    }
    long long used = 0;
    for (int b = 0; b < batch; ++b) {
      const long long s0 = cu[b] / bm + b;
      const long long s1 = cu[b + 1] / bm + b + 1;
      const long long tiles = (cu[b + 1] - cu[b] + bm - 1) / bm;
      CHECK(s1 - s0 >= tiles);
      CHECK(s0 + tiles <= g.x);
      used += tiles;
    }
    CHECK(used <= g.x);
    CHECK(g.y == 20);
  }
  CHECK(virnuc::varlen::grid(0, 1, 20, 64, 10).x == 0);
  CHECK(virnuc::varlen::grid(100, 0, 20, 64, 10).x == 0);
  // The geometry table of varlen_attention.cu's header comment.
  CHECK(virnuc::varlen::threads(10, 64) == 128 && virnuc::varlen::block_m(10, 64) == 128);
  CHECK(virnuc::varlen::threads(10, 128) == 64 && virnuc::varlen::block_m(10, 128) == 64);
  CHECK(virnuc::varlen::threads(10, 32) == 256 && virnuc::varlen::block_m(10, 32) == 128);
  CHECK(virnuc::varlen::threads(16, 64) == 256 && virnuc::varlen::block_m(16, 64) == 128);
  CHECK(virnuc::varlen::threads(16, 128) == 128 && virnuc::varlen::block_m(16, 128) == 64);
  CHECK(virnuc::varlen::threads(1, 64) == 128 && virnuc::varlen::block_m(1, 64) == 32);
}

// Contract version 2: ALiBi (alibi_slopes) excludes rotary = 1, needs one finite slope per head, at
// most kMaxAlibiHeads on the GPU; position_ids may then be absent; the slopes reach the Problem.
static void test_alibi() {
  Attributes a;
  a.num_heads = 12;
  a.rotary = 0;
  for (int h = 0; h < 12; ++h) a.alibi_slopes.push_back(1.0f / static_cast<float>(2 << h));
  Problem p;
  // DNABERT-S: 12 heads of 64, fp16, no position_ids.
  CHECK(virnuc::varlen::validate(a, 2, 100, 3 * 12 * 64, 10, 1, 4, 1, -1, p).empty());
  CHECK(p.alibi && !p.rotary && p.head_dim == 64 && p.scale == 0.125f);
  CHECK(p.slopes.slope[0] == 0.5f && p.slopes.slope[11] == a.alibi_slopes[11] && p.slopes.slope[12] == 0.0f);
  // Exclusive with rotary (rotary's default is 1: an ALiBi node must say rotary = 0).
  a.rotary = 1;
  CHECK(contains(virnuc::varlen::validate(a, 2, 100, 3 * 12 * 64, 10, 1, 4, 1, 100, p), "rotary = 0"));
  CHECK(contains(virnuc::varlen::check_attributes(a), "rotary = 0"));
  a.rotary = 0;
  // One slope per head.
  a.alibi_slopes.pop_back();
  CHECK(contains(virnuc::varlen::validate(a, 2, 100, 3 * 12 * 64, 10, 1, 4, 1, -1, p),
                 "11 entries, expected num_heads (12)"));
  a.alibi_slopes.push_back(std::nanf(""));
  CHECK(contains(virnuc::varlen::validate(a, 2, 100, 3 * 12 * 64, 10, 1, 4, 1, -1, p), "finite"));
  // More heads than the by-value slopes hold.
  Attributes big;
  big.num_heads = virnuc::varlen::kMaxAlibiHeads + 1;
  big.rotary = 0;
  big.alibi_slopes.assign(static_cast<size_t>(big.num_heads), 0.1f);
  CHECK(contains(virnuc::varlen::check_attributes(big), "at most 128 heads"));
  // Empty slopes: version-1 behaviour (no ALiBi).
  Attributes none;
  none.num_heads = 12;
  none.rotary = 0;
  CHECK(virnuc::varlen::validate(none, 2, 100, 3 * 12 * 64, 10, 1, 4, 1, -1, p).empty());
  CHECK(!p.alibi && !p.rotary);
  CHECK(sizeof(virnuc::varlen::AlibiSlopes) == 4 * virnuc::varlen::kMaxAlibiHeads);
}

// Attribute fields as the TensorRT plugin receives them (int32 or int64, float32 or float64).
static void test_attributes() {
  using virnuc::varlen::FieldType;
  Attributes a;
  const int32_t h32 = 20;
  const int64_t r64 = 0;
  const double base64 = 500.0;
  const float scale = 0.25f;
  CHECK(virnuc::varlen::apply_field(a, "num_heads", FieldType::kInt32, &h32, 1).empty());
  CHECK(virnuc::varlen::apply_field(a, "rotary", FieldType::kInt64, &r64, 1).empty());
  CHECK(virnuc::varlen::apply_field(a, "rotary_base", FieldType::kFloat64, &base64, 1).empty());
  CHECK(!a.has_scale);
  CHECK(virnuc::varlen::apply_field(a, "scale", FieldType::kFloat32, &scale, 1).empty());
  CHECK(a.num_heads == 20 && a.rotary == 0 && a.rotary_base == 500.0f && a.has_scale && a.scale == 0.25f);
  // The parser's own attributes are ignored; wrong types and lengths are refused.
  CHECK(virnuc::varlen::apply_field(a, "plugin_version", FieldType::kOther, "1", 1).empty());
  CHECK(contains(virnuc::varlen::apply_field(a, "num_heads", FieldType::kFloat32, &scale, 1), "integer"));
  CHECK(contains(virnuc::varlen::apply_field(a, "scale", FieldType::kInt32, &h32, 1), "float"));
  CHECK(contains(virnuc::varlen::apply_field(a, "num_heads", FieldType::kInt32, &h32, 2), "single"));
  CHECK(!virnuc::varlen::apply_field(a, nullptr, FieldType::kInt32, &h32, 1).empty());
  // alibi_slopes: a list of float32 or float64, any length (0: none); ints refused.
  const float s32[3] = {0.5f, 0.25f, 0.125f};
  const double s64[2] = {0.5, 0.0078125};
  CHECK(virnuc::varlen::apply_field(a, "alibi_slopes", FieldType::kFloat32, s32, 3).empty());
  CHECK(a.alibi_slopes.size() == 3 && a.alibi_slopes[2] == 0.125f);
  CHECK(virnuc::varlen::apply_field(a, "alibi_slopes", FieldType::kFloat64, s64, 2).empty());
  CHECK(a.alibi_slopes.size() == 2 && a.alibi_slopes[1] == 0.0078125f);
  CHECK(virnuc::varlen::apply_field(a, "alibi_slopes", FieldType::kFloat32, nullptr, 0).empty());
  CHECK(a.alibi_slopes.empty());
  CHECK(contains(virnuc::varlen::apply_field(a, "alibi_slopes", FieldType::kInt32, &h32, 1), "list of floats"));
  CHECK(!virnuc::varlen::apply_field(a, "alibi_slopes", FieldType::kFloat32, nullptr, 2).empty());
}

int main() {
  test_validation();
  test_alibi();
  test_attributes();
  test_slots();
  if (failures != 0) {
    std::fprintf(stderr, "validate_test: %d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::puts("validate_test: ok");
  return EXIT_SUCCESS;
}
