// CPU Nyström attention against the float64 reference of DESIGN.md: odd N, M in {1, 16, 64, 128},
// N divisible by M or not, masks with fully masked sequences, grouped heads, strided views,
// Dv != D, the exact-softmax fallback, and every error path.
#include <Eigen/SVD>
#include <effattn/effattn.hpp>
#include <type_traits>

#include "reference/landmark.hpp"
#include "test_util.hpp"

namespace {

using namespace testing_util;

struct Case {
  int64_t B, H, Hk, Nq, Nk, D, Dv;
  int M;
  bool masks = false;
  Layout layout = Layout::bhsd;
  int iterations = 6;
  float scale = 0;
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         " Dv=" + std::to_string(c.Dv) + " M=" + std::to_string(c.M) + " iters=" + std::to_string(c.iterations) +
         (c.masks ? " masks" : "") + " " + layout_name(c.layout);
}

/// The rounding level of the output once Newton–Schulz has converged far (beyond the default 6
/// iterations), max over (batch, head) of cond(K2)² · eps(T), K2 from the reference's landmarks:
/// a rounding-level difference between two evaluations moves Z by cond(K2) · eps relative to ‖Z‖,
/// and out = K1 · Z · (K3 · V) can be smaller than ‖K1‖ ‖Z‖ ‖K3 · V‖ by up to another cond(K2)
/// (cancellation in the product). The bound of cond · eps alone was exceeded 17× by seed
/// 11221445410251580330 (cond 1.4e4, double, 20 iterations, error 5.2e-11), before and after the
/// probe guard alike. The pinv residual itself is bounded by cond · eps (landmark_core_test.cpp).
template <class T>
double pinv_rounding(const Case& c, const effattn::Tensor<const T>& q, const effattn::Tensor<const T>& k,
                     const effattn::Masks& masks) {
  const double s = ref::default_scale(c.scale, c.D);
  double worst = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const auto query_ok = [&](int64_t i) { return ref::valid(masks.query_valid, masks.query_batch_stride, b, i); };
      const auto key_ok = [&](int64_t j) { return ref::valid(masks.key_valid, masks.key_batch_stride, b, j); };
      const ref::Landmarks lq = ref::segment_means(ref::head(q, b, h), query_ok, c.M);
      const ref::Landmarks lk = ref::segment_means(ref::head(k, b, h / (c.H / c.Hk)), key_ok, c.M);
      const ref::Mat K2 = ref::softmax_rows(lq.L, lk.L, s, [&](int64_t i, int64_t j) { return lq.kept[size_t(i)] && lk.kept[size_t(j)]; });
      Eigen::MatrixXd K(K2.rows, K2.cols);
      for (int64_t i = 0; i < K2.rows; ++i)
        for (int64_t j = 0; j < K2.cols; ++j) K(i, j) = K2(i, j);
      const Eigen::VectorXd sv = Eigen::JacobiSVD<Eigen::MatrixXd>(K).singularValues();
      double smallest = 0;  // the smallest nonzero singular value (dropped landmarks give zeros)
      for (int64_t i = 0; i < sv.size(); ++i)
        if (sv(i) > sv(0) * 1e-300) smallest = sv(i);
      const double cond = sv(0) / smallest;
      worst = std::max(worst, cond * cond * std::numeric_limits<T>::epsilon());
    }
  return worst;
}

template <class T>
void run_case(const Case& c, int threads = 0) {
  SCOPED_TRACE(describe(c));
  EFFATTN_TRACE_SEED();
  AttentionData<T> data(c.B, c.H, c.Hk, c.Nq, c.Nk, c.D, c.Dv, c.layout);
  auto& [q, k, v, out] = data;
  effattn::Masks masks;
  std::vector<uint8_t> qm, km;
  if (c.masks) {
    // The last batch has no valid key at all, the first no valid query; runs of invalid tokens
    // empty whole segments elsewhere.
    km = random_mask(c.B, c.Nk, 0.7, c.B > 1 ? c.B - 1 : -1);
    qm = random_mask(c.B, c.Nq, 0.8, c.B > 2 ? 0 : -1);
    for (int64_t b = 0; b < c.B; ++b) {
      for (int64_t j = c.Nk / 3; j < c.Nk / 2; ++j) km[b * c.Nk + j] = 0;
      for (int64_t i = c.Nq / 2; i < 2 * c.Nq / 3; ++i) qm[b * c.Nq + i] = 0;
    }
    masks = {qm.data(), c.Nq, km.data(), c.Nk};
  }
  const effattn::Nystrom m{c.M, c.iterations, c.scale};
  effattn::attention<effattn::Cpu>(m, q.cview(), k.cview(), v.cview(), out.view, masks,
                                   effattn::Exec<effattn::Cpu>{threads});
  const ref::Result r = ref::nystrom(q.cview(), k.cview(), v.cview(), masks, c.M, c.iterations, c.scale);
  double tolerance = cpu_tolerance<T>();
  if (c.iterations > 6 && !effattn::detail::nystrom_is_exact({c.M}, c.Nq, c.Nk)) {
    const double rounding = pinv_rounding(c, q.cview(), k.cview(), masks);
    if (std::getenv("NYSTROM_TEST_VERBOSE"))
      std::printf("iters %d err %.3g rounding %.3g ratio %.3g\n", c.iterations, relative_error(out.view, r), rounding,
                  relative_error(out.view, r) / rounding);
    tolerance = std::max(tolerance, rounding);
  }
  data.expect_matches(r, tolerance);
}

