// CPU FAVOR+ backward against the float64 reference backward (DESIGN.md, "Backward"), which is
// itself checked against finite differences of the float64 forward with its stabilizers held:
// every map, bidirectional and causal (Nq != Nk both ways, Nq ≡ 2 mod 64), odd sizes, M up to 256,
// Dv != D, masks with fully masked rows and sequences, grouped heads with shared and per-head
// projections, strided views, poisoned gradients, the range rule of cpu/favor.hpp (extreme eps,
// non-finite inputs), workspace rules and every error path.
#include <effattn/effattn.hpp>

#include <optional>

#include "favor_cases.hpp"
#include "grad_util.hpp"
#include "reference/favor.hpp"

namespace {

using namespace testing_util;
using namespace favor_cases;

/// relu's derivative jumps at u = 0, so where float rounding of u = x' Wᵀ can change its sign
/// (|u| within twice the bound D ε Σ|x'_c w_c|) no evaluation can be held to the reference's
/// side: such rows of q and k are redrawn (rows are independent; a few percent of them at M = 256).
template <class T>
void keep_off_relu_kinks(FavorData<T>& d) {
  const Case& c = d.c;
  const double root_s = std::sqrt(ref::default_scale(c.scale, c.D)), stddev = input_std(c.map, c.D, c.input_std);
  std::normal_distribution<double> normal(0.0, stddev);
  const auto near_kink = [&](const HostTensor<T>& x, int64_t b, int64_t hx, int64_t i, int64_t h) {
    for (int64_t f = 0; f < c.M; ++f) {
      double u = 0, bound = 0;
      for (int64_t e = 0; e < c.D; ++e) {
        const double t = root_s * double(x.view(b, hx, i, e)) * d.proj.view(0, c.shared_projection ? 0 : h, f, e);
        u += t;
        bound += std::abs(t);
      }
      if (std::abs(u) <= 2 * c.D * std::numeric_limits<float>::epsilon() * bound) return true;
    }
    return false;
  };
  const auto redraw = [&](HostTensor<T>& x, int64_t b, int64_t hx, int64_t i, int64_t h0, int64_t h1) {
    const auto near_any = [&] {
      for (int64_t h = h0; h < h1; ++h)
        if (near_kink(x, b, hx, i, h)) return true;
      return false;
    };
    while (near_any())
      for (int64_t e = 0; e < c.D; ++e) x.view(b, hx, i, e) = T(normal(rng()));
  };
  const int64_t group = c.H / c.Hk;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      for (int64_t i = 0; i < c.Nq; ++i) redraw(d.q, b, h, i, h, h + 1);
      if (h % group == 0)  // a key row meets every W of its group
        for (int64_t j = 0; j < c.Nk; ++j) redraw(d.k, b, h / group, j, h, h + group);
    }
}

/// One problem (FavorData) with a random upstream gradient and the forward's out.
template <class T>
struct Problem : FavorData<T> {
  HostTensor<T> dout;
  explicit Problem(const Case& cs) : FavorData<T>(cs), dout(cs.B, cs.H, cs.Nq, cs.Dv, cs.layout) {
    if (cs.map == FeatureMap::relu) keep_off_relu_kinks<T>(*this);
    dout.fill_normal();
    this->forward();
  }
  void backward(GradData<T>& g, int threads = 0) const {
    const FavorData<T>& d = *this;
    effattn::attention_backward<effattn::Cpu>(d.method(), d.q.cview(), d.k.cview(), d.v.cview(), d.out.cview(),
                                              dout.cview(), g.grads(), d.masks, effattn::Exec<effattn::Cpu>{threads});
  }
  ref::Grads reference() const {
    const FavorData<T>& d = *this;
    return ref::favor_backward(d.q.cview(), d.k.cview(), d.v.cview(), dout.cview(), d.masks, d.proj.view, d.c.map,
                               d.c.causal, d.c.scale, d.c.eps);
  }
  /// The condition number of the normalizer sums (1 for positive and relu).
  double condition() const {
    const FavorData<T>& d = *this;
    double cond = 1;
    if (d.c.map == FeatureMap::trig)
      ref::favor(d.q.cview(), d.k.cview(), d.v.cview(), d.masks, d.proj.view, d.c.map, d.c.causal, d.c.scale, d.c.eps,
                 &cond);
    return cond;
  }
};

