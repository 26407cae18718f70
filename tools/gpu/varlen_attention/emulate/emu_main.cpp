// Runs varlen_attention.cu's kernels on the CPU (emu_shim.h) against a float64 reference of the
// contract (plugins/varlen_attention/README.md), with the launch geometry of
// varlen_attention_launch.h. Built and run by check.sh in this folder; no GPU involved.
//
// Kernels: fp16 at head_dim 64, 128 and 32 in both modes (rotary/none and ALiBi); bf16 and fp32 at
// head_dim 64 in both modes. Per case the relative error ‖out − ref‖₂ / ‖ref‖₂ is printed, and at the
// end the largest per (kernel, case group). Negative controls: the ALiBi kernels' output compared
// with a reference without ALiBi and one with the slopes in reversed head order must fail.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>

#include "varlen_attention_launch.h"

#define VIRNUC_DECLARE(NAME)                                                                     \
  extern "C" void NAME(const void*, const int*, const long long*, void*, int, int, int, float, int, \
                       float, virnuc::varlen::AlibiSlopes);
VIRNUC_DECLARE(virnuc_varlen_attention_f16_d64)
VIRNUC_DECLARE(virnuc_varlen_attention_f16_d128)
VIRNUC_DECLARE(virnuc_varlen_attention_f16_d32)
VIRNUC_DECLARE(virnuc_varlen_attention_bf16_d64)
VIRNUC_DECLARE(virnuc_varlen_attention_f32_d64)
VIRNUC_DECLARE(virnuc_varlen_attention_alibi_f16_d64)
VIRNUC_DECLARE(virnuc_varlen_attention_alibi_f16_d128)
VIRNUC_DECLARE(virnuc_varlen_attention_alibi_f16_d32)
VIRNUC_DECLARE(virnuc_varlen_attention_alibi_bf16_d64)
VIRNUC_DECLARE(virnuc_varlen_attention_alibi_f32_d64)
#undef VIRNUC_DECLARE

namespace {

using virnuc::varlen::kOnnxBfloat16;
using virnuc::varlen::kOnnxFloat;
using virnuc::varlen::kOnnxFloat16;

// inv_freq as HF computes it (float32 exponent, power rounded to float32, float32 reciprocal).
float inv_freq(int i, int d, float base) {
  const float e = static_cast<float>(2 * i) / static_cast<float>(d);
  return 1.0f / static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(e)));
}

// DNABERT-S's 12 slopes: 2^-1 ... 2^-8, then 2^-0.5 ... 2^-3.5 (float32).
std::vector<float> dnabert_slopes(int heads) {
  const float all[12] = {0.5f,       0.25f,      0.125f,      0.0625f,     0.03125f,     0.015625f,
                         0.0078125f, 0.00390625f, std::exp2f(-0.5f), std::exp2f(-1.5f), std::exp2f(-2.5f),
                         std::exp2f(-3.5f)};
  std::vector<float> s;
  for (int h = 0; h < heads; ++h) s.push_back(all[h % 12]);
  return s;
}

struct Case {
  std::string name;
  std::vector<int> lens;
  int heads;
  bool rotary;
  float scale;  // NaN: head_dim ** -0.5
  bool alibi;   // ALiBi kernels only (rotary off), DNABERT-S's slopes cycled over the heads
};

// The reference's positions: the contract, or a deliberately wrong one for the controls.
enum class RefMode { kContract, kNoAlibi, kSlopesReversed };

struct Pack {
  std::vector<int> cu;
  std::vector<long long> pos;
  std::vector<double> qkv;  // the exact input values, as the kernel sees them
  std::vector<double> out;  // the kernel's output, widened
  bool written = true;
};

// Input element conversions (round to the dtype, widen exactly).
template <typename E>
E from_float(float x);
template <>
__half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
float from_float<float>(float x) { return x; }
double widen(__half x) { return __half2float(x); }
double widen(__nv_bfloat16 x) { return __bfloat162float(x); }
double widen(float x) { return x; }

template <typename E>
Pack run_kernel(emu::Kernel k, int dtype, int d, const Case& c, const std::vector<float>& slopes,
                float scale, std::mt19937& rng) {
  const int h = c.heads;
  Pack p;
  p.cu.push_back(0);
  for (int n : c.lens) p.cu.push_back(p.cu.back() + n);
  const int total = p.cu.back();
  const int batch = static_cast<int>(c.lens.size());
  for (int n : c.lens)
    for (int i = 0; i < n; ++i) p.pos.push_back(i);
  std::normal_distribution<float> nd;
  std::vector<E> qkv(static_cast<size_t>(total) * 3 * h * d);
  for (auto& x : qkv) x = from_float<E>(nd(rng));
  p.qkv.reserve(qkv.size());
  for (auto x : qkv) p.qkv.push_back(widen(x));
  std::vector<E> out(static_cast<size_t>(total) * h * d, from_float<E>(NAN));
  virnuc::varlen::AlibiSlopes alibi{};
  for (size_t i = 0; i < slopes.size(); ++i) alibi.slope[i] = slopes[i];
  const auto g = virnuc::varlen::grid(total, batch, h, d, dtype);
  const int threads = virnuc::varlen::threads(dtype, d);
  if (g.x > 0) {
    emu::launch({k, qkv.data(), p.cu.data(), p.pos.data(), out.data(), total, batch, h, scale,
                 c.rotary ? 1 : 0, 10000.0f, alibi},
                static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), threads);
  }
  p.out.reserve(out.size());
  for (auto x : out) {
    const double v = widen(x);
    if (!std::isfinite(v)) p.written = false;
    p.out.push_back(v);
  }
  return p;
}