template <class T>
class NystromCpu : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(NystromCpu, Types);

TYPED_TEST(NystromCpu, OddLengthsAndLandmarkCounts) {
  for (int64_t n : {1, 7, 1000, 4097})
    for (int m : {1, 16, 64, 128}) run_case<TypeParam>({1, 2, 2, n, n, 32, 32, m});
}

TYPED_TEST(NystromCpu, DivisibleAndNot) {
  for (int64_t n : {256, 257, 300, 383, 384}) run_case<TypeParam>({2, 2, 1, n, n, 64, 64, 64});
}

TYPED_TEST(NystromCpu, DifferentQueryAndKeyLengths) {
  run_case<TypeParam>({2, 2, 2, 300, 700, 32, 32, 16});
  run_case<TypeParam>({1, 2, 2, 900, 130, 32, 24, 64});
}

TYPED_TEST(NystromCpu, HeadDimsAndValueDims) {
  for (int64_t d : {32, 64, 80, 128}) run_case<TypeParam>({1, 2, 2, 500, 500, d, d, 32});
  run_case<TypeParam>({2, 3, 3, 333, 290, 48, 17, 16});
  run_case<TypeParam>({1, 2, 2, 700, 700, 16, 96, 64, true, Layout::padded});
}

TYPED_TEST(NystromCpu, LayoutsAndMasks) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})
    run_case<TypeParam>({3, 4, 2, 600, 600, 64, 64, 32, true, l});
}

TYPED_TEST(NystromCpu, FullyMaskedSequencesAndEmptySegments) {
  run_case<TypeParam>({3, 2, 2, 1000, 1000, 32, 32, 128, true, Layout::bshd});
  run_case<TypeParam>({3, 2, 1, 520, 777, 32, 32, 64, true, Layout::bhsd});
}

TYPED_TEST(NystromCpu, GroupedAndMultiQueryHeads) {
  run_case<TypeParam>({2, 8, 2, 400, 400, 64, 64, 32, true});
  run_case<TypeParam>({1, 6, 1, 350, 290, 32, 40, 16, false, Layout::bshd});
}

// Beyond the default 6 iterations the output is as ill-conditioned as pinv(K2) (see
// proxy_test.cpp): float is checked up to 6, double also at 12 and 20.
TYPED_TEST(NystromCpu, IterationCountsAndScale) {
  std::vector<int> counts{0, 1, 3, 6};
  if (std::is_same_v<TypeParam, double>) counts.insert(counts.end(), {12, 20});
  for (int it : counts) run_case<TypeParam>({1, 2, 2, 500, 500, 32, 32, 16, false, Layout::bhsd, it});
  run_case<TypeParam>({1, 2, 2, 500, 500, 64, 64, 32, true, Layout::bhsd, 6, 0.3f});
  run_case<TypeParam>({1, 2, 2, 500, 500, 64, 64, 32, false, Layout::bhsd, 6, -0.2f});
}

TYPED_TEST(NystromCpu, ExactSoftmaxFallback) {
  // min(Nq, Nk) <= M: exact softmax attention, masks included.
  run_case<TypeParam>({2, 2, 2, 64, 500, 32, 32, 64, true});
  run_case<TypeParam>({2, 2, 2, 500, 100, 32, 32, 128, true});
}

TYPED_TEST(NystromCpu, ThreadCountsAgree) {
  for (int threads : {1, 2, 3}) run_case<TypeParam>({2, 3, 3, 700, 700, 32, 32, 64, true}, threads);
}

