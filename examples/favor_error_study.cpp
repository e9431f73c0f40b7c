// How well FAVOR+ estimates the softmax attention matrix, as a function of the number of random
// features M: orthogonal vs iid projections and positive vs trig features, the comparison of the
// Performer paper's approximation-error figure (there L = 4096, d = 16; here with --full).
//
// For each sample, q and k entries are drawn N(0, sigma²) with sigma = d^-1/4 by default, so that
// E|x'|² = 1 for x' = x / d^1/4 (the softmax scale 1/sqrt(d) split between q and k): the regime
// where M in the hundreds resolves exp(q'·k') (the positive estimator's relative variance grows
// like exp(|q' + k'|²) / M). The exact A = softmax(q kᵀ / sqrt(d)) is computed directly; the estimate
// Â is the library's FAVOR attention with V = the columns of I_L for a random set of C key
// columns (out = those columns of Â; the normalizer still runs over all L keys), using a fresh
// favor_projection with chi row norms per sample. Reported: MSE = mean of (Â - A)² over all L rows
// and the C sampled columns (an unbiased estimate of the mean over all L² entries; C = L when
// L <= 1024, else 512), mean and std over samples.
// Positive features run with eps = 1e-30 so that the estimator itself is measured (the default
// 1e-6 is of the order of the stabilized features at this L and would add its own bias).
//
//   favor_error_study            a quick run (L = 512, 3 samples, M = 8..256), a few seconds
//   favor_error_study --full     L = 4096, d = 16, 15 samples, M = 8..512 (a few minutes)
// Writes PREFIX.csv and PREFIX.md (--out PREFIX, default favor_error_study); plot the CSV with
// examples/plot_favor_study.py.
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <effattn/effattn.hpp>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Options {
  int64_t L = 512, d = 16;
  int samples = 3;
  std::vector<int> features = {8, 16, 32, 64, 128, 256};
  std::string out = "favor_error_study";
  uint64_t seed = 1;
  double input_std = 0;  // 0: d^-1/4
  int64_t columns = 0;   // 0: all when L <= 1024, else 512
};

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--full] [--L N] [--d N] [--samples N] [--features M1,M2,...] [--input-std X]\n"
               "          [--columns C] [--seed S] [--out PREFIX]\n"
               "  --full       the paper's setting: L = 4096, d = 16, 15 samples, M = 8,16,...,512\n"
               "  default      L = 512, d = 16, 3 samples, M = 8,16,...,256 (a few seconds)\n"
               "  --input-std  std of the q, k entries (default d^-1/4, so that E|x'|^2 = 1)\n"
               "  --columns C  attention-matrix columns sampled per sample (default all if L <= 1024, else 512)\n"
               "  --out        writes PREFIX.csv and PREFIX.md (default favor_error_study)\n",
               argv0);
}

bool parse_int(const char* s, int64_t lo, int64_t* out) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || v < lo) return false;
  *out = v;
  return true;
}

bool parse(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    int64_t v = 0;
    if (a == "--full") {
      o->L = 4096;
      o->d = 16;
      o->samples = 15;
      o->features = {8, 16, 32, 64, 128, 256, 512};
    } else if (a == "--L" && has_value && parse_int(argv[++i], 2, &v)) {
      o->L = v;
    } else if (a == "--d" && has_value && parse_int(argv[++i], 1, &v)) {
      o->d = v;
    } else if (a == "--samples" && has_value && parse_int(argv[++i], 1, &v)) {
      o->samples = static_cast<int>(v);
    } else if (a == "--columns" && has_value && parse_int(argv[++i], 1, &v)) {
      o->columns = v;
    } else if (a == "--seed" && has_value && parse_int(argv[++i], 0, &v)) {
      o->seed = static_cast<uint64_t>(v);
    } else if (a == "--input-std" && has_value) {
      char* end = nullptr;
      o->input_std = std::strtod(argv[++i], &end);
      if (*end != '\0' || !(o->input_std > 0) || !std::isfinite(o->input_std)) return false;
    } else if (a == "--out" && has_value) {
      o->out = argv[++i];
    } else if (a == "--features" && has_value) {
      o->features.clear();
      std::stringstream list(argv[++i]);
      std::string item;
      while (std::getline(list, item, ','))
        if (!parse_int(item.c_str(), 1, &v)) return false;
        else o->features.push_back(static_cast<int>(v));
      if (o->features.empty()) return false;
    } else {
      return false;
    }
  }
  return true;
}

