// The pieces of examples/train_proxies that decide whether its training is right: the
// contrastive loss's gradient (finite differences in double), Adam's step, the segment means and
// redundancy measure, and the clustered input generator.
#include <cmath>
#include <vector>

#include "../../examples/train/proxies.hpp"
#include "test_util.hpp"

namespace {

using testing_util::rng;

std::vector<double> normal_vector(size_t n, double stddev) {
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<double> x(n);
  for (double& e : x) e = normal(rng());
  return x;
}

/// Proxies around `groups` shared directions, so that the InfoNCE terms at a small temperature
/// are not all vanishingly small (independent random directions in D dims are nearly orthogonal).
std::vector<double> clustered_proxies(int64_t M, int64_t D, int groups, double spread) {
  const std::vector<double> base = normal_vector(static_cast<size_t>(groups * D), 1.0);
  std::vector<double> p = normal_vector(static_cast<size_t>(M * D), spread);
  std::uniform_real_distribution<double> scale(0.3, 3.0);
  for (int64_t i = 0; i < M; ++i) {
    const double s = scale(rng());
    for (int64_t d = 0; d < D; ++d) p[i * D + d] = s * (p[i * D + d] + base[(i % groups) * D + d]);
  }
  return p;
}

struct ContrastiveCase {
  int64_t M, D;
  double tau;
  int groups;
  double spread;
};

TEST(TrainProxies, ContrastiveGradientMatchesFiniteDifferences) {
  EFFATTN_TRACE_SEED();
  const ContrastiveCase cases[] = {{2, 3, 0.07, 1, 0.3},  {7, 5, 0.07, 2, 0.2}, {16, 4, 0.5, 3, 0.5},
                                   {40, 8, 0.07, 5, 0.1}, {5, 5, 1.0, 5, 1.0},  {33, 32, 0.07, 4, 0.15},
                                   {1, 4, 0.07, 1, 1.0}};
  for (const ContrastiveCase& c : cases) {
    SCOPED_TRACE("M=" + std::to_string(c.M) + " D=" + std::to_string(c.D) + " tau=" + std::to_string(c.tau));
    std::vector<double> p = clustered_proxies(c.M, c.D, c.groups, c.spread), grad(p.size());
    const double loss = train::contrastive_loss(p.data(), c.M, c.D, c.tau, grad.data());
    EXPECT_GE(loss, 0.0);
    EXPECT_EQ(loss, train::contrastive_loss(p.data(), c.M, c.D, c.tau)) << "the loss does not depend on grad";
    // Directional central differences along random directions, h relative to the proxies' size.
    double size = 0;
    for (double x : p) size = std::max(size, std::abs(x));
    const double h = 1e-6 * size;
    for (int trial = 0; trial < 4; ++trial) {
      const std::vector<double> dir = normal_vector(p.size(), 1.0);
      std::vector<double> plus(p), minus(p);
      double analytic = 0, magnitude = 0;
      for (size_t i = 0; i < p.size(); ++i) {
        plus[i] += h * dir[i];
        minus[i] -= h * dir[i];
        analytic += grad[i] * dir[i];
        magnitude += std::abs(grad[i] * dir[i]);
      }
      const double fd = (train::contrastive_loss(plus.data(), c.M, c.D, c.tau) -
                         train::contrastive_loss(minus.data(), c.M, c.D, c.tau)) /
                        (2 * h);
      EXPECT_NEAR(fd, analytic, 1e-6 * magnitude + 1e-9) << "trial " << trial;
    }
  }
}

TEST(TrainProxies, ContrastiveGradientEveryCoordinate) {
  EFFATTN_TRACE_SEED();
  const int64_t M = 6, D = 4;
  const double tau = 0.07;
  std::vector<double> p = clustered_proxies(M, D, 2, 0.2), grad(p.size());
  train::contrastive_loss(p.data(), M, D, tau, grad.data());
  for (size_t i = 0; i < p.size(); ++i) {
    const double h = 1e-6 * std::max(1.0, std::abs(p[i]));
    std::vector<double> plus(p), minus(p);
    plus[i] += h;
    minus[i] -= h;
    const double fd =
        (train::contrastive_loss(plus.data(), M, D, tau) - train::contrastive_loss(minus.data(), M, D, tau)) / (2 * h);
    EXPECT_NEAR(fd, grad[i], 1e-6 * std::max(1.0, std::abs(grad[i]))) << "coordinate " << i;
  }
}

TEST(TrainProxies, ContrastiveIsScaleFreeAndPushesApart) {
  EFFATTN_TRACE_SEED();
  const int64_t M = 12, D = 8;
  const double tau = 0.07;
  std::vector<double> p = clustered_proxies(M, D, 3, 0.2), grad(p.size());
  const double loss = train::contrastive_loss(p.data(), M, D, tau, grad.data());
  std::vector<double> scaled(p);
  for (size_t i = 0; i < p.size(); ++i) scaled[i] *= (i / D % 2 == 0) ? 3.0 : 0.5;
  EXPECT_NEAR(train::contrastive_loss(scaled.data(), M, D, tau), loss, 1e-12 * std::max(1.0, loss));
  for (int64_t i = 0; i < M; ++i) {  // no radial component
    double radial = 0, norm = 0;
    for (int64_t d = 0; d < D; ++d) radial += p[i * D + d] * grad[i * D + d], norm += grad[i * D + d] * grad[i * D + d];
    EXPECT_NEAR(radial, 0.0, 1e-12 * (1 + std::sqrt(norm))) << "proxy " << i;
  }
  // A small gradient step lowers the loss.
  std::vector<double> stepped(p);
  for (size_t i = 0; i < p.size(); ++i) stepped[i] -= 1e-3 * grad[i];
  EXPECT_LT(train::contrastive_loss(stepped.data(), M, D, tau), loss);
  // Two near-duplicates among orthogonal proxies: the step separates them (InfoNCE at a small
  // temperature acts on the nearest neighbours, not on the mean cosine).
  std::vector<double> dup(36, 0.0), dup_grad(36);
  for (int64_t i = 0; i < 6; ++i) dup[i * 6 + i] = 1.0;
  dup[6 * 1 + 0] = 1.0, dup[6 * 1 + 1] = 0.1;  // p1 = e0 + 0.1 e1, cosine 0.995 with p0 = e0
  train::contrastive_loss(dup.data(), 6, 6, tau, dup_grad.data());
  const auto cos01 = [](const std::vector<double>& x) {
    double dot = 0, n0 = 0, n1 = 0;
    for (int d = 0; d < 6; ++d) dot += x[d] * x[6 + d], n0 += x[d] * x[d], n1 += x[6 + d] * x[6 + d];
    return dot / std::sqrt(n0 * n1);
  };
  for (size_t i = 0; i < dup.size(); ++i) dup_grad[i] = dup[i] - 1e-3 * dup_grad[i];
  EXPECT_LT(cos01(dup_grad), cos01(dup));
  // accumulate: grad += weight * dL/dp.
  std::vector<double> acc(p.size(), 1.0);
  train::contrastive_loss(p.data(), M, D, tau, acc.data(), 0.25, true);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(acc[i], 1.0 + 0.25 * grad[i], 1e-15 * (1 + std::abs(grad[i])));
}

TEST(TrainProxies, AdamFirstStepAndConvergence) {
  EFFATTN_TRACE_SEED();
  // With bias correction the first step is lr * g / (|g| + eps): lr times the sign.
  std::vector<double> x = normal_vector(10, 1.0), g = normal_vector(10, 1.0), x0(x);
  train::Adam adam;
  adam.lr = 0.01;
  adam.step(x.data(), g.data(), x.size());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], x0[i] - 0.01 * g[i] / (std::abs(g[i]) + 1e-8), 1e-12);
  // On f(x) = |x − c|^2 it converges.
  const std::vector<double> c = normal_vector(10, 2.0);
  adam = train::Adam{};
  for (int t = 0; t < 3000; ++t) {
    adam.lr = 0.05 * (1 - t / 3000.0);  // decaying, or Adam hovers at about lr from the optimum
    for (size_t i = 0; i < x.size(); ++i) g[i] = 2 * (x[i] - c[i]);
    adam.step(x.data(), g.data(), x.size());
  }
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], c[i], 1e-3);
}

