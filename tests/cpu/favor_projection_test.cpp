// favor_projection: the pinned seed -> matrix mapping, the Gaussian stream, orthogonality within
// blocks, the row-norm laws, argument errors, and that the positive random features built from
// it estimate the softmax kernel without bias.
#include <effattn/favor_projection.hpp>

#include <cmath>
#include <numeric>

#include "test_util.hpp"

namespace {

using effattn::Orthogonality;
using effattn::RowScaling;
using testing_util::rng;

// Pinned by the algorithm documented in favor_projection.hpp; identical on every compiler and
// platform (checked with g++ -O0 and clang++ -O3 -march=native -ffp-contract=fast). If this
// fails, the seed -> matrix mapping changed and every stored seed means something else.
TEST(FavorProjection, GoldenValues) {
  const auto w = effattn::favor_projection(20261123, 2, 70, 32);
  ASSERT_EQ(w.size(), 2u * 70 * 32);
  const auto at = [&](int h, int r, int c) { return w[static_cast<size_t>((h * 70 + r) * 32 + c)]; };
  EXPECT_EQ(at(0, 0, 0), 0x1.46e3a4p+0f);
  EXPECT_EQ(at(0, 31, 31), 0x1.6dc2ap-1f);
  EXPECT_EQ(at(0, 32, 0), -0x1.246696p-6f);
  EXPECT_EQ(at(1, 69, 31), 0x1.6a34dap-1f);
  EXPECT_EQ(at(1, 64, 5), -0x1.4dc07p-2f);
  EXPECT_EQ(at(0, 68, 17), 0x1.513f3cp-1f);
  const std::vector<float> iid = effattn::favor_projection(7, 1, 5, 3, Orthogonality::iid, RowScaling::sqrt_dim);
  const std::vector<float> expected = {0x1.221p-1f,    0x1.fa24dap-2f,  0x1.8f73eep+0f, 0x1.33c642p-1f, 0x1.26bd46p-1f,
                                       -0x1.84db1cp+0f, 0x1.f1d496p-1f,  0x1.4cb842p+0f, -0x1.357eb6p-1f, -0x1.3b4c24p+0f,
                                       0x1.e97c38p-1f,  -0x1.823f1ap-1f, 0x1.bd82p-2f,   0x1.0ffb7ap-1f,  0x1.97130cp+0f};
  EXPECT_EQ(iid, expected);
  using effattn::detail::portable::normal;
  EXPECT_EQ(normal(99, 3, 0, 0), -0x1.3259604959affp-1);
  EXPECT_EQ(normal(99, 3, 0, 1), -0x1.e9ead6ee5df82p-5);
  EXPECT_EQ(normal(99, 3, 0, 2), 0x1.6c52bfbdb7dd2p-4);
  EXPECT_EQ(normal(99, 3, 0, 12345), -0x1.e424651ea7837p-1);
}

// The portable ln/sin/cos are Box–Muller as libm would compute it, to rounding.
TEST(FavorProjection, GaussiansAreBoxMullerOfPhilox) {
  const uint64_t seed = rng()();
  for (uint64_t i = 0; i < 4000; ++i) {
    const auto r = effattn::detail::philox4x32_10({uint32_t(i / 2), uint32_t((i / 2) >> 32), 5, 1}, seed);
    const double u1 = (effattn::detail::portable::bits53(r.x, r.y) + 1) * 0x1p-53;
    const double u2 = effattn::detail::portable::bits53(r.z, r.w) * 0x1p-53;
    const double angle = 2 * M_PI * u2, radius = std::sqrt(-2 * std::log(u1));
    const double expect = radius * (i % 2 == 0 ? std::cos(angle) : std::sin(angle));
    EXPECT_NEAR(effattn::detail::portable::normal(seed, 5, 1, i), expect, 1e-13 * (1 + radius)) << "i = " << i;
  }
}

TEST(FavorProjection, DeterministicAndSeedDependent) {
  const uint64_t seed = rng()();
  const auto a = effattn::favor_projection(seed, 3, 40, 16);
  EXPECT_EQ(a, effattn::favor_projection(seed, 3, 40, 16));
  EXPECT_NE(a, effattn::favor_projection(seed + 1, 3, 40, 16));
  // Heads are independent draws, and a head does not depend on how many heads there are.
  EXPECT_FALSE(std::equal(a.begin(), a.begin() + 640, a.begin() + 640));
  const auto one = effattn::favor_projection(seed, 1, 40, 16);
  EXPECT_TRUE(std::equal(one.begin(), one.end(), a.begin()));
  // iid and orthogonal share the first row's direction (Gram–Schmidt leaves row 0 alone).
  const auto iid = effattn::detail::favor_projection_f64(seed, 1, 4, 8, Orthogonality::iid, RowScaling::sqrt_dim);
  const auto orth = effattn::detail::favor_projection_f64(seed, 1, 4, 8, Orthogonality::orthogonal, RowScaling::sqrt_dim);
  for (int c = 0; c < 8; ++c) EXPECT_NEAR(iid[c], orth[c], 1e-15);
}

double dot(const double* a, const double* b, int n) { return std::inner_product(a, a + n, b, 0.0); }

// Orthogonal rows within each block of D rows (the last block truncated); blocks independent.
TEST(FavorProjection, RowsOrthogonalWithinBlocks) {
  const uint64_t seed = rng()();
  for (auto [M, D] : {std::pair<int, int>{70, 32}, {64, 64}, {5, 16}, {300, 128}, {3, 1}}) {
    SCOPED_TRACE("M=" + std::to_string(M) + " D=" + std::to_string(D));
    const auto w = effattn::detail::favor_projection_f64(seed, 2, M, D);
    const auto wf = effattn::favor_projection(seed, 2, M, D);
    double worst = 0, worst_float = 0, across = 0;
    for (int h = 0; h < 2; ++h)
      for (int a = 0; a < M; ++a)
        for (int b = 0; b < a; ++b) {
          const double* ra = &w[(h * M + a) * D];
          const double* rb = &w[(h * M + b) * D];
          const double cosine = dot(ra, rb, D) / std::sqrt(dot(ra, ra, D) * dot(rb, rb, D));
          if (a / D == b / D) {
            worst = std::max(worst, std::abs(cosine));
            std::vector<double> fa(&wf[(h * M + a) * D], &wf[(h * M + a) * D] + D), fb(&wf[(h * M + b) * D], &wf[(h * M + b) * D] + D);
            worst_float = std::max(worst_float, std::abs(dot(fa.data(), fb.data(), D)) /
                                                    std::sqrt(dot(fa.data(), fa.data(), D) * dot(fb.data(), fb.data(), D)));
          } else {
            across = std::max(across, std::abs(cosine));
          }
        }
    EXPECT_LE(worst, 1e-13);
    EXPECT_LE(worst_float, 1e-6);
    if (M > D && D > 1) {
      EXPECT_GT(across, 0.1) << "rows of different blocks should not be orthogonal";
    }
  }
}

// Row norms: sqrt_dim gives exactly sqrt(D); chi gives chi(D) draws, so |w|² has mean D and
// variance 2D, and with chi every coordinate is N(0, 1) (orthogonal and iid alike).
TEST(FavorProjection, RowNormLaws) {
  const uint64_t seed = rng()();
  const int H = 8, M = 512, D = 16, R = H * M;
  for (Orthogonality o : {Orthogonality::orthogonal, Orthogonality::iid}) {
    SCOPED_TRACE(o == Orthogonality::orthogonal ? "orthogonal" : "iid");
    const auto fixed = effattn::detail::favor_projection_f64(seed, H, M, D, o, RowScaling::sqrt_dim);
    for (int r = 0; r < R; ++r) EXPECT_NEAR(std::sqrt(dot(&fixed[r * D], &fixed[r * D], D)), 4.0, 1e-13);

    const auto chi = effattn::detail::favor_projection_f64(seed, H, M, D, o, RowScaling::chi);
    double mean = 0, var = 0, coord_mean = 0, coord_var = 0;
    for (int r = 0; r < R; ++r) mean += dot(&chi[r * D], &chi[r * D], D) / R;
    for (int r = 0; r < R; ++r) var += std::pow(dot(&chi[r * D], &chi[r * D], D) - mean, 2) / (R - 1);
    for (double x : chi) coord_mean += x / chi.size();
    for (double x : chi) coord_var += x * x / chi.size();
    // Standard errors: mean sqrt(2D/R) = 0.088; variance ~0.83 (chi² fourth moment 12D(D+4)).
    EXPECT_NEAR(mean, D, 5 * std::sqrt(2.0 * D / R));
    EXPECT_NEAR(var, 2.0 * D, 5 * 0.83);
    EXPECT_NEAR(coord_mean, 0.0, 5 / std::sqrt(double(chi.size())));
    EXPECT_NEAR(coord_var, 1.0, 5 * std::sqrt(2.0 / chi.size()) * 2);  // rows share a norm: x2 for correlation
  }
}

TEST(FavorProjection, ArgumentErrors) {
  const auto expect_error = [](auto f, const char* fragment) {
    try {
      f();
      ADD_FAILURE() << "no effattn::Error for " << fragment;
    } catch (const effattn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  expect_error([] { effattn::favor_projection(1, 0, 4, 4); }, "heads = 0");
  expect_error([] { effattn::favor_projection(1, 1, 0, 4); }, "features = 0");
  expect_error([] { effattn::favor_projection(1, 1, 4, -3); }, "dim = -3");
}

// Positive random features estimate the softmax kernel without bias: with x' = sqrt(s) x,
// E_W[M^-1 sum_f exp(w_f·q' - |q'|²/2) exp(w_f·k' - |k'|²/2)] = exp(q'·k') for rows w_f that are
// marginally N(0, I) (chi scaling; orthogonal or iid). The mean over many seeds must sit within
// 5 standard errors of exp(q'·k'), and the standard error must be small enough to mean something.
TEST(FavorProjection, PositiveFeaturesEstimateTheSoftmaxKernelWithoutBias) {
  EFFATTN_TRACE_SEED();
  const int D = 16, M = 16, seeds = 4000;
  std::normal_distribution<double> normal;
  // Random directions, |q'| = |k'| = 0.8: the estimator's relative variance per draw is below
  // exp(|q' + k'|²) / M <= exp(2.56) / 16, so 4000 seeds pin the mean to ~1.5%.
  const auto random_point = [&] {
    std::vector<double> x(D);
    for (double& c : x) c = normal(rng());
    const double scale = 0.8 / std::sqrt(dot(x.data(), x.data(), D));
    for (double& c : x) c *= scale;
    return x;
  };
  for (Orthogonality o : {Orthogonality::orthogonal, Orthogonality::iid}) {
    SCOPED_TRACE(o == Orthogonality::orthogonal ? "orthogonal" : "iid");
    const std::vector<double> q = random_point(), k = random_point();
    const double truth = std::exp(dot(q.data(), k.data(), D));
    const double hq = dot(q.data(), q.data(), D) / 2, hk = dot(k.data(), k.data(), D) / 2;
    const uint64_t base = rng()();
    double sum = 0, sum_sq = 0;
    for (int s = 0; s < seeds; ++s) {
      const auto w = effattn::favor_projection(base + s, 1, M, D, o, RowScaling::chi);
      double estimate = 0;
      for (int f = 0; f < M; ++f) {
        double uq = 0, uk = 0;
        for (int c = 0; c < D; ++c) uq += w[f * D + c] * q[c], uk += w[f * D + c] * k[c];
        estimate += std::exp(uq - hq) * std::exp(uk - hk) / M;
      }
      sum += estimate;
      sum_sq += estimate * estimate;
    }
    const double mean = sum / seeds, se = std::sqrt((sum_sq / seeds - mean * mean) / seeds);
    EXPECT_LT(se, 0.03 * truth) << "too few seeds to test anything";
    EXPECT_NEAR(mean, truth, 5 * se) << "q'·k' = " << std::log(truth);
  }
}

}  // namespace