template <class T>
void run_case(const Case& c, int threads = 0) {
  SCOPED_TRACE(describe(c));
  EFFATTN_TRACE_SEED();
  Problem<T> p(c);
  GradData<T> g(p.q.view, p.k.view, p.v.view, c.layout);
  p.backward(g, threads);
  g.expect_matches(p.reference(), tolerance<T>(p.condition()));
}

template <class T>
class FavorBackwardCpu : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(FavorBackwardCpu, Types);

TYPED_TEST(FavorBackwardCpu, EveryMapBidirectionalAndCausal) {
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true}) run_case<TypeParam>({2, 2, 2, 300, 300, 32, 32, 64, map, causal});
}

TYPED_TEST(FavorBackwardCpu, OddSizes) {
  for (FeatureMap map : kMaps)
    for (int64_t n : {1, 7, 65, 257, 1000})
      for (bool causal : {false, true}) run_case<TypeParam>({1, 2, 2, n, n, 16, 24, 37, map, causal});
}

TYPED_TEST(FavorBackwardCpu, FeatureCountsAndHeadDims) {
  for (int64_t m : {1, 3, 256}) run_case<TypeParam>({1, 1, 1, 150, 150, 32, 32, m, FeatureMap::positive, true});
  for (int64_t d : {1, 64, 80})
    for (FeatureMap map : kMaps) run_case<TypeParam>({1, 2, 1, 260, 260, d, d == 1 ? 3 : d, 48, map, d == 64});
  run_case<TypeParam>({1, 1, 1, 300, 280, 64, 17, 256, FeatureMap::relu, true, true});
}

TYPED_TEST(FavorBackwardCpu, CausalBottomRightAligned) {
  // Nq > Nk: the first rows see no key; Nq ≡ 2 (mod 64): a 2-row last chunk; Nk > Nq: the first
  // keys are seen by every row.
  for (FeatureMap map : kMaps)
    for (auto [nq, nk] : {std::pair<int64_t, int64_t>{1, 1}, {1, 500}, {100, 700}, {700, 100}, {513, 513}, {130, 258},
                          {258, 130}, {65, 63}})
      run_case<TypeParam>({1, 2, 1, nq, nk, 32, 32, 40, map, true});
}

TYPED_TEST(FavorBackwardCpu, MasksLayoutsAndGroupedHeads) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})
    for (bool causal : {false, true})
      run_case<TypeParam>({3, 4, 2, 333, 400, 32, 24, 48, FeatureMap::positive, causal, true, l});
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true}) run_case<TypeParam>({3, 2, 2, 200, 260, 16, 16, 24, map, causal, true, Layout::bshd});
  for (bool shared : {false, true}) {
    run_case<TypeParam>({2, 6, 1, 150, 90, 32, 40, 32, FeatureMap::relu, true, true, Layout::bshd, shared});
    run_case<TypeParam>({1, 4, 2, 120, 120, 16, 16, 20, FeatureMap::trig, false, true, Layout::padded, shared});
    run_case<TypeParam>({2, 4, 2, 200, 200, 32, 32, 32, FeatureMap::positive, true, false, Layout::bhsd, shared});
  }
}

TYPED_TEST(FavorBackwardCpu, ExplicitScaleEpsAndInputRanges) {
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, 64, FeatureMap::positive, false, false, Layout::bhsd, false, 0.3, 1e-3});
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, 64, FeatureMap::relu, true, true, Layout::bhsd, false, 0.05, 0.1});
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, 64, FeatureMap::trig, true, false, Layout::bhsd, false, 0.02});
  // In float, std 5 puts the exponents u - |k'|²/2 near 100, whose rounding (ulp 8e-6) alone moves
  // exp by ~1e-5 (measured 7e-5 on dq, dk): the float floor of the inputs, not of this code.
  const std::vector<double> stds = std::is_same_v<TypeParam, float> ? std::vector<double>{0.1, 2.0}
                                                                    : std::vector<double>{0.1, 2.0, 5.0};
  for (double stddev : stds)
    for (FeatureMap map : {FeatureMap::positive, FeatureMap::relu})
      for (bool causal : {false, true})
        run_case<TypeParam>({1, 2, 2, 200, 200, 64, 64, 64, map, causal, true, Layout::bhsd, false, 0, 0, stddev});
}

