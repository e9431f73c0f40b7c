// The shared landmark core on its own: segment means, K2 through the tile kernel (with dropped
// landmarks and column dropout), the Newton–Schulz pseudo-inverse and its convergence, and the
// landmark path (no fallback) with M = N reproducing softmax attention.
#include <Eigen/SVD>
#include <effattn/effattn.hpp>

#include "reference/landmark.hpp"
#include "test_util.hpp"

namespace {

using namespace testing_util;
namespace lm = effattn::cpu::landmark;
using effattn::cpu::MatrixView;

/// Scratch for the core functions in these tests.
struct Scratch {
  std::vector<unsigned char> bytes = std::vector<unsigned char>(size_t(1) << 22);
  effattn::detail::Arena arena() { return effattn::detail::Arena(bytes.data(), bytes.size()); }
};

template <class T>
ref::Mat to_mat(const T* p, int64_t rows, int64_t cols) {
  ref::Mat m(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i) m.a[size_t(i)] = double(p[i]);
  return m;
}

double max_abs_diff(const ref::Mat& a, const ref::Mat& b) {
  double d = 0;
  for (size_t i = 0; i < a.a.size(); ++i) d = std::max(d, std::abs(a.a[i] - b.a[i]));
  return d;
}

template <class T>
class LandmarkCore : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(LandmarkCore, Types);

TYPED_TEST(LandmarkCore, SegmentMeansFollowTheSegmentRule) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  for (int64_t n : {1, 7, 100, 1000, 4097})
    for (int64_t m : {1, 3, 16, 64, 128})
      for (bool masked : {false, true}) {
        SCOPED_TRACE("N=" + std::to_string(n) + " M=" + std::to_string(m) + (masked ? " masked" : ""));
        HostTensor<T> x(1, 1, n, 24, Layout::padded);
        x.fill_normal();
        std::vector<uint8_t> valid = random_mask(1, n, 0.6);
        for (int64_t i = n / 4; i < n / 2; ++i) valid[size_t(i)] = 0;  // empties whole segments
        std::vector<T> means(size_t(m * 24));
        std::vector<uint8_t> kept(size_t(m), 7);
        lm::segment_means(effattn::cpu::head_rows(x.cview(), 0, 0), masked ? valid.data() : nullptr, m, means.data(),
                          kept.data());
        const ref::Landmarks r = ref::segment_means(
            ref::head(x.cview(), 0, 0), [&](int64_t i) { return !masked || valid[size_t(i)] != 0; }, m);
        EXPECT_LE(max_abs_diff(to_mat(means.data(), m, 24), r.L), (std::is_same_v<T, float> ? 1e-5 : 1e-13));
        for (int64_t i = 0; i < m; ++i) EXPECT_EQ(kept[size_t(i)] != 0, r.kept[size_t(i)]) << "landmark " << i;
      }
}

TYPED_TEST(LandmarkCore, KernelTwoIsTheSoftmaxMatrixWithDroppedLandmarks) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  for (int64_t m : {1, 16, 64, 128, 300}) {
    HostTensor<T> lq(1, 1, m, 32, Layout::bshd), lk(1, 1, m, 32, Layout::padded);
    lq.fill_normal(1.5);
    lk.fill_normal(1.5);
    std::vector<uint8_t> q_ok = random_mask(1, m, 0.8), k_ok = random_mask(1, m, 0.8);
    std::vector<T> k2(size_t(m * m));
    Scratch s;
    const T scale = T(0.2);
    lm::kernel2(effattn::cpu::head_rows(lq.cview(), 0, 0), q_ok.data(), effattn::cpu::head_rows(lk.cview(), 0, 0),
                k_ok.data(), scale, lm::Dropout{}, k2.data(), s.arena());
    const ref::Mat r = ref::softmax_rows(ref::head(lq.cview(), 0, 0), ref::head(lk.cview(), 0, 0), double(scale),
                                         [&](int64_t i, int64_t j) { return q_ok[size_t(i)] && k_ok[size_t(j)]; });
    EXPECT_LE(max_abs_diff(to_mat(k2.data(), m, m), r), cpu_tolerance<T>()) << "M = " << m;
  }
}