// Property: with M = N every segment is one token, Lq = Q and Lk = K, and Nyström is exactly
// softmax attention (the fallback rule of DESIGN.md makes this exact).
TYPED_TEST(NystromCpu, EqualsSoftmaxWhenLandmarksEqualLength) {
  EFFATTN_TRACE_SEED();
  for (int64_t n : {1, 33, 200}) {
    HostTensor<TypeParam> q(2, 2, n, 32), k(2, 2, n, 32), v(2, 2, n, 32), out(2, 2, n, 32);
    q.fill_normal(1.5);
    k.fill_normal(1.5);
    v.fill_normal();
    out.poison();
    effattn::attention<effattn::Cpu>(effattn::Nystrom{int(n)}, q.cview(), k.cview(), v.cview(), out.view);
    const auto r = ref::softmax(q.cview(), k.cview(), v.cview(), {}, 0, false);
    EXPECT_LE(relative_error(out.view, r), cpu_tolerance<TypeParam>()) << "N = M = " << n;
  }
}

TEST(NystromCpu, CallerWorkspaceIsUsedAndSufficient) {
  HostTensor<float> q(2, 3, 900, 32), k(2, 3, 900, 32), v(2, 3, 900, 24), out(2, 3, 900, 24);
  q.fill_normal();
  k.fill_normal();
  v.fill_normal();
  const effattn::Nystrom m{64};
  const effattn::Exec<effattn::Cpu> probe{2};
  const size_t bytes = effattn::workspace_bytes<effattn::Cpu>(m, q.view, k.view, v.view, probe);
  ASSERT_GT(bytes, 0u);
  void* ws = std::aligned_alloc(64, bytes);
  const auto before = effattn::allocation_stats().current;
  effattn::reset_allocation_peak();
  effattn::attention<effattn::Cpu>(m, q.cview(), k.cview(), v.cview(), out.view, {},
                                   effattn::Exec<effattn::Cpu>{2, ws, bytes});
  EXPECT_EQ(effattn::allocation_stats().peak, before) << "allocated although a workspace was given";
  const auto r = ref::nystrom(q.cview(), k.cview(), v.cview(), {}, 64, 6, 0);
  EXPECT_LE(relative_error(out.view, r), 1e-5);
  EXPECT_THROW(effattn::attention<effattn::Cpu>(m, q.cview(), k.cview(), v.cview(), out.view, {},
                                                effattn::Exec<effattn::Cpu>{2, ws, bytes - 64}),
               effattn::Error);
  std::free(ws);
}

TEST(NystromCpu, WorkspaceDoesNotGrowWithSequenceLength) {
  const effattn::Exec<effattn::Cpu> exec{2};
  auto bytes_at = [&](int64_t n, int m, int64_t heads) {
    HostTensor<float> q(1, heads, n, 64);
    return effattn::workspace_bytes<effattn::Cpu>(effattn::Nystrom{m}, q.view, q.view, q.view, exec);
  };
  EXPECT_EQ(bytes_at(1024, 64, 1), bytes_at(16384, 64, 1));
  // Only as many (batch, head) pairs as threads are in flight at once.
  EXPECT_EQ(bytes_at(4096, 64, 2), bytes_at(4096, 64, 16));
  // O(M·(D + Dv) + M²) per (b, h) in flight plus the tile scratch.
  const size_t m256 = bytes_at(4096, 256, 2);
  EXPECT_LT(m256, size_t(2) * (8 * 256 * 256 + 4 * 256 * 128) * sizeof(float) +
                      2 * effattn::cpu::tile_scratch_bytes<float>(64, 256));
}

TEST(NystromCpu, Errors) {
  HostTensor<float> q(2, 4, 100, 8), k(2, 2, 120, 8), v(2, 2, 120, 6), out(2, 4, 100, 6);
  q.fill_normal();
  k.fill_normal();
  v.fill_normal();
  const auto run = [&](effattn::Nystrom m, effattn::Tensor<const float> kk) {
    effattn::attention<effattn::Cpu>(m, q.cview(), kk, v.cview(), out.view);
  };
  expect_error([&] { run({0}, k.cview()); }, {"Nystrom", "landmarks = 0", ">= 1"});
  expect_error([&] { run({-3}, k.cview()); }, {"landmarks = -3"});
  expect_error([&] { run({16, -1}, k.cview()); }, {"pinv_iterations = -1", ">= 0"});
  expect_error([&] { run({16, 6, NAN}, k.cview()); }, {"Nystrom", "scale = nan"});
  auto bad_k = k.cview();
  bad_k.shape[3] = 4;
  expect_error([&] { run({16}, bad_k); }, {"Nystrom", "q.shape[3] = 8", "k.shape[3] = 4"});
  expect_error([&] { (void)effattn::workspace_bytes<effattn::Cpu>(effattn::Nystrom{0}, q.view, k.view, v.view); },
               {"workspace_bytes", "landmarks = 0"});
  // Causal Nyström is rejected by construction: the method has no causal switch to turn on.
  static_assert(!has_causal<effattn::Nystrom>::value, "Nystrom must not offer causal");
  static_assert(has_causal<effattn::Softmax>::value, "detector sanity check");
}

}  // namespace