// The bidirectional positive key pass rescales its sums when a key tile raises the running key
// max (see FavorCpu.KeyMaxGrowingAcrossTiles): keys growing and shrinking tile by tile.
TYPED_TEST(FavorBackwardCpu, KeyMaxGrowingAcrossTiles) {
  EFFATTN_TRACE_SEED();
  for (bool growing : {true, false}) {
    SCOPED_TRACE(growing ? "growing" : "shrinking");
    const int64_t N = 3 * 256 + 37;
    Problem<TypeParam> p({1, 2, 2, N, N, 32, 32, 64, FeatureMap::positive, false, false});
    ASSERT_TRUE(plant_key_maxima(p, growing));
    p.forward();
    GradData<TypeParam> g(p.q.view, p.k.view, p.v.view, p.c.layout);
    p.backward(g);
    g.expect_matches(p.reference(), tolerance<TypeParam>(p.condition()));
  }
}

TYPED_TEST(FavorBackwardCpu, ThreadCountsAgree) {
  for (int threads : {1, 2, 3})
    run_case<TypeParam>({2, 3, 3, 200, 200, 32, 32, 40, FeatureMap::positive, threads != 2, true}, threads);
}

// ---- the range rule of cpu/favor.hpp ---------------------------------------------------------

// eps tiny next to exp parts that underflow (|x| ~ 4: exp parts ~1e-20, their products ~1e-40;
// |x| ~ 10: every exp part ~1e-90 of eps), or huge (its square overflows T; 1e150 for double keeps
// the float64 reference's sums finite): the features are kept in range, so the gradients are the
// reference's. At |x| ~ 10 in float, dk (~1e-50) and some of dq lie below float's range: there
// the comparison has an absolute floor at that range (the smallest normal float, / tolerance).
TYPED_TEST(FavorBackwardCpu, ExtremeEpsKeepsRowsInRange) {
  using T = TypeParam;
  const bool is_float = std::is_same_v<T, float>;
  for (FeatureMap map : {FeatureMap::positive, FeatureMap::relu})
    for (bool causal : {false, true}) {
      const Case c{1, 2, 2, 150, 150, 32, 32, 32, map, causal, true, Layout::bhsd, false, 0, 1e-30};
      for (double stddev : {4.0, 10.0}) {
        Case ci = c;
        ci.input_std = stddev;
        if (!is_float || stddev < 10 || map == FeatureMap::relu) {
          run_case<T>(ci);
          continue;
        }
        SCOPED_TRACE(describe(ci));
        Problem<T> p(ci);
        GradData<T> g(p.q.view, p.k.view, p.v.view, Layout::bhsd);
        p.backward(g);
        const ref::Grads r = p.reference();
        const double floor = std::numeric_limits<T>::min() / tolerance<T>(1);
        const auto expect_near = [&](const HostTensor<T>& mine, const ref::Result& want, const ref::Result& size) {
          double worst = 0, scale = floor;
          for (size_t i = 0; i < want.a.size(); ++i) {
            worst = std::max(worst, std::abs(double(mine.storage[i]) - want.a[i]));
            scale = std::max(scale, size.a[i]);
          }
          EXPECT_LE(worst / scale, tolerance<T>(1)) << "largest size " << scale;
        };
        expect_near(g.dq, r.dq, r.size.dq);
        expect_near(g.dk, r.dk, r.size.dk);
        expect_near(g.dv, r.dv, r.size.dv);
      }
      Case huge = c;
      huge.eps = is_float ? 1e30 : 1e150;
      run_case<T>(huge);
    }
}

