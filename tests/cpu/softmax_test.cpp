// CPU softmax attention against the float64 reference: odd sizes, layouts, masks, causal,
// grouped heads, poisoned outputs, and nothing written outside `out`.
#include <effattn/effattn.hpp>

#include <cstring>

#include "reference/softmax.hpp"
#include "test_util.hpp"

namespace {

using namespace testing_util;

struct Case {
  int64_t B, H, Hk, Nq, Nk, D, Dv;
  bool causal;
  bool masks;
  Layout layout;
  float scale = 0;
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         " Dv=" + std::to_string(c.Dv) + (c.causal ? " causal" : "") + (c.masks ? " masks" : "") + " " +
         layout_name(c.layout);
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
    // The last batch has no valid key; the first has no valid query beyond random drops.
    km = random_mask(c.B, c.Nk, 0.7, c.B > 1 ? c.B - 1 : -1);
    qm = random_mask(c.B, c.Nq, 0.8);
    masks = {qm.data(), c.Nq, km.data(), c.Nk};
  }
  effattn::attention<effattn::Cpu>(effattn::Softmax{c.scale, c.causal}, q.cview(), k.cview(), v.cview(), out.view,
                                   masks, effattn::Exec<effattn::Cpu>{threads});
  const ref::Result r = ref::softmax(q.cview(), k.cview(), v.cview(), masks, c.scale, c.causal);
  data.expect_matches(r, cpu_tolerance<T>());
}

template <class T>
class SoftmaxCpu : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SoftmaxCpu, Types);

TYPED_TEST(SoftmaxCpu, OddSizes) {
  for (int64_t n : {1, 7, 63, 64, 65, 257, 1000})
    for (int64_t d : {1, 32, 80})
      run_case<TypeParam>({2, 2, 2, n, n, d, d, false, false, Layout::bhsd});
}

TYPED_TEST(SoftmaxCpu, HeadDims) {
  for (int64_t d : {32, 64, 80, 128, 256}) run_case<TypeParam>({1, 2, 1, 300, 300, d, d, false, false, Layout::bhsd});
}

TYPED_TEST(SoftmaxCpu, ValueDimDiffers) {
  run_case<TypeParam>({2, 3, 3, 130, 290, 48, 17, false, false, Layout::bhsd});
  run_case<TypeParam>({1, 2, 2, 70, 70, 16, 96, true, true, Layout::padded});
}

TYPED_TEST(SoftmaxCpu, Layouts) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})
    for (bool causal : {false, true}) run_case<TypeParam>({2, 4, 2, 333, 333, 64, 64, causal, true, l});
}

TYPED_TEST(SoftmaxCpu, CausalBottomRightAligned) {
  for (auto [nq, nk] : {std::pair<int64_t, int64_t>{1, 1}, {1, 500}, {100, 700}, {700, 100}, {513, 513}, {64, 320}})
    run_case<TypeParam>({2, 2, 1, nq, nk, 64, 64, true, false, Layout::bhsd});
}

TYPED_TEST(SoftmaxCpu, MasksWithFullyMaskedRows) {
  for (bool causal : {false, true}) run_case<TypeParam>({3, 2, 2, 400, 600, 32, 32, causal, true, Layout::bshd});
}

TYPED_TEST(SoftmaxCpu, GroupedAndMultiQueryHeads) {
  run_case<TypeParam>({2, 8, 2, 200, 200, 64, 64, false, true, Layout::bhsd});
  run_case<TypeParam>({1, 6, 1, 150, 90, 32, 40, true, false, Layout::bshd});
}

TYPED_TEST(SoftmaxCpu, ExplicitScale) {
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, false, false, Layout::bhsd, 0.9f});
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, true, true, Layout::bhsd, -0.3f});
}

