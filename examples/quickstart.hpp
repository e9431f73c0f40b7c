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

/// Why FAVOR+ trails here: printed under the table so that a large number does not read as a bug.
inline constexpr const char* kFavorNote =
    "FAVOR+ estimates exp(q'.k') by random features, unbiased but with relative variance about\n"
    "exp(|q'+k'|^2) / features (Performer, Lemma 2; q' = q / D^(1/4)): on inputs of large norm, as\n"
    "these, it needs far more features than the other methods need landmarks.\n";

/// max |out - exact| / max |exact|: the error measure of the project's tests (NaN if out is).
inline double relative_error(const std::vector<float>& out, const std::vector<float>& exact) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double d = std::fabs(double(out[i]) - double(exact[i]));
    diff = std::isnan(d) || std::isnan(diff) ? NAN : std::max(diff, d);
    scale = std::max(scale, std::fabs(double(exact[i])));
  }
  return diff / scale;
}

}  // namespace quickstart
