// CPU FAVOR+ attention against the float64 reference for every feature map, bidirectional and
// causal: odd sizes, layouts, masks with fully masked rows, grouped heads, shared and per-head
// projections, large inputs, workspace rules and every argument check.
#include <effattn/effattn.hpp>

#include "favor_cases.hpp"
#include "reference/favor.hpp"

namespace {

using namespace testing_util;
using namespace favor_cases;

/// Everything the reference needs, as views.
template <class T>
struct Inputs {
  effattn::Tensor<const T> q, k, v;
  effattn::Masks masks;
  effattn::Tensor<const float> proj;
  Case c;
  /// The reference in a type wider than T, and the condition number of its normalizer sums.
  ref::Result accurate(double* condition = nullptr) const {
    using Wide = std::conditional_t<std::is_same_v<T, double>, long double, double>;
    return ref::favor<Wide>(q, k, v, masks, proj, c.map, c.causal, c.scale, c.eps, condition);
  }
};

template <class T>
struct Problem : FavorData<T> {
  using FavorData<T>::FavorData;
  Inputs<T> inputs() const { return {this->q.cview(), this->k.cview(), this->v.cview(), this->masks, this->proj.view, this->c}; }
};

template <class T>
void run_problem(Problem<T>& p, int threads = 0) {
  const Case& c = p.c;
  const T sentinel = T(12345);
  mark_outside(p.out, sentinel);
  p.forward(threads);
  const Inputs<T> in = p.inputs();
  double condition = 0;
  const ref::Result r = in.accurate(&condition);
  const double err = relative_error(p.out.view, r);
  EXPECT_LE(err, tolerance<T>(condition)) << "condition number " << condition;
  if (std::getenv("FAVOR_TEST_VERBOSE")) std::printf("%-90s err %.3g cond %.3g ratio %.3g\n", describe(c).c_str(), err, condition, err / cpu_tolerance<T>() / condition);
  EXPECT_TRUE(outside_untouched(p.out, sentinel)) << "wrote outside the out view";
}

template <class T>
void run_case(const Case& c, int threads = 0) {
  SCOPED_TRACE(describe(c));
  EFFATTN_TRACE_SEED();
  Problem<T> p(c);
  run_problem(p, threads);
}


template <class T>
class FavorCpu : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(FavorCpu, Types);

TYPED_TEST(FavorCpu, EveryMapBidirectionalAndCausal) {
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true}) run_case<TypeParam>({2, 2, 2, 300, 300, 32, 32, 64, map, causal, false});
}

TYPED_TEST(FavorCpu, OddSizes) {
  for (FeatureMap map : kMaps)
    for (int64_t n : {1, 7, 65, 257, 1000})
      for (bool causal : {false, true}) run_case<TypeParam>({1, 2, 2, n, n, 16, 24, 37, map, causal, false});
}

TYPED_TEST(FavorCpu, FeatureCountsAndHeadDims) {
  for (int64_t m : {1, 3, 256, 300}) run_case<TypeParam>({1, 1, 1, 150, 150, 32, 32, m, FeatureMap::positive, true, false});
  for (int64_t d : {1, 32, 64, 80, 128})
    for (FeatureMap map : kMaps) run_case<TypeParam>({1, 2, 1, 260, 260, d, d, 48, map, false, false});
}

TYPED_TEST(FavorCpu, Layouts) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})
    for (bool causal : {false, true})
      run_case<TypeParam>({2, 4, 2, 333, 333, 64, 40, 64, FeatureMap::positive, causal, true, l});
}

TYPED_TEST(FavorCpu, CausalBottomRightAligned) {
  for (FeatureMap map : kMaps)
    for (auto [nq, nk] : {std::pair<int64_t, int64_t>{1, 1}, {1, 500}, {100, 700}, {700, 100}, {513, 513}, {64, 320},
                          {65, 63}})
      run_case<TypeParam>({1, 2, 1, nq, nk, 32, 32, 40, map, true, false});
}

TYPED_TEST(FavorCpu, MasksWithFullyMaskedRows) {
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true})
      run_case<TypeParam>({3, 2, 2, 400, 600, 32, 32, 50, map, causal, true, Layout::bshd});
}

TYPED_TEST(FavorCpu, GroupedHeadsWithSharedAndPerHeadProjections) {
  for (bool shared : {false, true}) {
    run_case<TypeParam>({2, 8, 2, 200, 200, 64, 64, 64, FeatureMap::positive, false, true, Layout::bhsd, shared});
    run_case<TypeParam>({1, 6, 1, 150, 90, 32, 40, 32, FeatureMap::relu, true, false, Layout::bshd, shared});
    run_case<TypeParam>({1, 4, 2, 120, 120, 16, 16, 20, FeatureMap::trig, true, true, Layout::padded, shared});
  }
}