// The relative error of the naive float computation (one head, default scale) against `r`: large
// logits lose digits to their own rounding, so tests with them allow twice this.
double naive_float_error(const HostTensor<float>& q, const HostTensor<float>& k, const HostTensor<float>& v,
                         const ref::Result& r) {
  const int64_t Nq = q.view.shape[2], N = k.view.shape[2], D = q.view.shape[3], Dv = v.view.shape[3];
  HostTensor<float> naive(1, 1, Nq, Dv);
  std::vector<float> w(N);
  for (int64_t i = 0; i < Nq; ++i) {
    float mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < N; ++j) {
      float dot = 0;
      for (int64_t c = 0; c < D; ++c) dot += q.view(0, 0, i, c) * k.view(0, 0, j, c);
      mx = std::max(mx, w[j] = dot / std::sqrt(float(D)));
    }
    for (int64_t j = 0; j < N; ++j) sum += w[j] = std::exp(w[j] - mx);
    for (int64_t c = 0; c < Dv; ++c) {
      float o = 0;
      for (int64_t j = 0; j < N; ++j) o += w[j] * v.view(0, 0, j, c);
      naive.view(0, 0, i, c) = o / sum;
    }
  }
  return relative_error(naive.view, r);
}

// Logits of several hundred (inputs x30): no overflow, and float error within 2x that of the
// naive float math (max-subtracted two-pass softmax) on the same inputs; at these magnitudes
// float rounding of the logits alone exceeds 1e-5, so DESIGN.md's 1e-5 cannot apply.
TEST(SoftmaxCpu, LargeLogitsStayFiniteAndAccurate) {
  EFFATTN_TRACE_SEED();
  const int64_t N = 300, D = 64;
  HostTensor<float> q(1, 1, N, D), k(1, 1, N, D), v(1, 1, N, D), out(1, 1, N, D);
  q.fill_normal(30.0 / 8);
  k.fill_normal(30.0 / 8);
  v.fill_normal();
  out.poison();
  effattn::attention<effattn::Cpu>(effattn::Softmax{}, q.cview(), k.cview(), v.cview(), out.view);
  const auto r = ref::softmax(q.cview(), k.cview(), v.cview(), {}, 0, false);
  EXPECT_LE(relative_error(out.view, r), std::max(2 * naive_float_error(q, k, v, r), 1e-5));
}

TYPED_TEST(SoftmaxCpu, ThreadCountsAgree) {
  for (int threads : {1, 2, 3}) run_case<TypeParam>({2, 3, 3, 200, 200, 32, 32, true, true, Layout::bhsd}, threads);
}

TEST(SoftmaxCpu, CallerWorkspaceIsUsed) {
  HostTensor<float> q(1, 2, 100, 32), k(1, 2, 100, 32), v(1, 2, 100, 32), out(1, 2, 100, 32);
  q.fill_normal();
  k.fill_normal();
  v.fill_normal();
  const effattn::Softmax m{};
  const effattn::Exec<effattn::Cpu> probe{2};
  const size_t bytes = effattn::workspace_bytes<effattn::Cpu>(m, q.view, k.view, v.view, probe);
  ASSERT_GT(bytes, 0u);
  void* ws = std::aligned_alloc(64, bytes);
  const auto before = effattn::allocation_stats().current;
  effattn::reset_allocation_peak();
  effattn::attention<effattn::Cpu>(m, q.cview(), k.cview(), v.cview(), out.view, {},
                                   effattn::Exec<effattn::Cpu>{2, ws, bytes});
  EXPECT_EQ(effattn::allocation_stats().peak, before) << "allocated although a workspace was given";
  const auto r = ref::softmax(q.cview(), k.cview(), v.cview(), {}, 0, false);
  EXPECT_LE(relative_error(out.view, r), 1e-5);
  EXPECT_THROW(effattn::attention<effattn::Cpu>(m, q.cview(), k.cview(), v.cview(), out.view, {},
                                                effattn::Exec<effattn::Cpu>{2, ws, bytes / 2}),
               effattn::Error);
  std::free(ws);
}

TEST(SoftmaxCpu, WorkspaceDoesNotGrowWithSequenceLength) {
  const effattn::Exec<effattn::Cpu> exec{2};
  auto bytes_at = [&](int64_t n) {
    HostTensor<float> q(1, 1, n, 64);
    return effattn::workspace_bytes<effattn::Cpu>(effattn::Softmax{}, q.view, q.view, q.view, exec);
  };
  EXPECT_EQ(bytes_at(1024), bytes_at(16384));
}