// eps = 1e38 in float: the exp parts' share (1e-38) is below float's normal range, so the
// gradients through u are not accurate there; every output and gradient is still finite.
TEST(FavorBackwardCpu, EpsNearFloatMaxStaysFinite) {
  EFFATTN_TRACE_SEED();
  for (FeatureMap map : {FeatureMap::positive, FeatureMap::relu})
    for (bool causal : {false, true}) {
      Problem<float> p({2, 2, 2, 150, 150, 32, 32, 32, map, causal, true, Layout::bhsd, false, 0, 1e38});
      GradData<float> g(p.q.view, p.k.view, p.v.view, Layout::bhsd);
      p.backward(g);
      for (const auto* t : {&p.out, &g.dq, &g.dk, &g.dv})
        for (float x : t->storage) ASSERT_TRUE(std::isfinite(x)) << map_name(map);
    }
}

/// Sets element (b, h, s, 0) of x to `value` (NaN, Inf).
template <class T>
void set_first(HostTensor<T>& x, int64_t b, int64_t h, int64_t s, T value) {
  x.view(b, h, s, 0) = value;
}

/// Whether any element of rows [r0, r1) of head (b, h) is NaN / all are finite.
template <class T>
bool any_nan(const HostTensor<T>& x, int64_t b, int64_t h, int64_t r0, int64_t r1) {
  for (int64_t s = r0; s < r1; ++s)
    for (int64_t c = 0; c < x.view.shape[3]; ++c)
      if (std::isnan(x.view(b, h, s, c))) return true;
  return false;
}
template <class T>
bool all_finite(const HostTensor<T>& x, int64_t b, int64_t h, int64_t r0, int64_t r1) {
  for (int64_t s = r0; s < r1; ++s)
    for (int64_t c = 0; c < x.view.shape[3]; ++c)
      if (!std::isfinite(x.view(b, h, s, c))) return false;
  return true;
}
template <class T>
bool rows_nan(const HostTensor<T>& x, int64_t b, int64_t h, int64_t r0, int64_t r1) {
  for (int64_t s = r0; s < r1; ++s)
    if (!any_nan(x, b, h, s, s + 1)) return false;
  return true;
}

// A non-finite value in a valid q_i, k_j or v_j makes NaN of exactly the rows that see it: causal
// rows before a NaN key stay finite (the products inside a chunk must not spread it through a
// hidden 0), in the forward and in dq.
TYPED_TEST(FavorBackwardCpu, NonFiniteInputsReachTheRowsThatSeeThem) {
  EFFATTN_TRACE_SEED();
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  const int64_t N = 200;
  for (FeatureMap map : kMaps) {
    SCOPED_TRACE(map_name(map));
    // A query: its own row and dq row only.
    for (bool causal : {false, true})
      for (T bad : {nan, inf}) {
        Problem<T> p({1, 1, 1, N, N, 16, 16, 24, map, causal});
        set_first(p.q, 0, 0, 77, bad);
        p.forward();
        GradData<T> g(p.q.view, p.k.view, p.v.view, Layout::bhsd);
        p.backward(g);
        EXPECT_TRUE(rows_nan(p.out, 0, 0, 77, 78));
        EXPECT_TRUE(all_finite(p.out, 0, 0, 0, 77) && all_finite(p.out, 0, 0, 78, N));
        EXPECT_TRUE(rows_nan(g.dq, 0, 0, 77, 78));
        EXPECT_TRUE(all_finite(g.dq, 0, 0, 0, 77) && all_finite(g.dq, 0, 0, 78, N));
      }
    // A key or a value, causal with Nk = Nq + 10: rows i with i + 10 < j do not see key j (j = 100
    // sits inside a chunk, so the chunk's own triangle is tested).
    for (bool in_value : {false, true}) {
      Problem<T> p({1, 1, 1, N, N + 10, 16, 16, 24, map, true});
      set_first(in_value ? p.v : p.k, 0, 0, 100, nan);
      p.forward();
      GradData<T> g(p.q.view, p.k.view, p.v.view, Layout::bhsd);
      p.backward(g);
      EXPECT_TRUE(all_finite(p.out, 0, 0, 0, 90) && rows_nan(p.out, 0, 0, 90, N)) << "value " << in_value;
      EXPECT_TRUE(all_finite(g.dq, 0, 0, 0, 90) && rows_nan(g.dq, 0, 0, 90, N)) << "value " << in_value;
    }
  }
}

