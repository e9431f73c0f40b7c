// What quickstart.cpp and quickstart_cuda.cu share: the command line, the test data and the
// error measure. Plain C++ (no Eigen, no CUDA).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace quickstart {

/// The sequence length from `prog [N]`, or -1 after printing the usage (exit with 2 then).
inline int64_t parse_length(int argc, char** argv, const char* prog) {
  int64_t n = 2048;
  char* end = nullptr;
  if (argc == 2) n = std::strtoll(argv[1], &end, 10);
  if (argc > 2 || (argc == 2 && (*argv[1] == '\0' || *end != '\0' || n < 1 || n > 65536))) {
    std::fprintf(stderr, "%s: bad arguments\nusage: %s [N]   (N: sequence length, 1..65536, default 2048)\n", prog,
                 prog);
    return -1;
  }
  return n;
}

/// q, k or v [1, H, N, D] with structure, as real activations: a few smooth waves along the
/// sequence, mixed into the D dims by a random matrix, plus noise. (Pure noise makes all tokens
/// alike and attention nearly uniform, a case no approximation is built for.)
inline std::vector<float> structured(std::mt19937& gen, int64_t H, int64_t N, int64_t D) {
  constexpr int kWaves = 4;
  std::normal_distribution<float> normal;
  std::vector<float> mix(kWaves * D), x(static_cast<size_t>(H * N * D));
  for (auto& m : mix) m = normal(gen);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < D; ++c) {
        float e = 0.3f * normal(gen);
        for (int f = 0; f < kWaves; ++f)
          e += std::sin(6.2831853f * float(f + 1) * (float(i) / float(N) + 0.1f * float(h))) * mix[f * D + c];
        x[static_cast<size_t>((h * N + i) * D + c)] = e;
      }
  return x;
}

/// Proxy tokens [H, M, D] for an untrained model: every (N/M)-th token of x [1, H, N, D]. In
/// Proxyformer they are trained parameters; this spread of real tokens stands in for them.
inline std::vector<float> sample_tokens(const std::vector<float>& x, int64_t H, int64_t N, int64_t D, int64_t M) {
  std::vector<float> p(static_cast<size_t>(H * M * D));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < M; ++i)
      std::copy_n(&x[static_cast<size_t>((h * N + i * N / M) * D)], D, &p[static_cast<size_t>((h * M + i) * D)]);
  return p;
}

/// The root mean square of the row norms of x [.., D] (the typical |q_i|).
inline double rms_row_norm(const std::vector<float>& x, int64_t D) {
  double sum = 0;
  for (float e : x) sum += double(e) * double(e);
  return std::sqrt(sum / double(x.size() / static_cast<size_t>(D)));
}

/// x times `factor`.
inline std::vector<float> scaled(std::vector<float> x, double factor) {
  for (float& e : x) e = static_cast<float>(double(e) * factor);
  return x;
}

/// The factor that brings the typical row of x [.., D] to |x'| = |x| / D^(1/4) = 1: FAVOR+'s
/// regime (its features see x' = x / D^(1/4), the softmax scale 1/sqrt(D) split between q and k).
inline double favor_factor(const std::vector<float>& x, int64_t D) {
  return std::pow(double(D), 0.25) / rms_row_norm(x, D);
}

/// Uniform attention, for scale: every output row of head h is the mean of v's rows ([1, H, N, D]).
/// On inputs where attention is close to uniform it shows how much of the exact output is what
/// the weights add to this average (the part an approximation has to get right).
inline std::vector<float> mean_of_values(const std::vector<float>& v, int64_t H, int64_t N, int64_t D) {
  std::vector<float> out(v.size());
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c = 0; c < D; ++c) {
      double sum = 0;
      for (int64_t j = 0; j < N; ++j) sum += v[static_cast<size_t>((h * N + j) * D + c)];
      for (int64_t i = 0; i < N; ++i) out[static_cast<size_t>((h * N + i) * D + c)] = static_cast<float>(sum / double(N));
    }
  return out;
}

/// How far out is from exact, by two measures.
struct Errors {
  double max_relative;  // max |out - exact| / max |exact|: the project's test measure
  double frobenius;     // ||out - exact||_F / ||exact||_F
};

/// Both measures; NaN if out has a NaN.
inline Errors errors(const std::vector<float>& out, const std::vector<float>& exact) {
  double diff = 0, scale = 0, diff2 = 0, exact2 = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double d = std::fabs(double(out[i]) - double(exact[i])), e = std::fabs(double(exact[i]));
    diff = std::isnan(d) || std::isnan(diff) ? NAN : std::max(diff, d);
    scale = std::max(scale, e);
    diff2 += d * d;
    exact2 += e * e;
  }
  return {diff / scale, std::sqrt(diff2 / exact2)};
}

/// The two input sets, printed above the table.
inline void print_inputs(double norm_q, double norm_k, double factor_q, double factor_k, int64_t D) {
  const double root = std::pow(double(D), 0.25);
  std::printf(
      "inputs A: q, k, v with structure (smooth waves along the sequence, mixed into the dims, plus noise),\n"
      "          |q| ~ %.1f, |k| ~ %.1f (rms), so |q'| = |q| / D^(1/4) ~ %.1f: attention is peaked, the regime of\n"
      "          softmax, Nystrom and Proxy.\n"
      "inputs B: the same v, q scaled by %.3f and k by %.3f, so |q'| ~ |k'| ~ 1: the regime FAVOR+ is meant for\n"
      "          (Performer's variance analysis; its models normalize q and k), with its own exact reference.\n",
      norm_q, norm_k, norm_q / root, factor_q, factor_k);
}

/// The table's header and one row.
inline void print_header() {
  std::printf("%-36s %6s %12s %12s %9s %14s\n", "method", "inputs", "max-rel err", "Frobenius", "ms", "workspace KiB");
}
/// ms < 0: not an effattn call (no time or workspace to show).
inline void print_row(const char* name, const char* inputs, const Errors& e, double ms, size_t workspace) {
  std::printf("%-36s %6s %12.3g %12.3g", name, inputs, e.max_relative, e.frobenius);
  if (ms < 0)
    std::printf(" %9s %14s\n", "-", "-");
  else
    std::printf(" %9.1f %14.1f\n", ms, double(workspace) / 1024.0);
}

/// Printed under the table, so that no number reads as a bug.
inline constexpr const char* kNotes =
    "max-rel err = max |out - exact| / max |exact| (the tests' measure; harsh where the exact output is small);\n"
    "Frobenius = ||out - exact||_F / ||exact||_F; each against exact softmax on the same inputs.\n"
    "Why FAVOR+ runs on inputs B only: it estimates exp(q'.k') by random features, unbiased but with\n"
    "relative variance about exp(|q'+k'|^2) / features (Performer, Lemma 2). On inputs A (|q'| ~ 4) its\n"
    "error stays near 100% at any practical feature count. On inputs B the logits are small, attention is\n"
    "close to uniform and the exact output is the small part of v that the weights do not average away\n"
    "(the mean of v misses it by ~100%): every method's relative error is larger there than on A, and\n"
    "FAVOR+'s falls as features grow.\n";

}  // namespace quickstart