TEST(TrainProxies, SegmentMeansAndCosine) {
  EFFATTN_TRACE_SEED();
  const int64_t N = 10, D = 3, M = 3;  // the library's segments: [0, 3), [3, 6), [6, 10)
  const std::vector<double> x = normal_vector(static_cast<size_t>(N * D), 1.0);
  std::vector<double> means(static_cast<size_t>(M * D));
  train::segment_means(x.data(), N, D, M, means.data());
  const int64_t bounds[4] = {0, 3, 6, 10};
  for (int64_t i = 0; i < M; ++i)
    for (int64_t d = 0; d < D; ++d) {
      double s = 0;
      for (int64_t r = bounds[i]; r < bounds[i + 1]; ++r) s += x[r * D + d];
      EXPECT_NEAR(means[i * D + d], s / double(bounds[i + 1] - bounds[i]), 1e-14);
    }
  const double identity[9] = {1, 0, 0, 0, 2, 0, 0, 0, 3}, same[6] = {1, 2, 3, 2, 4, 6}, opposite[4] = {1, 1, -2, -2};
  EXPECT_NEAR(train::mean_pairwise_cosine(identity, 3, 3), 0.0, 1e-15);
  EXPECT_NEAR(train::mean_pairwise_cosine(same, 2, 3), 1.0, 1e-15);
  EXPECT_NEAR(train::mean_pairwise_cosine(opposite, 2, 2), -1.0, 1e-15);
}