// An invalid key or query reaches nothing, NaN or not: the gradients are those of the same
// problem with finite values there, and the invalid rows' gradients are zero. So does any query of
// batch 1, which has no valid key (its rows are zero whatever q holds).
TYPED_TEST(FavorBackwardCpu, MaskedNonFiniteInputsReachNothing) {
  EFFATTN_TRACE_SEED();
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true}) {
      SCOPED_TRACE(std::string(map_name(map)) + (causal ? " causal" : ""));
      Problem<T> p({2, 2, 1, 150, 170, 16, 12, 24, map, causal, true});
      const ref::Grads r = p.reference();
      const double condition = p.condition();
      for (int64_t b = 0; b < 2; ++b) {
        for (int64_t j = 0; j < 170; ++j)
          if (!p.km[b * 170 + j]) {
            set_first(p.k, b, 0, j, nan);
            set_first(p.v, b, 0, j, nan);
          }
        for (int64_t i = 0; i < 150; ++i)
          if (!p.qm[b * 150 + i] || b == 1)
            for (int64_t h = 0; h < 2; ++h) {
              set_first(p.q, b, h, i, nan);
              set_first(p.dout, b, h, i, nan);
            }
      }
      p.forward();
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t i = 0; i < 150; ++i)
          for (int64_t c = 0; c < 12; ++c) ASSERT_EQ(p.out.view(1, h, i, c), T(0)) << "keyless row " << i;
      GradData<T> g(p.q.view, p.k.view, p.v.view, Layout::bhsd);
      p.backward(g);
      g.expect_matches(r, tolerance<T>(condition));
    }
}

// ---- the reference ---------------------------------------------------------------------------

// The reference backward is checked on its own against central differences of the reference
// forward with its stabilizers held (DESIGN.md: stop-gradient), for random directions in every
// input at once (double throughout). relu's kinks are branches: the step shrinks until no u
// changes sign within the stencil. The step is 1e-4 (rounding ~1e-12): with few features a
// normalizer can be small, where the stencil's O(h⁴) error at 1e-3 reached 1e-5. Inputs are drawn
// away from where no difference quotient converges: a u within 1e-6 of relu's kink, a trig
// normalizer that nearly cancels (condition number over 50).
TEST(FavorBackwardReference, MatchesFiniteDifferencesOfTheForward) {
  EFFATTN_TRACE_SEED();
  for (FeatureMap map : kMaps)
    for (const Case& base : {Case{2, 2, 1, 37, 50, 8, 6, 12}, Case{1, 2, 2, 40, 29, 6, 6, 10},
                             Case{3, 2, 2, 9, 9, 4, 5, 7, FeatureMap::positive, false, false, Layout::bhsd, false, 0.7, 0.05}})
      for (bool causal : {false, true}) {
        Case c = base;
        c.map = map;
        c.causal = causal;
        c.masks = base.B > 1;
        if (map == FeatureMap::trig) c.eps = 0;
        SCOPED_TRACE(describe(c));
        const auto smooth_enough = [&](const Problem<double>& p) {
          if (map == FeatureMap::trig) return p.condition() <= 50;
          if (map != FeatureMap::relu) return true;
          for (double u : ref::favor_relu_inputs(p.q.cview(), p.k.cview(), p.masks, p.proj.view, c.scale))
            if (std::abs(u) < 1e-6) return false;
          return true;
        };
        std::optional<Problem<double>> drawn;  // its views point into itself: emplaced, never moved
        for (int tries = 0; tries < 20 && (!drawn || !smooth_enough(*drawn)); ++tries) drawn.emplace(c);
        ASSERT_TRUE(smooth_enough(*drawn));
        Problem<double>& p = *drawn;
        HostTensor<double> q = to_double(p.q.view), k = to_double(p.k.view), v = to_double(p.v.view);
        const ref::Result dO = as_result(p.dout.view);
        const ref::Grads g = ref::favor_backward(q.cview(), k.cview(), v.cview(), p.dout.cview(), p.masks, p.proj.view,
                                                 c.map, c.causal, c.scale, c.eps);
        ref::FavorStabilizers held;
        const auto forward = [&] {
          return inner(dO, ref::favor(q.cview(), k.cview(), v.cview(), p.masks, p.proj.view, c.map, c.causal, c.scale,
                                      c.eps, nullptr, &held));
        };
        forward();  // records the stabilizers of the unperturbed inputs
        DirectionalCheck check{{&q, &k, &v}, {&g.dq, &g.dk, &g.dv}, forward};
        if (map == FeatureMap::relu)
          check.branches = [&] {
            std::vector<int64_t> signs;
            for (double u : ref::favor_relu_inputs(q.cview(), k.cview(), p.masks, p.proj.view, c.scale))
              signs.push_back(u > 0);
            return signs;
          };
        check.step = 1e-4;
        for (int rep = 0; rep < 3; ++rep) EXPECT_LE(check.relative_error(), 1e-7);
      }
}