// Decomposed dropout: column c of K2 kept iff column_keep(seed, b, h, c, p), kept columns scaled by
// exactly 1/(1 − p), dropped ones zero; over many (b, h, c) the kept share is 1 − p.
TYPED_TEST(LandmarkCore, ColumnDropoutKeepRateAndScaling) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  const int64_t M = 128;
  const uint64_t seed = rng()();
  Scratch s;
  for (float p : {0.1f, 0.25f, 0.6f}) {
    int64_t kept = 0, total = 0;
    for (int64_t b = 0; b < 4; ++b)
      for (int64_t h = 0; h < 8; ++h) {
        HostTensor<T> l(1, 2, M, 16);
        l.fill_normal();
        const auto lq = effattn::cpu::head_rows(l.cview(), 0, 0), lk = effattn::cpu::head_rows(l.cview(), 0, 1);
        std::vector<T> plain(size_t(M * M)), dropped(size_t(M * M));
        lm::kernel2(lq, nullptr, lk, nullptr, T(0.25), lm::Dropout{}, plain.data(), s.arena());
        lm::kernel2(lq, nullptr, lk, nullptr, T(0.25), lm::Dropout{seed, b, h, p}, dropped.data(), s.arena());
        const T keep_scale = T(1) / (T(1) - T(p));
        for (int64_t c = 0; c < M; ++c) {
          const bool keep = effattn::column_keep(seed, b, h, c, p);
          bool column_zero = true, column_scaled = true;
          for (int64_t r = 0; r < M; ++r) {
            const size_t at = size_t(r * M + c);
            column_zero &= dropped[at] == T(0);
            column_scaled &= dropped[at] == plain[at] * keep_scale;
          }
          EXPECT_TRUE(keep ? column_scaled : column_zero) << "b=" << b << " h=" << h << " c=" << c << " p=" << p;
          kept += !column_zero;
          ++total;
        }
      }
    // 4096 Bernoulli(1 − p) draws: the standard deviation of the share is at most 0.008.
    EXPECT_NEAR(double(kept) / double(total), 1.0 - p, 0.035) << "p = " << p;
  }
}

/// K2 of random landmarks with std 1.5 (condition number ~1e2..1e3, measured).
template <class T>
std::vector<T> softmax_matrix(int64_t m, Scratch& s) {
  HostTensor<T> l(1, 2, m, 32);
  l.fill_normal(1.5);
  std::vector<T> k2(size_t(m * m));
  lm::kernel2(effattn::cpu::head_rows(l.cview(), 0, 0), nullptr, effattn::cpu::head_rows(l.cview(), 0, 1), nullptr,
              T(1 / std::sqrt(32.0)), lm::Dropout{}, k2.data(), s.arena());
  return k2;
}

TYPED_TEST(LandmarkCore, NewtonSchulzMatchesTheReference) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  for (int64_t m : {1, 16, 64, 128})
    for (int it : {0, 1, 6}) {
      Scratch s;
      const std::vector<T> k2 = softmax_matrix<T>(m, s);
      std::vector<T> z(size_t(m * m));
      lm::newton_schulz(k2.data(), m, it, z.data(), s.arena());
      const ref::Mat r = ref::newton_schulz(to_mat(k2.data(), m, m), it);
      double max_ref = 0;
      for (double x : r.a) max_ref = std::max(max_ref, std::abs(x));
      EXPECT_LE(max_abs_diff(to_mat(z.data(), m, m), r) / max_ref, cpu_tolerance<T>()) << "M=" << m << " it=" << it;
    }
}

/// The 2-norm condition number of a K2 given in any element type.
template <class T>
double condition(const T* k2, int64_t m) {
  Eigen::MatrixXd K(m, m);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) K(i, j) = double(k2[size_t(i * m + j)]);
  const Eigen::VectorXd sv = Eigen::JacobiSVD<Eigen::MatrixXd>(K).singularValues();
  return sv(0) / sv(m - 1);
}

// Z converges to pinv(K2): the residual ||K2 Z K2 − K2|| / ||K2|| shrinks with every step until
// it reaches rounding level, which is at most cond(K2) · eps for the element type (measured
// 0.003-0.07 times that for cond 1e2..1e6, float and double).
TYPED_TEST(LandmarkCore, NewtonSchulzConvergesOnSoftmaxMatrices) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  for (int64_t m : {16, 64, 128}) {
    Scratch s;
    std::vector<T> k2 = softmax_matrix<T>(m, s), z(size_t(m * m));
    const Eigen::Map<const Mat> K2(k2.data(), m, m);
    const double rounding = condition(k2.data(), m) * std::numeric_limits<T>::epsilon();
    SCOPED_TRACE("M = " + std::to_string(m) + ", cond(K2) * eps = " + std::to_string(rounding));
    const auto residual = [&](int it) {
      lm::newton_schulz(k2.data(), m, it, z.data(), s.arena());
      const Eigen::Map<const Mat> Z(z.data(), m, m);
      return double((K2 * Z * K2 - K2).norm() / K2.norm());
    };
    double previous = residual(0);
    for (int it = 1; it <= 12 && previous > 100 * rounding; ++it) {
      const double now = residual(it);
      EXPECT_LT(now, previous) << "iterations = " << it;
      previous = now;
    }
    // 40 steps reach rounding level for cond up to ~1e10 (each step multiplies the smallest
    // singular value of K2·Z by about 13/4, starting from ~1/cond²).
    EXPECT_LE(residual(40), rounding);
  }
}