TEST(TrainProxies, ClusteredTokensAreReproducibleAndStructured) {
  EFFATTN_TRACE_SEED();
  train::ClusterSpec spec;
  const int64_t H = 2, D = 32, B = 3, N = 400;
  const uint64_t seed = rng()();
  const train::ClusteredTokens a(spec, H, D, D, seed), b(spec, H, D, D, seed);
  const size_t size = static_cast<size_t>(B * H * N * D);
  std::vector<float> q1(size), k1(size), v1(size), q2(size), k2(size), v2(size);
  std::vector<int> z(static_cast<size_t>(B * N));
  std::mt19937_64 g1(seed + 1), g2(seed + 1);
  a.sample(g1, B, N, q1.data(), k1.data(), v1.data(), z.data());
  b.sample(g2, B, N, q2.data(), k2.data(), v2.data());
  EXPECT_EQ(q1, q2);
  EXPECT_EQ(k1, k2);
  EXPECT_EQ(v1, v2);
  // Runs: P(z_i = z_{i-1}) = stay + (1 − stay) sum_c p_c^2, and same-type logits stand out.
  double norm = 0, sq = 0;
  for (int c = 0; c < spec.clusters; ++c) norm += std::pow(c + 1.0, -spec.zipf);
  for (int c = 0; c < spec.clusters; ++c) sq += std::pow(std::pow(c + 1.0, -spec.zipf) / norm, 2);
  int64_t repeats = 0, pairs = 0;
  double same = 0, other = 0;
  int64_t n_same = 0, n_other = 0;
  for (int64_t s = 0; s < B; ++s)
    for (int64_t i = 0; i < N; ++i) {
      const int zi = z[s * N + i];
      ASSERT_GE(zi, 0);
      ASSERT_LT(zi, spec.clusters);
      if (i > 0) repeats += zi == z[s * N + i - 1], ++pairs;
      for (int64_t j = 0; j < N; j += 7) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(q1[(s * H * N + i) * D + d]) * k1[(s * H * N + j) * D + d];
        if (zi == z[s * N + j])
          same += dot, ++n_same;
        else
          other += dot, ++n_other;
      }
    }
  EXPECT_NEAR(double(repeats) / double(pairs), spec.stay + (1 - spec.stay) * sq, 0.05);
  const double s = 1 / std::sqrt(double(D));
  EXPECT_GT(s * same / double(n_same), 2.0) << "same-type logits (expected about sqrt(D) center_std^2 = 2.8)";
  EXPECT_LT(std::abs(s * other / double(n_other)), 0.5) << "other-type logits (expected about 0)";
}

}  // namespace
