// Runs varlen_attention.cu's kernels on the CPU (emu_shim.h) against a float64 reference of the
// contract (plugins/varlen_attention/README.md), with the launch geometry of
// varlen_attention_launch.h. Built and run by check.sh in this folder; no GPU involved.
#include <cstdio>
#include <random>
#include <string>

#include "varlen_attention_launch.h"

extern "C" void virnuc_varlen_attention_f16_d64(const void*, const int*, const long long*, void*,
                                                int, int, int, float, int, float);
extern "C" void virnuc_varlen_attention_f16_d128(const void*, const int*, const long long*, void*,
                                                 int, int, int, float, int, float);
extern "C" void virnuc_varlen_attention_f16_d32(const void*, const int*, const long long*, void*,
                                                int, int, int, float, int, float);

namespace {

// inv_freq as HF computes it (float32 exponent, power rounded to float32, float32 reciprocal).
float inv_freq(int i, int d, float base) {
  const float e = static_cast<float>(2 * i) / static_cast<float>(d);
  return 1.0f / static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(e)));
}

struct Case {
  std::string name;
  std::vector<int> lens;
  int heads;
  bool rotary;
  float scale;  // NaN: head_dim ** -0.5
};

double run_case(emu::Kernel k, int d, const Case& c, std::mt19937& rng, bool& written) {
  const int h = c.heads;
  std::vector<int> cu{0};
  for (int n : c.lens) cu.push_back(cu.back() + n);
  const int total = cu.back();
  const int batch = static_cast<int>(c.lens.size());
  std::vector<long long> pos;
  for (int n : c.lens)
    for (int i = 0; i < n; ++i) pos.push_back(i);
  std::normal_distribution<float> nd;
  std::vector<__half> qkv(static_cast<size_t>(total) * 3 * h * d);
  for (auto& x : qkv) x = __float2half_rn(nd(rng));
  std::vector<__half> out(static_cast<size_t>(total) * h * d, __float2half_rn(NAN));
  const float scale = std::isnan(c.scale) ? 1.0f / std::sqrt(static_cast<float>(d)) : c.scale;
  const float base = 10000.0f;
  const auto g = virnuc::varlen::grid(total, batch, h, d, virnuc::varlen::kOnnxFloat16);
  const int threads = virnuc::varlen::threads(virnuc::varlen::kOnnxFloat16, d);
  if (g.x > 0) {
    emu::launch({k, qkv.data(), cu.data(), pos.data(), out.data(), total, batch, h, scale,
                 c.rotary ? 1 : 0, base},
                static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), threads);
  }
  // float64 reference
  auto at = [&](int t, int which, int head, int i) {
    return static_cast<double>(__half2float(qkv[(static_cast<size_t>(t) * 3 + which) * h * d + head * d + i]));
  };
  double num = 0, den = 0;
  written = true;
  for (int b = 0; b < batch; ++b) {
    for (int head = 0; head < h; ++head) {
      const int s0 = cu[b], n = c.lens[b];
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
              const double ang = static_cast<double>(static_cast<float>(t) * inv_freq(i, d, base));
              const double x1 = x[i], x2 = x[i + d / 2];
              x[i] = x1 * std::cos(ang) - x2 * std::sin(ang);
              x[i + d / 2] = x2 * std::cos(ang) + x1 * std::sin(ang);
            }
          }
        }
      }
      for (int t = 0; t < n; ++t) {
        std::vector<double> p(n);
        double mx = -INFINITY;
        for (int u = 0; u < n; ++u) {
          double dot = 0;
          for (int i = 0; i < d; ++i) dot += q[t * d + i] * kk[u * d + i];
          p[u] = scale * dot;
          mx = std::max(mx, p[u]);
        }
        double sum = 0;
        for (auto& x : p) sum += (x = std::exp(x - mx));
        for (int i = 0; i < d; ++i) {
          double o = 0;
          for (int u = 0; u < n; ++u) o += p[u] * v[u * d + i];
          o /= sum;
          const double got = __half2float(out[(static_cast<size_t>(s0 + t)) * h * d + head * d + i]);
          if (!std::isfinite(got)) written = false;
          num += (got - o) * (got - o);
          den += o * o;
        }
      }
    }
  }
  return den > 0 ? std::sqrt(num / den) : 0.0;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> long_len(1, 300), short_len(1, 20);
  std::vector<int> broad, many;
  for (int i = 0; i < 7; ++i) broad.push_back(long_len(rng));
  for (int i = 0; i < 45; ++i) many.push_back(short_len(rng));  // > 32 sequences: two search rounds
  const float kDefault = NAN;
  std::vector<Case> cases = {
      {"single-1", {1}, 2, true, kDefault},
      {"tile-edges", {63, 64, 65, 1, 2, 129, 128}, 1, true, kDefault},
      {"with-empty", {0, 5, 0, 70, 0}, 2, true, kDefault},
      {"broad-7", broad, 1, true, kDefault},
      {"many-45", many, 1, true, kDefault},
      {"no-rotary", {150, 33}, 2, false, kDefault},
      {"scale-0.3", {100, 7}, 1, true, 0.3f},
      {"scale-neg", {100, 7}, 1, true, -0.2f},
      {"scale-0", {70, 3}, 1, true, 0.0f},
  };
  if (quick) cases.resize(3);
  struct K {
    const char* name;
    emu::Kernel k;
    int d;
  } kernels[] = {{"f16_d64", virnuc_varlen_attention_f16_d64, 64},
                 {"f16_d128", virnuc_varlen_attention_f16_d128, 128},
                 {"f16_d32", virnuc_varlen_attention_f16_d32, 32}};
  bool ok = true;
  for (const auto& kr : kernels) {
    for (const auto& c : cases) {
      bool written = false;
      const double err = run_case(kr.k, kr.d, c, rng, written);
      const bool pass = written && err <= 2e-3;
      ok &= pass;
      std::printf("%s %s %-11s B=%3zu threads=%d rel=%.2e%s\n", pass ? "ok  " : "FAIL", kr.name,
                  c.name.c_str(), c.lens.size(),
                  virnuc::varlen::threads(virnuc::varlen::kOnnxFloat16, kr.d), err,
                  written ? "" : " (unwritten rows)");
      std::fflush(stdout);
    }
  }
  std::printf("%s\n", ok ? "ALL PASS" : "FAILURES");
  return ok ? 0 : 1;
}