// ---- workspace and errors --------------------------------------------------------------------

TEST(FavorBackwardCpu, WorkspaceIsExactAndDoesNotGrowWithSequenceLength) {
  const effattn::Exec<effattn::Cpu> probe{2};
  Projection proj(1, 256, 64, 1);
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true}) {
      auto bytes_at = [&](int64_t n) {
        HostTensor<float> q(1, 4, n, 64);
        return effattn::backward_workspace_bytes<effattn::Cpu>(effattn::Favor{proj.view, map, causal}, q.view, q.view,
                                                               q.view, probe);
      };
      EXPECT_EQ(bytes_at(1024), bytes_at(65536));
    }
  for (bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "bidirectional");
    Problem<float> p({2, 2, 2, 300, 300, 32, 32, 64, FeatureMap::positive, causal, true});
    GradData<float> g(p.q.view, p.k.view, p.v.view, Layout::bhsd);
    const size_t bytes = effattn::backward_workspace_bytes<effattn::Cpu>(p.method(), p.q.view, p.k.view, p.v.view, probe);
    void* ws = std::aligned_alloc(64, bytes);
    const auto before = effattn::allocation_stats().current;
    effattn::reset_allocation_peak();
    const auto run = [&](size_t size) {
      effattn::attention_backward<effattn::Cpu>(p.method(), p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(),
                                                p.dout.cview(), g.grads(), p.masks, effattn::Exec<effattn::Cpu>{2, ws, size});
    };
    run(bytes);
    EXPECT_EQ(effattn::allocation_stats().peak, before) << "allocated although a workspace was given";
    g.expect_matches(p.reference(), 1e-5);
    EXPECT_THROW(run(bytes - 64), effattn::Error);
    std::free(ws);
  }
}