// ‖out − ref‖₂ / ‖ref‖₂ against the float64 reference in `mode`.
double rel_err(const Pack& p, const Case& c, int d, float scale, const std::vector<float>& slopes,
               RefMode mode) {
  const int h = c.heads;
  const int batch = static_cast<int>(c.lens.size());
  auto at = [&](int t, int which, int head, int i) {
    return p.qkv[(static_cast<size_t>(t) * 3 + which) * h * d + head * d + i];
  };
  double num = 0, den = 0;
  for (int b = 0; b < batch; ++b) {
    for (int head = 0; head < h; ++head) {
      const int s0 = p.cu[b], n = c.lens[b];
      double slope = 0.0;
      if (c.alibi && mode == RefMode::kContract) slope = slopes[head];
      if (c.alibi && mode == RefMode::kSlopesReversed) slope = slopes[h - 1 - head];
      std::vector<double> q(n * d), kk(n * d), v(n * d);
      for (int t = 0; t < n; ++t) {
        for (int i = 0; i < d; ++i) {
          q[t * d + i] = at(s0 + t, 0, head, i);
          kk[t * d + i] = at(s0 + t, 1, head, i);
          v[t * d + i] = at(s0 + t, 2, head, i);
        }
        if (c.rotary) {
          for (double* x : {&q[t * d], &kk[t * d]}) {
            for (int i = 0; i < d / 2; ++i) {
              const double ang = static_cast<double>(static_cast<float>(t) * inv_freq(i, d, 10000.0f));
              const double x1 = x[i], x2 = x[i + d / 2];
              x[i] = x1 * std::cos(ang) - x2 * std::sin(ang);
              x[i + d / 2] = x2 * std::cos(ang) + x1 * std::sin(ang);
            }
          }
        }
      }
      for (int t = 0; t < n; ++t) {
        std::vector<double> pr(n);
        double mx = -INFINITY;
        for (int u = 0; u < n; ++u) {
          double dot = 0;
          for (int i = 0; i < d; ++i) dot += q[t * d + i] * kk[u * d + i];
          pr[u] = static_cast<double>(scale) * dot - slope * std::abs(t - u);
          mx = std::max(mx, pr[u]);
        }
        double sum = 0;
        for (auto& x : pr) sum += (x = std::exp(x - mx));
        for (int i = 0; i < d; ++i) {
          double o = 0;
          for (int u = 0; u < n; ++u) o += pr[u] * v[u * d + i];
          o /= sum;
          const double got = p.out[(static_cast<size_t>(s0 + t)) * h * d + head * d + i];
          num += (got - o) * (got - o);
          den += o * o;
        }
      }
    }
  }
  return den > 0 ? std::sqrt(num / den) : 0.0;
}

struct Kernel {
  const char* name;
  emu::Kernel k;
  int dtype;
  int d;
  bool alibi;
};