// The guard's probe matrix is what docs/design.md 3.2 defines (Philox words of (j, c, 0, 0),
// top 22 bits summed, centred, times 2^-22): exact in float, in [-2, 2), and of full column rank,
// so no singular direction of K2 escapes all eight probes.
TEST(LandmarkCoreGuard, ProbesAreTheDocumentedMatrix) {
  const int64_t m = 256;
  const int probes = effattn::detail::kGuardProbes;
  Eigen::MatrixXd P(m, probes);
  for (int64_t j = 0; j < m; ++j)
    for (int c = 0; c < probes; ++c) {
      const effattn::detail::U32x4 r = effattn::detail::philox4x32_10(
          {static_cast<uint32_t>(j), static_cast<uint32_t>(c), 0u, 0u}, 0x6A09E667F3BCC909ull);
      const double expected =
          (double(r.x >> 10) + double(r.y >> 10) + double(r.z >> 10) + double(r.w >> 10) - 8388608.0) / 4194304.0;
      const float got = effattn::detail::guard_probe(j, c);
      ASSERT_EQ(double(got), expected) << "j " << j << " c " << c;
      ASSERT_TRUE(got >= -2.0f && got < 2.0f);
      P(j, c) = got;
    }
  const Eigen::VectorXd sv = Eigen::JacobiSVD<Eigen::MatrixXd>(P).singularValues();
  EXPECT_GT(sv(probes - 1), 0.5 * sv(0)) << "the probes are far from orthogonal";
}

TYPED_TEST(LandmarkCore, NewtonSchulzKeepsDroppedLandmarksZeroAndZeroGivesZero) {
  using T = TypeParam;
  const int64_t m = 32;
  Scratch s;
  std::vector<T> k2 = softmax_matrix<T>(m, s), z(size_t(m * m), T(7));
  for (int64_t c = 0; c < m; ++c) k2[size_t(5 * m + c)] = 0;   // query landmark 5 dropped
  for (int64_t r = 0; r < m; ++r) k2[size_t(r * m + 11)] = 0;  // key landmark 11 dropped
  lm::newton_schulz(k2.data(), m, 6, z.data(), s.arena());
  for (int64_t i = 0; i < m; ++i) {
    EXPECT_EQ(z[size_t(i * m + 5)], T(0)) << "Z column 5, row " << i;
    EXPECT_EQ(z[size_t(11 * m + i)], T(0)) << "Z row 11, column " << i;
  }
  std::fill(k2.begin(), k2.end(), T(0));
  lm::newton_schulz(k2.data(), m, 6, z.data(), s.arena());
  for (T x : z) EXPECT_EQ(x, T(0));
}

// With M = N each segment is one token (Lq = Q, Lk = K, K1 = K2 = K3) and a converged pinv gives
// K2 · pinv(K2) · K2 · V = softmax attention. Run through the landmark path itself, bypassing the
// operator's exact fallback, in double with 40 iterations; equal up to the DESIGN.md double
// tolerance, or the pinv's own rounding level cond(K2) · eps where K2 is worse conditioned.
TEST(LandmarkCore, LandmarkPathWithOneTokenPerSegmentIsSoftmax) {
  EFFATTN_TRACE_SEED();
  for (int64_t n : {16, 64, 100}) {
    HostTensor<double> q(2, 2, n, 32, Layout::bshd), k(2, 1, n, 32), v(2, 1, n, 24), out(2, 2, n, 24);
    q.fill_normal(1.5);
    k.fill_normal(1.5);
    v.fill_normal();
    out.poison();
    effattn::cpu::LandmarkSpec<double> spec;
    spec.M = n;
    spec.iterations = 40;
    spec.scale = 1 / std::sqrt(32.0);
    const effattn::detail::Dims d{2, 2, 1, n, n, 32, 24};
    effattn::cpu::landmark_attention<double>(spec, d, q.cview(), k.cview(), v.cview(), out.view, {}, {});
    double rounding = 0;
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t h = 0; h < 2; ++h) {
        const ref::Mat K2 = ref::softmax_rows(ref::head(q.cview(), b, h), ref::head(k.cview(), b, 0), spec.scale,
                                              [](int64_t, int64_t) { return true; });
        rounding = std::max(rounding, condition(K2.a.data(), n) * std::numeric_limits<double>::epsilon());
      }
    const auto r = ref::softmax(q.cview(), k.cview(), v.cview(), {}, 0, false);
    EXPECT_LE(relative_error(out.view, r), std::max(cpu_tolerance<double>(), rounding)) << "N = M = " << n;
  }
}

}  // namespace