// ---- Non-finite inputs (issue 14 item 4) and logits beyond T's range ----

// Rows flagged by nan_row(b, h, i) must be entirely NaN; every other row finite and within
// `tolerance` of the reference (max |out - ref| / max |ref| over those rows).
template <class T, class NanRow>
void expect_rows(const Tensor<T>& out, const ref::Result& r, NanRow nan_row, double tolerance) {
  double max_diff = 0, max_ref = 0;
  int64_t wrong = 0;
  for (int64_t b = 0; b < r.B; ++b)
    for (int64_t h = 0; h < r.H; ++h)
      for (int64_t i = 0; i < r.N; ++i) {
        const bool nan = nan_row(b, h, i);
        for (int64_t c = 0; c < r.Dv; ++c) {
          const double o = ref::at(out, b, h, i, c);
          if (nan != std::isnan(o) || (!nan && !std::isfinite(o))) {
            if (wrong++ < 5) ADD_FAILURE() << "out(" << b << "," << h << "," << i << "," << c << ") = " << o << (nan ? ", expected NaN" : "");
            continue;
          }
          if (nan) continue;
          max_diff = std::max(max_diff, std::abs(o - r(b, h, i, c)));
          max_ref = std::max(max_ref, std::abs(r(b, h, i, c)));
        }
      }
  EXPECT_EQ(wrong, 0);
  EXPECT_LE(max_ref > 0 ? max_diff / max_ref : max_diff, tolerance);
}

template <class T>
void set(HostTensor<T>& t, int64_t b, int64_t h, int64_t s, int64_t d, double x) {
  t.view(b, h, s, d) = static_cast<T>(x);
}

TYPED_TEST(SoftmaxCpu, NonFiniteQueryMakesItsRowNaN) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (bool causal : {false, true}) {
    AttentionData<T> data(1, 2, 2, 200, 200, 32, 32, Layout::bshd);
    auto& [q, k, v, out] = data;
    set(q, 0, 0, 5, 3, nan);
    set(q, 0, 0, 77, 0, inf);
    set(q, 0, 1, 130, 31, -inf);
    set(q, 0, 1, 150, 7, nan);  // an invalid query: zero, whatever its values
    std::vector<uint8_t> qm(200, 1);
    qm[150] = 0;
    const effattn::Masks masks{qm.data(), 200, nullptr, 0};
    effattn::attention<effattn::Cpu>(effattn::Softmax{0, causal}, q.cview(), k.cview(), v.cview(), out.view, masks);
    const ref::Result r = ref::softmax(q.cview(), k.cview(), v.cview(), masks, 0, causal);
    expect_rows(out.view, r, [](int64_t, int64_t h, int64_t i) { return (h == 0 && (i == 5 || i == 77)) || (h == 1 && i == 130); },
                cpu_tolerance<T>());
    for (int64_t c = 0; c < 32; ++c) EXPECT_EQ(out.view(0, 1, 150, c), T(0));
  }
}

TYPED_TEST(SoftmaxCpu, NonFiniteVisibleKeyOrValueMakesTheRowsThatSeeItNaN) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  // Causal, N = 300: a NaN in k_100 reaches rows >= 100; an inf in v_200 rows >= 200 (already
  // NaN); in head 1 a -inf in k_299 and a NaN in v_299 only row 299, though rows 288..298 share
  // its block on the diagonal.
  AttentionData<T> data(1, 2, 2, 300, 300, 32, 32, Layout::bhsd);
  auto& [q, k, v, out] = data;
  set(k, 0, 0, 100, 2, nan);
  set(v, 0, 0, 200, 5, inf);
  set(k, 0, 1, 299, 0, -inf);
  set(v, 0, 1, 299, 9, nan);
  effattn::attention<effattn::Cpu>(effattn::Softmax{0, true}, q.cview(), k.cview(), v.cview(), out.view);
  const ref::Result r = ref::softmax(q.cview(), k.cview(), v.cview(), {}, 0, true);
  expect_rows(out.view, r, [](int64_t, int64_t h, int64_t i) { return h == 0 ? i >= 100 : i == 299; }, cpu_tolerance<T>());

  // Without causal every row sees every valid key: an inf in one value row poisons them all.
  AttentionData<T> all(1, 1, 1, 70, 90, 16, 16, Layout::bhsd);
  set(all.v, 0, 0, 33, 0, -inf);
  effattn::attention<effattn::Cpu>(effattn::Softmax{}, all.q.cview(), all.k.cview(), all.v.cview(), all.out.view);
  expect_rows(all.out.view, ref::softmax(all.q.cview(), all.k.cview(), all.v.cview(), {}, 0, false),
              [](int64_t, int64_t, int64_t) { return true; }, 0);
}