Pack run(const Kernel& kr, const Case& c, const std::vector<float>& slopes, float scale,
         std::mt19937& rng) {
  if (kr.dtype == kOnnxFloat16) return run_kernel<__half>(kr.k, kr.dtype, kr.d, c, slopes, scale, rng);
  if (kr.dtype == kOnnxBfloat16) {
    return run_kernel<__nv_bfloat16>(kr.k, kr.dtype, kr.d, c, slopes, scale, rng);
  }
  return run_kernel<float>(kr.k, kr.dtype, kr.d, c, slopes, scale, rng);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const char* landing = std::getenv("EMU_CP_ASYNC");
  const bool eager = landing != nullptr && std::string(landing) == "eager";
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> long_len(1, 300), short_len(1, 20);
  std::vector<int> broad, many;
  for (int i = 0; i < 7; ++i) broad.push_back(long_len(rng));
  for (int i = 0; i < 45; ++i) many.push_back(short_len(rng));  // > 32 sequences: two search rounds
  const float kDefault = NAN;
  // Rotary / no-position cases (the rotary kernels), then ALiBi cases (the ALiBi kernels).
  std::vector<Case> cases = {
      {"single-1", {1}, 2, true, kDefault, false},
      {"tile-edges", {63, 64, 65, 1, 2, 129, 128}, 1, true, kDefault, false},
      {"with-empty", {0, 5, 0, 70, 0}, 2, true, kDefault, false},
      {"broad-7", broad, 1, true, kDefault, false},
      {"many-45", many, 1, true, kDefault, false},
      {"no-rotary", {150, 33}, 2, false, kDefault, false},
      {"scale-0.3", {100, 7}, 1, true, 0.3f, false},
      {"scale-neg", {100, 7}, 1, true, -0.2f, false},
      {"scale-0", {70, 3}, 1, true, 0.0f, false},
      {"alibi-12h", {1, 130, 0, 77}, 12, false, kDefault, true},
      {"alibi-edges", {63, 64, 65, 1, 2, 129}, 2, false, kDefault, true},
      {"alibi-long", {5, 1100, 3}, 2, false, kDefault, true},
      {"alibi-many-45", many, 1, false, kDefault, true},
      {"alibi-scale-neg", {100, 7}, 2, false, -0.2f, true},
      {"alibi-scale-0", {70, 3}, 2, false, 0.0f, true},
  };
  if (quick) {
    cases = {cases[0], cases[1], cases[2], cases[9], cases[10]};
  }
  const Kernel kernels[] = {
      {"f16_d64", virnuc_varlen_attention_f16_d64, kOnnxFloat16, 64, false},
      {"f16_d128", virnuc_varlen_attention_f16_d128, kOnnxFloat16, 128, false},
      {"f16_d32", virnuc_varlen_attention_f16_d32, kOnnxFloat16, 32, false},
      {"bf16_d64", virnuc_varlen_attention_bf16_d64, kOnnxBfloat16, 64, false},
      {"f32_d64", virnuc_varlen_attention_f32_d64, kOnnxFloat, 64, false},
      {"alibi_f16_d64", virnuc_varlen_attention_alibi_f16_d64, kOnnxFloat16, 64, true},
      {"alibi_f16_d128", virnuc_varlen_attention_alibi_f16_d128, kOnnxFloat16, 128, true},
      {"alibi_f16_d32", virnuc_varlen_attention_alibi_f16_d32, kOnnxFloat16, 32, true},
      {"alibi_bf16_d64", virnuc_varlen_attention_alibi_bf16_d64, kOnnxBfloat16, 64, true},
      {"alibi_f32_d64", virnuc_varlen_attention_alibi_f32_d64, kOnnxFloat, 64, true},
  };
  bool ok = true;
  std::map<std::string, double> worst;  // "kernel group" -> largest relative error
  for (const auto& kr : kernels) {
    const double tol = kr.dtype == kOnnxFloat ? 1e-5 : 2e-3;
    // Only the fp16 kernels use cp.async: the eager-landing pass (check.sh's second) skips the others.
    if (eager && kr.dtype != kOnnxFloat16) continue;
    for (const auto& c : cases) {
      if (c.alibi != kr.alibi) continue;
      // --quick: the bf16 and fp32 rotary kernels (new to the emulator with ALiBi; fp16 is the
      // production path) run in the full set only.
      if (quick && !kr.alibi && kr.dtype != kOnnxFloat16) continue;
      const std::vector<float> slopes = c.alibi ? dnabert_slopes(c.heads) : std::vector<float>();
      const float scale =
          std::isnan(c.scale) ? 1.0f / std::sqrt(static_cast<float>(kr.d)) : c.scale;
      const Pack p = run(kr, c, slopes, scale, rng);
      const double err = rel_err(p, c, kr.d, scale, slopes, RefMode::kContract);
      const bool pass = p.written && err <= tol;
      ok &= pass;
      const std::string group = std::string(kr.name) + (c.alibi ? " alibi" : " rotary/none");
      worst[group] = std::max(worst[group], err);
      std::printf("%s %-14s %-15s B=%3zu H=%2d threads=%d rel=%.2e%s\n", pass ? "ok  " : "FAIL",
                  kr.name, c.name.c_str(), c.lens.size(), c.heads,
                  virnuc::varlen::threads(kr.dtype, kr.d), err, p.written ? "" : " (unwritten rows)");
      // Negative controls on the 12-head ALiBi pack: the same output must fail against a reference
      // without ALiBi and one with the slopes in reversed head order.
      if (c.alibi && c.heads == 12) {
        const double no_alibi = rel_err(p, c, kr.d, scale, slopes, RefMode::kNoAlibi);
        const double reversed = rel_err(p, c, kr.d, scale, slopes, RefMode::kSlopesReversed);
        const bool caught = no_alibi > 10 * tol && reversed > 10 * tol;
        ok &= caught;
        std::printf("%s %-14s control: vs no ALiBi rel=%.2e, vs slopes reversed rel=%.2e (both must "
                    "exceed %.0e)\n",
                    caught ? "ok  " : "FAIL", kr.name, no_alibi, reversed, 10 * tol);
      }
      std::fflush(stdout);
    }
  }
  std::printf("largest relative error per kernel and mode (tolerance f32 1e-5, f16/bf16 2e-3):\n");
  for (const auto& [group, e] : worst) std::printf("  %-26s %.2e\n", group.c_str(), e);
  std::printf("%s\n", ok ? "ALL PASS" : "FAILURES");
  return ok ? 0 : 1;
}