struct Variant {
  const char* name;
  effattn::Orthogonality orth;
  effattn::FeatureMap map;
};
const Variant kVariants[] = {
    {"positive-orthogonal", effattn::Orthogonality::orthogonal, effattn::FeatureMap::positive},
    {"positive-iid", effattn::Orthogonality::iid, effattn::FeatureMap::positive},
    {"trig-orthogonal", effattn::Orthogonality::orthogonal, effattn::FeatureMap::trig},
    {"trig-iid", effattn::Orthogonality::iid, effattn::FeatureMap::trig},
};
constexpr int kNumVariants = 4;

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, &o)) {
    usage(argv[0]);
    return 2;
  }
  const int64_t L = o.L, d = o.d;
  const double input_std = o.input_std > 0 ? o.input_std : std::pow(double(d), -0.25);
  const int64_t C = std::min(L, o.columns > 0 ? o.columns : L <= 1024 ? L : int64_t(512));
  const auto started = std::chrono::steady_clock::now();
  std::fprintf(stderr, "FAVOR+ error study: L = %ld, d = %ld, input std %.3g, %d samples\n", long(L), long(d), input_std,
               o.samples);

  RowMatrix q(L, d), k(L, d), exact(L, L), exact_cols(L, C), estimate(L, C), unit_columns(L, C);
  std::vector<int64_t> columns(static_cast<size_t>(L));
  const auto view = [&](const RowMatrix& m) { return effattn::bhsd<const float>(m.data(), 1, 1, m.rows(), m.cols()); };
  // mse[variant][feature index][sample]
  std::vector<std::vector<std::vector<double>>> mse(
      kNumVariants, std::vector<std::vector<double>>(o.features.size(), std::vector<double>(o.samples)));
  std::mt19937_64 gen(o.seed);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(input_std));
  for (int s = 0; s < o.samples; ++s) {
    for (int64_t i = 0; i < L * d; ++i) q.data()[i] = normal(gen), k.data()[i] = normal(gen);
    // Exact attention matrix, directly (L² d work).
    exact.noalias() = q * k.transpose() / std::sqrt(float(d));
    for (int64_t i = 0; i < L; ++i) {
      exact.row(i).array() = (exact.row(i).array() - exact.row(i).maxCoeff()).exp();
      exact.row(i) /= exact.row(i).sum();
    }
    // C distinct key columns (all of them when C = L).
    std::iota(columns.begin(), columns.end(), 0);
    std::shuffle(columns.begin(), columns.end(), gen);
    std::sort(columns.begin(), columns.begin() + C);
    unit_columns.setZero();
    for (int64_t c = 0; c < C; ++c) {
      unit_columns(columns[c], c) = 1;
      exact_cols.col(c) = exact.col(columns[c]);
    }
    for (size_t fi = 0; fi < o.features.size(); ++fi)
      for (int vi = 0; vi < kNumVariants; ++vi) {
        const Variant& var = kVariants[vi];
        const int M = o.features[fi];
        const uint64_t proj_seed = o.seed * 1000003u + static_cast<uint64_t>(s) * 4099u + fi * 17u + vi;
        const std::vector<float> w = effattn::favor_projection(proj_seed, 1, M, int(d), var.orth);
        const effattn::Tensor<const float> proj(w.data(), {1, 1, M, d}, {M * d, M * d, d, 1});
        effattn::Favor method{proj, var.map};
        if (var.map == effattn::FeatureMap::positive) method.eps = 1e-30f;
        effattn::attention<effattn::Cpu>(method, view(q), view(k), view(unit_columns),
                                         effattn::bhsd(estimate.data(), 1, 1, L, C));
        mse[vi][fi][s] = (estimate - exact_cols).cast<double>().array().square().mean();
      }
    std::fprintf(stderr, "  sample %d/%d done (%.1f s)\n", s + 1, o.samples,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  }

  const auto stats = [&](const std::vector<double>& x) {
    double mean = 0, var = 0;
    for (double v : x) mean += v / x.size();
    for (double v : x) var += (v - mean) * (v - mean) / std::max<size_t>(1, x.size() - 1);
    return std::pair<double, double>(mean, std::sqrt(var));
  };
  const std::string csv_path = o.out + ".csv", md_path = o.out + ".md";
  FILE* csv = std::fopen(csv_path.c_str(), "w");
  FILE* md = std::fopen(md_path.c_str(), "w");
  if (csv == nullptr || md == nullptr) {
    std::fprintf(stderr, "cannot write %s / %s\n", csv_path.c_str(), md_path.c_str());
    return 1;
  }
  std::fprintf(csv, "variant,map,orthogonality,features,L,d,input_std,columns,samples,mse_mean,mse_std\n");
  std::string table = "# FAVOR+ attention-matrix error vs number of random features\n\n";
  table += "MSE of the estimated attention matrix against exact softmax (all rows; " + std::to_string(C) + " of " +
           std::to_string(L) + " columns, drawn per sample), mean ± std over " + std::to_string(o.samples) + " samples; L = " +
           std::to_string(L) + ", d = " + std::to_string(d) +
           ", q and k entries N(0, " + std::to_string(input_std) +
           "²), scale 1/sqrt(d), chi row norms, positive features with eps = 1e-30. Produced by "
           "`favor_error_study" + std::string(L == 4096 && d == 16 ? " --full" : "") +
           (o.input_std > 0 ? " --input-std " + std::to_string(o.input_std) : std::string()) + "`.\n\n| M |";
  for (const Variant& var : kVariants) table += std::string(" ") + var.name + " |";
  table += "\n|---:|";
  for (int vi = 0; vi < kNumVariants; ++vi) table += "---:|";
  table += "\n";
  char cell[96];
  for (size_t fi = 0; fi < o.features.size(); ++fi) {
    table += "| " + std::to_string(o.features[fi]) + " |";
    for (int vi = 0; vi < kNumVariants; ++vi) {
      const auto [mean, sd] = stats(mse[vi][fi]);
      const bool positive = kVariants[vi].map == effattn::FeatureMap::positive;
      std::fprintf(csv, "%s,%s,%s,%d,%ld,%ld,%.6g,%ld,%d,%.6e,%.6e\n", kVariants[vi].name, positive ? "positive" : "trig",
                   kVariants[vi].orth == effattn::Orthogonality::orthogonal ? "orthogonal" : "iid", o.features[fi],
                   long(L), long(d), input_std, long(C), o.samples, mean, sd);
      std::snprintf(cell, sizeof cell, " %.3e ± %.1e |", mean, sd);
      table += cell;
    }
    table += "\n";
  }
  std::fputs(table.c_str(), md);
  std::fclose(csv);
  std::fclose(md);
  std::printf("%s\nwrote %s and %s (%.1f s)\n", table.c_str(), csv_path.c_str(), md_path.c_str(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  return 0;
}