TYPED_TEST(FavorCpu, ExplicitScaleAndEps) {
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, 64, FeatureMap::positive, false, false, Layout::bhsd, false, 0.3f, 1e-3f});
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, 64, FeatureMap::relu, true, true, Layout::bhsd, false, 0.05f, 0.1f});
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, 64, FeatureMap::trig, false, false, Layout::bhsd, false, 0.02f});
}

// Input magnitudes where exp(u) alone would overflow float (std 5: u reaches ~100) or where the
// stabilizers push features below eps: positive and relu still match the reference.
TYPED_TEST(FavorCpu, InputRangesWhereStabilizersMatter) {
  for (double stddev : {0.1, 0.5, 2.0, 5.0, 30.0})
    for (FeatureMap map : {FeatureMap::positive, FeatureMap::relu})
      for (bool causal : {false, true})
        run_case<TypeParam>({1, 2, 2, 200, 200, 64, 64, 64, map, causal, true, Layout::bhsd, false, 0, 0, stddev});
}

// The range rule of cpu/favor.hpp: eps tiny next to exp parts that underflow T (|x| ~ 4: exp
// parts ~1e-20, products ~1e-40; |x| ~ 10: every exp part below eps) or huge (eps² overflows
// float) gives the reference's rows, neither zeros nor NaN.
TYPED_TEST(FavorCpu, ExtremeEpsKeepsRowsInRange) {
  const double huge = std::is_same_v<TypeParam, float> ? 1e38 : 1e300;
  for (FeatureMap map : {FeatureMap::positive, FeatureMap::relu})
    for (bool causal : {false, true}) {
      for (double stddev : {4.0, 10.0})
        run_case<TypeParam>({1, 2, 2, 200, 200, 32, 32, 32, map, causal, true, Layout::bhsd, false, 0, 1e-30, stddev});
      run_case<TypeParam>({1, 2, 2, 200, 200, 32, 32, 32, map, causal, true, Layout::bhsd, false, 0, huge});
    }
}

// Trig at larger inputs: the accuracy bound scales with the condition number (tolerance()),
// which grows with |x'|²; at x30, exp(|x'|²/2 - c) also underflows differently in float and
// double, so there the contract is finiteness.
TEST(FavorCpu, TrigAtLargerInputs) {
  EFFATTN_TRACE_SEED();
  for (double stddev : {2.0, 4.0})
    for (bool causal : {false, true})
      run_case<float>({2, 2, 2, 300, 300, 64, 64, 64, FeatureMap::trig, causal, true, Layout::bhsd, false, 0, 0, stddev});
  for (bool causal : {false, true}) {
    Problem<float> p({2, 2, 2, 300, 300, 64, 64, 64, FeatureMap::trig, causal, true, Layout::bhsd, false, 0, 0, 30.0});
    p.forward();
    for (float x : p.out.storage) ASSERT_TRUE(std::isfinite(x));
  }
}

// Masked keys must be invisible, normalizer and key stabilizer included: the masked problem
// equals the problem with those keys removed. The masked keys are large and aligned with
// the projection, so counting them in the key max would change every feature.
TYPED_TEST(FavorCpu, MaskedKeysEqualRemovedKeys) {
  EFFATTN_TRACE_SEED();
  for (FeatureMap map : kMaps) {
    SCOPED_TRACE(map_name(map));
    const int64_t N = 300, D = 32, M = 48;
    Problem<TypeParam> p({1, 2, 2, N, N, D, D, M, map, false, true});
    p.qm.assign(N, 1);
    p.km = random_mask(1, N, 0.6);
    p.masks = {p.qm.data(), 0, p.km.data(), 0};
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t j = 0; j < N; ++j)
        if (!p.km[j])
          for (int64_t c = 0; c < D; ++c) p.k.view(0, h, j, c) = TypeParam(3) * TypeParam(p.proj.w[(h * M + j % M) * D + c]);
    p.forward();
    int64_t kept = 0;
    for (uint8_t m : p.km) kept += m;
    HostTensor<TypeParam> k2(1, 2, kept, D), v2(1, 2, kept, D), out2(1, 2, N, D);
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t j = 0, t = 0; j < N; ++j)
        if (p.km[j]) {
          for (int64_t c = 0; c < D; ++c) {
            k2.view(0, h, t, c) = p.k.view(0, h, j, c);
            v2.view(0, h, t, c) = p.v.view(0, h, j, c);
          }
          ++t;
        }
    out2.poison();
    effattn::attention<effattn::Cpu>(p.method(), p.q.cview(), k2.cview(), v2.cview(), out2.view);
    const Inputs<TypeParam> compact{p.q.cview(), k2.cview(), v2.cview(), {}, p.proj.view, p.c};
    double condition = 0;
    const auto r = compact.accurate(&condition);
    EXPECT_LE(relative_error(p.out.view, r), tolerance<TypeParam>(condition));
    EXPECT_LE(relative_error(out2.view, r), tolerance<TypeParam>(condition));
  }
}