TYPED_TEST(SoftmaxCpu, MaskedOrCausallyHiddenNonFiniteKeysChangeNothing) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (bool causal : {false, true}) {
    AttentionData<T> data(2, 2, 1, 257, 257, 32, 40, Layout::padded);
    auto& [q, k, v, out] = data;
    std::vector<uint8_t> km(2 * 257, 1);
    for (int64_t j : {0, 17, 100, 255, 256}) {  // masked keys full of NaN and inf, in both batches
      km[j] = km[257 + j] = 0;
      for (int64_t b = 0; b < 2; ++b) {
        set(k, b, 0, j, 1, nan);
        set(k, b, 0, j, 2, inf);
        set(v, b, 0, j, 3, -inf);
        set(v, b, 0, j, 39, nan);
      }
    }
    if (causal) km[257 + 256] = 1;  // batch 1: the poisoned last key is hidden from every row but the last
    const effattn::Masks masks{nullptr, 0, km.data(), 257};
    effattn::attention<effattn::Cpu>(effattn::Softmax{0, causal}, q.cview(), k.cview(), v.cview(), out.view, masks);
    const ref::Result r = ref::softmax(q.cview(), k.cview(), v.cview(), masks, 0, causal);
    expect_rows(out.view, r, [&](int64_t b, int64_t, int64_t i) { return causal && b == 1 && i == 256; },
                cpu_tolerance<T>());
  }
}

// Finite inputs whose scaled logits overflow float are computed exactly (in double).
TEST(SoftmaxCpu, LogitsBeyondFloatRangeAreExact) {
  EFFATTN_TRACE_SEED();
  for (bool causal : {false, true}) {
    // |q|, |k| ~ 1e20: logits ~ 1e40 overflow float; one query row stays moderate.
    AttentionData<float> big(1, 2, 2, 150, 150, 32, 32, Layout::bhsd);
    for (auto* t : {&big.q, &big.k})
      for (auto& x : t->storage) x *= 1e20f;
    for (int64_t c = 0; c < 32; ++c) big.q.view(0, 1, 9, c) *= 1e-40f;
    effattn::attention<effattn::Cpu>(effattn::Softmax{0, causal}, big.q.cview(), big.k.cview(), big.v.cview(), big.out.view);
    big.expect_matches(ref::softmax(big.q.cview(), big.k.cview(), big.v.cview(), {}, 0, causal), 1e-5);
    // scale = 3e38: every logit beyond float's range, scale·q too.
    AttentionData<float> scaled(1, 1, 1, 100, 120, 16, 16, Layout::bshd);
    const effattn::Softmax m{3e38f, causal};
    effattn::attention<effattn::Cpu>(m, scaled.q.cview(), scaled.k.cview(), scaled.v.cview(), scaled.out.view);
    scaled.expect_matches(ref::softmax(scaled.q.cview(), scaled.k.cview(), scaled.v.cview(), {}, 3e38f, causal), 1e-5);
  }
}

// In double, logits beyond double's range (long double path): the softmax is one-hot at the
// largest logit, which for these inputs is far ahead of the second.
TEST(SoftmaxCpu, LogitsBeyondDoubleRangeAreFinite) {
  const int64_t N = 40, D = 8;
  HostTensor<double> q(1, 1, N, D), k(1, 1, N, D), v(1, 1, N, D), out(1, 1, N, D);
  q.fill_normal();
  k.fill_normal();
  v.fill_normal();
  for (auto* t : {&q, &k})
    for (auto& x : t->storage) x *= 1e160;
  out.poison();
  effattn::attention<effattn::Cpu>(effattn::Softmax{}, q.cview(), k.cview(), v.cview(), out.view);
  for (int64_t i = 0; i < N; ++i) {
    int64_t best = 0;
    long double best_dot = -INFINITY;
    for (int64_t j = 0; j < N; ++j) {
      long double dot = 0;
      for (int64_t c = 0; c < D; ++c) dot += (long double)q.view(0, 0, i, c) * k.view(0, 0, j, c);
      if (dot > best_dot) best_dot = dot, best = j;
    }
    for (int64_t c = 0; c < D; ++c) EXPECT_EQ(out.view(0, 0, i, c), v.view(0, 0, best, c)) << "row " << i;
  }
}