TEST(FavorBackwardCpu, Errors) {
  Problem<float> p({2, 4, 2, 50, 60, 8, 6, 128});  // a projection large enough to hold a dq
  GradData<float> g(p.q.view, p.k.view, p.v.view, Layout::bhsd);
  const auto run = [&](effattn::Favor m, effattn::Grads<float> grads, effattn::Tensor<const float> out,
                       effattn::Tensor<const float> dout) {
    effattn::attention_backward<effattn::Cpu>(m, p.q.cview(), p.k.cview(), p.v.cview(), out, dout, grads, p.masks);
  };
  const auto good = g.grads();
  const auto m = p.method();
  const auto out = p.out.cview(), dout = p.dout.cview();
  auto bad = good;
  bad.dq.shape[2] = 49;
  expect_error([&] { run(m, bad, out, dout); }, {"attention_backward<Cpu>(Favor)", "grads.dq has shape [2, 4, 49, 8]"});
  bad = good;
  bad.dv.shape[3] = 8;
  expect_error([&] { run(m, bad, out, dout); }, {"grads.dv has shape [2, 2, 60, 8]", "v's shape"});
  bad = good;
  bad.dk.data = nullptr;
  expect_error([&] { run(m, bad, out, dout); }, {"grads.dk.data is null"});
  auto bad_out = out;
  bad_out.shape[1] = 2;
  expect_error([&] { run(m, good, bad_out, dout); }, {"out has shape [2, 2, 50, 6]", "[2, 4, 50, 6]"});
  auto bad_dout = dout;
  bad_dout.shape[3] = 5;
  expect_error([&] { run(m, good, out, bad_dout); }, {"dout has shape [2, 4, 50, 5]"});
  // Overlaps: with an input, the projection, another gradient; aliasing elements.
  bad = good;
  bad.dv.data = p.v.storage.data();  // exactly v's memory: a view reaching past it may meet another input
  expect_error([&] { run(m, bad, out, dout); }, {"grads.dv overlaps input v"});
  bad = good;
  bad.dq.data = const_cast<float*>(p.proj.w.data());
  expect_error([&] { run(m, bad, out, dout); }, {"grads.dq overlaps input projection"});
  bad = good;
  bad.dk.data = g.dq.storage.data();
  expect_error([&] { run(m, bad, out, dout); }, {"grads.dk overlaps grads.dq"});
  bad = good;
  bad.dk.stride[2] = 0;
  expect_error([&] { run(m, bad, out, dout); }, {"grads.dk.stride", "alias"});
  bad = good;
  bad.dproxy_k = g.dk.view;
  expect_error([&] { run(m, bad, out, dout); }, {"dproxy_q / grads.dproxy_k", "no proxies"});
  // The method's own checks.
  effattn::Favor mm = m;
  mm.projection.shape[3] = 7;
  expect_error([&] { run(mm, good, out, dout); }, {"projection.shape[3] = 7", "D = 8"});
  mm = m;
  mm.scale = -1;
  expect_error([&] { run(mm, good, out, dout); }, {"scale = -1", "positive"});
  mm = m;
  mm.map = FeatureMap::trig;
  mm.eps = 0.5;
  expect_error([&] { run(mm, good, out, dout); }, {"eps = 0.5", "trig"});
  expect_error([&] {
    effattn::attention_backward<effattn::Cpu>(m, p.q.cview(), p.k.cview(), p.v.cview(), out, dout, good, p.masks,
                                              effattn::Exec<effattn::Cpu>{-1});
  }, {"exec.threads = -1"});
}

// eps outside the element type's normal range cannot be carried (cpu/favor.hpp): rejected by the
// forward and the backward, naming eps and the bound.
TEST(FavorBackwardCpu, EpsOutsideTheNormalRangeIsRejected) {
  Problem<float> pf({1, 1, 1, 10, 10, 8, 8, 16});
  Problem<double> pd({1, 1, 1, 10, 10, 8, 8, 16});
  GradData<float> gf(pf.q.view, pf.k.view, pf.v.view, Layout::bhsd);
  GradData<double> gd(pd.q.view, pd.k.view, pd.v.view, Layout::bhsd);
  for (FeatureMap map : {FeatureMap::positive, FeatureMap::relu}) {
    for (double eps : {1e-40, 1e39}) {
      pf.c.map = map;
      pf.c.eps = eps;
      expect_error([&] { pf.forward(); }, {"attention<Cpu>(Favor)", "eps = ", "normal range of float", "1.17549e-38",
                                           "3.40282e+38"});
      expect_error([&] { pf.backward(gf); }, {"attention_backward<Cpu>(Favor)", "normal range of float"});
    }
    pd.c.map = map;
    pd.c.eps = 1e-310;
    expect_error([&] { pd.forward(); }, {"eps = 1e-310", "normal range of double", "2.22507e-308"});
    expect_error([&] { pd.backward(gd); }, {"normal range of double"});
  }
}

}  // namespace