// The bidirectional positive key pass rescales what it has summed whenever a key tile raises the
// running key max (plant_key_maxima: every tile does, or none), against the reference, which takes
// the key max over all keys at once. FavorBackwardCpu.KeyMaxGrowingAcrossTiles does the backward.
TYPED_TEST(FavorCpu, KeyMaxGrowingAcrossTiles) {
  EFFATTN_TRACE_SEED();
  for (bool growing : {true, false}) {
    SCOPED_TRACE(growing ? "growing" : "shrinking");
    const int64_t N = 3 * 256 + 37, D = 32, M = 64;
    Problem<TypeParam> p({1, 2, 2, N, N, D, D, M, FeatureMap::positive, false, false});
    ASSERT_TRUE(plant_key_maxima(p, growing));
    run_problem(p);
  }
}

TYPED_TEST(FavorCpu, ThreadCountsAgree) {
  for (int threads : {1, 2, 3})
    run_case<TypeParam>({2, 3, 3, 200, 200, 32, 32, 40, FeatureMap::positive, true, true}, threads);
}

TEST(FavorCpu, CallerWorkspaceIsUsed) {
  EFFATTN_TRACE_SEED();
  Problem<float> p({1, 2, 2, 400, 400, 32, 32, 64, FeatureMap::positive, true, false});
  const effattn::Exec<effattn::Cpu> probe{2};
  const size_t bytes = effattn::workspace_bytes<effattn::Cpu>(p.method(), p.q.view, p.k.view, p.v.view, probe);
  ASSERT_GT(bytes, 0u);
  void* ws = std::aligned_alloc(64, bytes);
  const auto before = effattn::allocation_stats().current;
  effattn::reset_allocation_peak();
  effattn::attention<effattn::Cpu>(p.method(), p.q.cview(), p.k.cview(), p.v.cview(), p.out.view, {},
                                   effattn::Exec<effattn::Cpu>{2, ws, bytes});
  EXPECT_EQ(effattn::allocation_stats().peak, before) << "allocated although a workspace was given";
  EXPECT_LE(relative_error(p.out.view, p.inputs().accurate()), 1e-5);
  EXPECT_THROW(effattn::attention<effattn::Cpu>(p.method(), p.q.cview(), p.k.cview(), p.v.cview(), p.out.view, {},
                                                effattn::Exec<effattn::Cpu>{2, ws, bytes - 1}),
               effattn::Error);
  std::free(ws);
}

TEST(FavorCpu, WorkspaceDoesNotGrowWithSequenceLength) {
  const effattn::Exec<effattn::Cpu> exec{2};
  Projection proj(1, 256, 64, 1);
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true}) {
      auto bytes_at = [&](int64_t n) {
        HostTensor<float> q(1, 2, n, 64);
        return effattn::workspace_bytes<effattn::Cpu>(effattn::Favor{proj.view, map, causal}, q.view, q.view, q.view,
                                                      exec);
      };
      EXPECT_EQ(bytes_at(1024), bytes_at(65536));
    }
}

// --- argument checks -------------------------------------------------------------------------

TEST(FavorCpu, ArgumentErrors) {
  Problem<float> p({2, 4, 2, 10, 12, 8, 6, 16, FeatureMap::positive, false, false});
  const auto run = [&](effattn::Favor m) {
    effattn::attention<effattn::Cpu>(m, p.q.cview(), p.k.cview(), p.v.cview(), p.out.view);
  };
  const auto with = [&](int dim, int64_t value) {
    effattn::Favor m = p.method();
    m.projection.shape[dim] = value;
    return m;
  };
  expect_error([&] { run(with(2, 0)); }, {"projection.shape[2] (features M) = 0", ">= 1"});
  expect_error([&] { run(with(0, 2)); }, {"projection.shape[0] = 2", "must be 1"});
  expect_error([&] { run(with(1, 3)); }, {"projection has 3 heads", "1 or H = 4"});
  expect_error([&] { run(with(3, 7)); }, {"projection.shape[3] = 7", "D = 8"});
  effattn::Favor m = p.method();
  m.projection.data = nullptr;
  expect_error([&] { run(m); }, {"projection.data is null"});
  m = p.method();
  m.scale = -0.5f;
  expect_error([&] { run(m); }, {"scale = -0.5", "positive"});
  m = p.method();
  m.eps = -1e-3f;
  expect_error([&] { run(m); }, {"eps = -0.001", ">= 0"});
  m.eps = NAN;
  expect_error([&] { run(m); }, {"eps = nan"});
  m = p.method();
  m.map = FeatureMap::trig;
  m.eps = 0.5f;
  expect_error([&] { run(m); }, {"eps = 0.5", "trig"});
  m = p.method();
  m.map = static_cast<FeatureMap>(7);
  expect_error([&] { run(m); }, {"map = 7"});
  // The shared checks apply too.
  auto k = p.k.cview();
  k.shape[3] = 4;
  expect_error([&] { effattn::attention<effattn::Cpu>(p.method(), p.q.cview(), k, p.v.cview(), p.out.view); },
               {"q.shape[3] = 8", "k.shape[3] = 4"});
  expect_error([&] { effattn::attention<effattn::Cpu>(p.method(), p.q.cview(), p.k.cview(), p.v.cview(), p.out.view, {},
                                                      effattn::Exec<effattn::Cpu>{-1}); },
               {"exec.threads = -1"});
}