// The optional per-row log-sum-exp of the tile kernel against a float64 one: masks (an invalid
// query and a batch with no valid key give -inf), causal, odd sizes, both types.
TYPED_TEST(SoftmaxCpu, RowLogSumExpMatchesFloat64) {
  using T = TypeParam;
  EFFATTN_TRACE_SEED();
  for (bool causal : {false, true})
    for (auto [nq, nk] : {std::pair<int64_t, int64_t>{1, 1}, {100, 333}, {333, 100}, {513, 513}}) {
      SCOPED_TRACE("nq=" + std::to_string(nq) + " nk=" + std::to_string(nk) + (causal ? " causal" : ""));
      const int64_t d = 40, dv = 24;
      HostTensor<T> q(1, 1, nq, d), k(1, 1, nk, d), v(1, 1, nk, dv), out(1, 1, nq, dv);
      q.fill_normal(1.5);
      k.fill_normal(1.5);
      v.fill_normal();
      std::vector<uint8_t> qm = random_mask(1, nq, 0.9), km = random_mask(1, nk, 0.8);
      std::vector<T> lse(size_t(nq), T(7));
      effattn::cpu::HeadAttention<T> p;
      p.q = effattn::cpu::head_rows(q.cview(), 0, 0);
      p.k = effattn::cpu::head_rows(k.cview(), 0, 0);
      p.v = effattn::cpu::head_rows(v.cview(), 0, 0);
      p.out = effattn::cpu::head_rows(out.view, 0, 0);
      p.query_valid = qm.data();
      p.key_valid = km.data();
      p.scale = T(0.3);
      p.causal = causal;
      p.causal_offset = nk - nq;
      p.lse = lse.data();
      std::vector<unsigned char> scratch(effattn::cpu::tile_scratch_bytes<T>(d, dv));
      effattn::cpu::attend_head(p, effattn::detail::Arena(scratch.data(), scratch.size()));
      for (int64_t i = 0; i < nq; ++i) {
        double m = -INFINITY;
        std::vector<double> s;
        for (int64_t j = 0; j < nk; ++j) {
          if (!km[size_t(j)] || (causal && j > i + nk - nq)) continue;
          double dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += double(q.view(0, 0, i, c)) * double(k.view(0, 0, j, c));
          s.push_back(double(T(0.3)) * dot);
          m = std::max(m, s.back());
        }
        double sum = 0;
        for (double x : s) sum += std::exp(x - m);
        const double expected = qm[size_t(i)] && !s.empty() ? m + std::log(sum) : -INFINITY;
        if (std::isinf(expected))
          EXPECT_EQ(double(lse[size_t(i)]), expected) << "row " << i;
        else
          EXPECT_NEAR(double(lse[size_t(i)]), expected, cpu_tolerance<T>() * std::max(1.0, std::abs(expected))) << "row " << i;
      }
    }
}

// ---- The tile kernel's exp2 ----------------------------------------------------------------------

// exp2_neg element by element against exp2 in long double over [-130, 0] and at its edges: a few
// ulps where the result is normal (the polynomial's error is far below one), 0 below the normal
// range (never a subnormal), 0 for -inf, NaN for NaN.
template <class T>
void check_exp2_neg() {
  using P = typename effattn::cpu::detail_tiles::Simd<T>::P;
  constexpr int L = effattn::cpu::detail_tiles::Simd<T>::L;
  const long double eps = std::numeric_limits<T>::epsilon();
  const T tiny = std::numeric_limits<T>::min();
  std::uniform_real_distribution<double> arg(std::is_same_v<T, float> ? -130.0 : -1030.0, 0.0);
  std::vector<T> x(4096), y(4096);
  for (auto& v : x) v = static_cast<T>(arg(rng()));
  const T edges[] = {T(0), -T(0), T(-1) / 16, T(-0.5), T(-1), T(-125), T(-126), T(-1022), T(-1023),
                     -std::numeric_limits<T>::infinity(), std::numeric_limits<T>::quiet_NaN()};
  std::copy(std::begin(edges), std::end(edges), x.begin());
  for (size_t i = 0; i < x.size(); i += L)
    Eigen::internal::pstoreu(y.data() + i, effattn::cpu::detail_tiles::exp2_neg(Eigen::internal::ploadu<P>(x.data() + i)));
  for (size_t i = 0; i < x.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "x " << x[i]);
    const long double e = std::exp2(static_cast<long double>(x[i]));
    if (std::isnan(x[i])) {
      EXPECT_TRUE(std::isnan(y[i]));
    } else if (e < 2 * static_cast<long double>(tiny)) {  // the last binade above 0 may be flushed
      EXPECT_TRUE(y[i] == T(0) || std::abs(y[i] - e) <= 3 * eps * e) << y[i];
    } else {
      EXPECT_LE(std::abs(y[i] - e), 3 * eps * e) << y[i];
    }
    EXPECT_FALSE(y[i] != T(0) && std::abs(y[i]) < tiny) << "subnormal " << y[i];
  }
}

TEST(SoftmaxTiles, Exp2NegMatchesLongDouble) {
  EFFATTN_TRACE_SEED();
  check_exp2_neg<float>();
  check_exp2_neg<double>();
}

#if defined(EFFATTN_FOLDED_EXP)
// The folded exp 2^(s − m) of this ISA (AVX2 or AVX-512; reference m on the 1/8 grid, |m| <=
// kMaxReference): without the clamp it is bit for bit the clamped one for s >= m − 125 and a few
// ulps from exp2; with the clamp, s below m − 125 gives a value in [0, 2^-124], never a subnormal;
// NaN stays NaN either way.
TEST(SoftmaxTiles, ShiftedExp2MatchesLongDouble) {
  EFFATTN_TRACE_SEED();
  using effattn::cpu::detail_tiles::FoldedExp;
  using Eigen::internal::ploadu;
  using Eigen::internal::pset1;
  using Eigen::internal::pstoreu;
  using P = FoldedExp::P;
  constexpr int L = FoldedExp::kLanes;
  const long double eps = std::numeric_limits<float>::epsilon();
  std::uniform_int_distribution<int> grid(-8 * 4096, 8 * 4096);
  std::uniform_real_distribution<double> below(-125.0, 0.0), far(-400.0, -125.0);
  for (int trial = 0; trial < 64; ++trial) {
    // The largest references the fold allows, then random ones.
    const float m = trial < 2 ? (trial == 0 ? 1 : -1) * FoldedExp::kMaxReference : static_cast<float>(grid(rng())) / 8;
    SCOPED_TRACE(::testing::Message() << "m " << m);
    const P c1 = pset1<P>(FoldedExp::kMagic - m), lo = pset1<P>(m - 125.0f);
    float s[L], clamped[L], bare[L];
    for (int rep = 0; rep < 64; ++rep) {
      for (float& v : s) v = std::max(m - 125.0f, static_cast<float>(m + below(rng())));
      if (rep == 0) s[0] = m, s[1] = m - 125.0f, s[2] = std::numeric_limits<float>::quiet_NaN();
      pstoreu(clamped, FoldedExp::weights<true>(ploadu<P>(s), c1, lo));
      pstoreu(bare, FoldedExp::weights<false>(ploadu<P>(s), c1, lo));
      for (int l = 0; l < L; ++l) {
        SCOPED_TRACE(::testing::Message() << "s " << s[l]);
        if (std::isnan(s[l])) {
          EXPECT_TRUE(std::isnan(clamped[l]) && std::isnan(bare[l]));
          continue;
        }
        EXPECT_EQ(std::memcmp(&clamped[l], &bare[l], sizeof(float)), 0) << clamped[l] << " " << bare[l];
        const long double e = std::exp2(static_cast<long double>(s[l]) - static_cast<long double>(m));
        EXPECT_LE(std::abs(bare[l] - e), 3 * eps * e) << bare[l];
      }
      for (float& v : s) v = static_cast<float>(m + far(rng()));
      if (rep == 0) s[0] = -std::numeric_limits<float>::infinity();
      pstoreu(clamped, FoldedExp::weights<true>(ploadu<P>(s), c1, lo));
      for (int l = 0; l < L; ++l) {
        if (s[l] >= m - 125.0f) continue;  // rounding put it back in range
        EXPECT_TRUE(clamped[l] >= std::numeric_limits<float>::min() && clamped[l] <= std::ldexp(1.0f, -124))
            << "s " << s[l] << " gives " << clamped[l];
      }
    }
  }
}
#endif