TEST(FavorCpu, OutputOverlappingTheProjection) {
  // out [1, 1, 4, 8] laid over the projection's storage.
  Projection proj(1, 32, 8, 3);
  HostTensor<float> q(1, 1, 4, 8), k(1, 1, 4, 8), v(1, 1, 4, 8);
  q.fill_normal();
  k.fill_normal();
  v.fill_normal();
  effattn::Tensor<float> out = effattn::bhsd(const_cast<float*>(proj.w.data()), 1, 1, 4, 8);
  expect_error([&] { effattn::attention<effattn::Cpu>(effattn::Favor{proj.view}, q.cview(), k.cview(), v.cview(), out); },
               {"out overlaps projection"});
}

}  // namespace

namespace {

/// The positive map's exp row (effattn::cpu::favor::positive_feature_row) element by element
/// against std::exp in long double, for lengths around the SIMD width: within a few ulps plus the
/// argument's rounding, the value or 0 just above the normal range, 0 below it (never a
/// subnormal), NaN for NaN, +inf for +inf, std::exp's value for positive arguments.
template <class T>
void check_positive_feature_row() {
  const T tiny = std::numeric_limits<T>::min();
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  std::mt19937_64 rng(testing_util::base_seed());
  std::uniform_real_distribution<double> arg(std::is_same_v<T, float> ? -95.0 : -720.0, 0.0);
  for (int64_t M : {1, 7, 8, 9, 16, 31, 257}) {
    const T shift = T(3.25), floor = T(0.5);
    std::vector<T> u(static_cast<size_t>(M)), row, de(static_cast<size_t>(M), T(-7));
    for (auto& x : u) x = static_cast<T>(arg(rng)) + shift;
    if (M > 3) {
      u[1] = nan;
      u[2] = inf;
      u[3] = shift + T(2);  // positive argument
      u[0] = -inf;
    }
    row = u;
    effattn::cpu::favor::positive_feature_row(row.data(), M, shift, floor, de.data());
    for (int64_t m = 0; m < M; ++m) {
      SCOPED_TRACE(::testing::Message() << "M " << M << " m " << m << " u " << u[m]);
      const long double e = std::exp(static_cast<long double>(u[m]) - static_cast<long double>(shift));
      if (std::isnan(u[m])) {
        EXPECT_TRUE(std::isnan(de[m]) && std::isnan(row[m]));
      } else if (e < static_cast<long double>(tiny) * 2) {  // at and below 2^-125 (float) the value may be 0
        EXPECT_TRUE(de[m] == T(0) || std::abs(de[m] - e) <= 1e-6L * e) << de[m];
        EXPECT_EQ(row[m], de[m] + floor);
      } else if (std::isinf(u[m])) {
        EXPECT_EQ(de[m], inf);
      } else {
        // The polynomial's few ulps plus the rounding of the argument in log2 units, x ulp(1) / 2
        // relative to 2^x (the exact argument is u - shift, formed exactly here).
        const long double eps = std::numeric_limits<T>::epsilon();
        const long double x = std::abs(static_cast<long double>(u[m]) - shift) * 1.4426950408889634L;
        EXPECT_LE(std::abs(de[m] - e), eps * (4 + x) * e) << de[m];
        EXPECT_EQ(row[m], de[m] + floor);
      }
      EXPECT_FALSE(de[m] != T(0) && std::abs(de[m]) < tiny) << "subnormal " << de[m];
    }
  }
}

TEST(FavorCpu, PositiveFeatureRowMatchesExp) {
  EFFATTN_TRACE_SEED();
  check_positive_feature_row<float>();
  check_positive_feature_row<double>();
}

}  // namespace