// Within one key tile, rows whose logits lie within 125 (log2 units) of their max take the exp
// without the clamp, the others with it; both against the float64 reference. Keys are +w or -w
// plus a little noise and query i is c_i w plus noise: block 0 (the first W rows: 16 with AVX2,
// 32 with AVX-512) spreads over ~60; in block 1 (the next W) half the keys sit ~245 below the max, where an exp without the clamp would
// wrap its exponent into finite negative weights (so not into a non-finite sum the exact path
// would catch); checked here in double: those keys lie 230-270 below, the others within 40.
// Logits this large lose digits to their own rounding: the bound is LargeLogits' (2× naive float).
TEST(SoftmaxCpu, LogitSpreadAboveAndBelowTheClamp) {
  EFFATTN_TRACE_SEED();
  constexpr int64_t W = effattn::cpu::detail_tiles::Simd<float>::W;
  const int64_t N = 256, Nq = 2 * W, D = 64;
  HostTensor<float> q(1, 1, Nq, D), k(1, 1, N, D), v(1, 1, N, D), out(1, 1, Nq, D), noise_q(1, 1, Nq, D),
      noise_k(1, 1, N, D);
  noise_q.fill_normal(0.05);
  noise_k.fill_normal(0.05);
  v.fill_normal();
  out.poison();
  std::normal_distribution<double> normal;
  std::vector<double> w(D);
  double w2 = 0;
  for (double& x : w) x = normal(rng()), w2 += x * x;
  const double scale = 1 / std::sqrt(double(D)), log2e = 1.4426950408889634;
  for (int64_t j = 0; j < N; ++j)
    for (int64_t c = 0; c < D; ++c) k.view(0, 0, j, c) = static_cast<float>((j % 2 ? -w[c] : w[c]) + noise_k.view(0, 0, j, c));
  for (int64_t i = 0; i < Nq; ++i) {
    const double gap = i < W ? 60 : 245, ci = gap / (2 * w2 * scale * log2e);  // between the two modes
    for (int64_t c = 0; c < D; ++c) q.view(0, 0, i, c) = static_cast<float>(ci * w[c] + noise_q.view(0, 0, i, c));
  }
  for (int64_t i = 0; i < Nq; ++i) {
    std::vector<double> s(N);
    for (int64_t j = 0; j < N; ++j) {
      double dot = 0;
      for (int64_t c = 0; c < D; ++c) dot += double(q.view(0, 0, i, c)) * k.view(0, 0, j, c);
      s[j] = dot * scale * log2e;
    }
    const double hi = *std::max_element(s.begin(), s.end()), lo = *std::min_element(s.begin(), s.end());
    if (i < W) {
      ASSERT_LT(hi - lo, 100) << "row " << i;
    } else {
      for (double x : s) ASSERT_TRUE(x >= hi - 40 || (x <= hi - 230 && x >= hi - 270)) << "row " << i << " logit " << x - hi;
    }
  }
  effattn::attention<effattn::Cpu>(effattn::Softmax{}, q.cview(), k.cview(), v.cview(), out.view);
  const auto r = ref::softmax(q.cview(), k.cview(), v.cview(), {}, 0, false);
  EXPECT_LE(relative_error(out.view, r), std::max(2 * naive_float_error(q, k, v, r), 1e-5));
}

}  // namespace
