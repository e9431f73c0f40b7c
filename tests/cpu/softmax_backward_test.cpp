// CPU softmax backward against the float64 reference backward (DESIGN.md, "Backward"), which is
// itself checked against finite differences of the float64 forward: odd sizes, head dims, Dv != D,
// masks with fully masked rows and sequences, causal with Nq != Nk, grouped heads, strided views,
// the forward's lse passed back or recomputed, poisoned gradients, and every error path.
#include <effattn/effattn.hpp>

#include "grad_util.hpp"
#include "reference/softmax.hpp"

namespace {

using namespace testing_util;

struct Case {
  int64_t B, H, Hk, Nq, Nk, D, Dv;
  bool causal = false;
  bool masks = false;
  Layout layout = Layout::bhsd;
  double scale = 0;
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         " Dv=" + std::to_string(c.Dv) + (c.causal ? " causal" : "") + (c.masks ? " masks" : "") + " " +
         layout_name(c.layout);
}

/// The problem of one case: inputs, masks (the last sequence has no valid key, the first of 3+
/// no valid query), the forward's out and lse, and a random upstream gradient.
template <class T>
struct Problem {
  Case c;
  AttentionData<T> data;
  HostTensor<T> dout;
  HostTensor<effattn::acc_t<T>> lse;
  std::vector<uint8_t> qm, km;
  effattn::Masks masks;
  explicit Problem(const Case& cs)
      : c(cs), data(c.B, c.H, c.Hk, c.Nq, c.Nk, c.D, c.Dv, c.layout), dout(c.B, c.H, c.Nq, c.Dv, c.layout),
        lse(c.B, c.H, c.Nq, 1) {
    dout.fill_normal();
    if (c.masks) {
      km = random_mask(c.B, c.Nk, 0.7, c.B > 1 ? c.B - 1 : -1);
      qm = random_mask(c.B, c.Nq, 0.8, c.B > 2 ? 0 : -1);
      masks = {qm.data(), c.Nq, km.data(), c.Nk};
    }
    effattn::attention_with_lse<effattn::Cpu>(method(), data.q.cview(), data.k.cview(), data.v.cview(),
                                              data.out.view, lse.view, masks);
  }
  effattn::Softmax method() const { return {c.scale, c.causal}; }
  /// The backward into g, with the forward's lse passed back or recomputed.
  void backward(const effattn::Grads<T>& g, bool with_lse, int threads = 0) const {
    const effattn::Exec<effattn::Cpu> exec{threads};
    if (with_lse)
      effattn::attention_backward_with_lse<effattn::Cpu>(method(), data.q.cview(), data.k.cview(), data.v.cview(),
                                                         data.out.cview(), dout.cview(), lse.cview(), g, masks, exec);
    else
      effattn::attention_backward<effattn::Cpu>(method(), data.q.cview(), data.k.cview(), data.v.cview(),
                                                data.out.cview(), dout.cview(), g, masks, exec);
  }
  ref::Grads reference() const {
    return ref::softmax_backward(data.q.cview(), data.k.cview(), data.v.cview(), dout.cview(), masks, c.scale,
                                 c.causal);
  }
};

template <class T>
void run_case(const Case& c, bool with_lse, int threads = 0) {
  SCOPED_TRACE(describe(c) + (with_lse ? " with lse" : ""));
  EFFATTN_TRACE_SEED();
  Problem<T> p(c);
  GradData<T> g(p.data.q.view, p.data.k.view, p.data.v.view, c.layout);
  p.backward(g.grads(), with_lse, threads);
  g.expect_matches(p.reference(), cpu_tolerance<T>());
}

template <class T>
class SoftmaxBackwardCpu : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SoftmaxBackwardCpu, Types);

TYPED_TEST(SoftmaxBackwardCpu, OddSizes) {
  for (int64_t n : {1, 7, 65, 257, 1000})
    for (int64_t d : {1, 32, 80}) run_case<TypeParam>({2, 2, 2, n, n, d, d}, n % 2 == 1);
}

TYPED_TEST(SoftmaxBackwardCpu, HeadDimsAndValueDims) {
  for (int64_t d : {32, 64, 128}) run_case<TypeParam>({1, 2, 1, 300, 300, d, d}, true);
  run_case<TypeParam>({2, 3, 3, 130, 290, 48, 17}, false);
  run_case<TypeParam>({1, 2, 2, 70, 70, 16, 96, true, true, Layout::padded}, true);
}

TYPED_TEST(SoftmaxBackwardCpu, CausalBottomRightAligned) {
  // Nq > Nk: the first rows see no key; Nq ≡ 2 (mod 64): a 2-row last query tile on the diagonal.
  for (auto [nq, nk] : {std::pair<int64_t, int64_t>{1, 1}, {1, 500}, {100, 700}, {700, 100}, {513, 513}, {130, 258}})
    for (bool lse : {false, true}) run_case<TypeParam>({2, 2, 1, nq, nk, 64, 64, true}, lse);
}

TYPED_TEST(SoftmaxBackwardCpu, MasksLayoutsAndGroupedHeads) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})
    for (bool causal : {false, true}) run_case<TypeParam>({3, 4, 2, 333, 400, 64, 48, causal, true, l}, causal);
  run_case<TypeParam>({2, 6, 1, 200, 300, 32, 32, false, true, Layout::bshd}, false);  // multi-query
  run_case<TypeParam>({2, 2, 2, 150, 150, 32, 32, false, false, Layout::bhsd, 0.3}, true);
}

TYPED_TEST(SoftmaxBackwardCpu, ThreadCountsAgree) {
  for (int threads : {1, 2, 3}) run_case<TypeParam>({2, 4, 2, 300, 300, 32, 32, true, true}, threads == 2, threads);
}

// A row that attends nothing (an invalid query, or with causal Nq > Nk a row before the first key)
// has zero gradients, and a NaN in its q reaches no gradient (its forward row is zero too).
TYPED_TEST(SoftmaxBackwardCpu, NonFiniteQueryOfAnInertRowReachesNoGradient) {
  using T = TypeParam;
  for (bool with_lse : {false, true}) {
    const Case c{3, 2, 1, 70, 50, 16, 8, true, true};  // batch 1 has random masks (Problem)
    SCOPED_TRACE(describe(c) + (with_lse ? " with lse" : ""));
    EFFATTN_TRACE_SEED();
    Problem<T> p(c);
    const ref::Grads clean = p.reference();
    auto& d = p.data;
    int64_t invalid = -1;  // an invalid query of batch 1 that causal alone would let see keys
    for (int64_t i = c.Nq - 1; i >= c.Nq - c.Nk && invalid < 0; --i)
      if (p.qm[size_t(c.Nq + i)] == 0) invalid = i;
    d.q.view(1, 1, 5, 3) = std::numeric_limits<T>::quiet_NaN();  // row 5 < Nq - Nk: no key yet
    if (invalid >= 0) d.q.view(1, 0, invalid, 0) = std::numeric_limits<T>::quiet_NaN();  // none with prob. 0.8^50
    GradData<T> g(d.q.view, d.k.view, d.v.view, c.layout);
    p.backward(g.grads(), with_lse);
    g.expect_matches(clean, cpu_tolerance<T>());
  }
}

// A NaN in a live row's q or dout, or in one key's v, reaches exactly the gradients its forward
// value reaches (causal: key j is seen by rows i >= j), and every other element equals the clean
// reference: a hidden entry's product is skipped, never 0 · NaN.
TYPED_TEST(SoftmaxBackwardCpu, NonFiniteInputReachesExactlyItsGradients) {
  using T = TypeParam;
  const int64_t n = 70, row = 10, key = 40;
  enum Poison { query, upstream, value };
  for (Poison what : {query, upstream, value})
    for (bool with_lse : {false, true}) {
      const Case c{1, 1, 1, n, n, 16, 8, true, false};
      SCOPED_TRACE(describe(c) + " poison " + std::to_string(int(what)) + (with_lse ? " with lse" : ""));
      EFFATTN_TRACE_SEED();
      Problem<T> p(c);
      const ref::Grads clean = p.reference();
      auto& d = p.data;
      const T nan = std::numeric_limits<T>::quiet_NaN();
      if (what == query) d.q.view(0, 0, row, 3) = nan;
      if (what == upstream) p.dout.view(0, 0, row, 2) = nan;
      if (what == value) d.v.view(0, 0, key, 1) = nan;
      effattn::attention_with_lse<effattn::Cpu>(p.method(), d.q.cview(), d.k.cview(), d.v.cview(), d.out.view,
                                                p.lse.view, p.masks);
      GradData<T> g(d.q.view, d.k.view, d.v.view, c.layout);
      p.backward(g.grads(), with_lse);
      // Which elements of dq (query rows) and of dk, dv (key rows) the NaN reaches: a NaN in
      // dout's column 2 reaches dv's column 2 only (dv_j = Σ_i P_ij dO_i); v does not reach dv,
      // unless the forward's lse comes back: it is NaN for the NaN output rows i >= key (the
      // documented lse rule), so their P is, and row n - 1 sees every key.
      const auto nan_dq = [&](int64_t i, int64_t) { return what == value ? i >= key : i == row; };
      const auto nan_dk = [&](int64_t j, int64_t) { return what == value ? true : j <= row; };
      const auto nan_dv = [&](int64_t j, int64_t col) {
        return what == query ? j <= row : what == upstream ? j <= row && col == 2 : with_lse;
      };
      const auto check = [&](const char* name, const HostTensor<T>& got, const ref::Result& want,
                             const ref::Result& size, const auto& expect_nan) {
        double scale = 0;
        for (double x : size.a) scale = std::max(scale, std::abs(x));
        int64_t wrong = 0;
        for (int64_t r = 0; r < want.N; ++r)
          for (int64_t col = 0; col < want.Dv; ++col) {
            const double x = got.view(0, 0, r, col);
            const bool want_nan = expect_nan(r, col);
            const bool ok = want_nan ? std::isnan(x) : std::abs(x - want(0, 0, r, col)) <= cpu_tolerance<T>() * scale;
            if (!ok && wrong++ < 3)
              ADD_FAILURE() << name << "(" << r << ", " << col << ") = " << x << ", want "
                            << (want_nan ? "NaN" : std::to_string(want(0, 0, r, col)));
          }
        EXPECT_EQ(wrong, 0) << name;
      };
      check("dq", g.dq, clean.dq, clean.size.dq, nan_dq);
      check("dk", g.dk, clean.dk, clean.size.dk, nan_dk);
      check("dv", g.dv, clean.dv, clean.size.dv, nan_dv);
    }
}

// The reference backward is checked on its own against central differences of the reference
// forward, for random directions in every input at once (double throughout).
TEST(SoftmaxBackwardReference, MatchesFiniteDifferencesOfTheForward) {
  EFFATTN_TRACE_SEED();
  for (const Case& c : {Case{2, 2, 1, 37, 50, 16, 12, false, true}, Case{1, 2, 2, 40, 29, 8, 8, true, true},
                        Case{3, 2, 2, 9, 9, 4, 5, true, false, Layout::bhsd, 0.7}}) {
    SCOPED_TRACE(describe(c));
    Problem<double> p(c);
    HostTensor<double> q = to_double(p.data.q.view), k = to_double(p.data.k.view), v = to_double(p.data.v.view);
    const ref::Result dO = as_result(p.dout.view);
    const ref::Grads g = ref::softmax_backward(q.cview(), k.cview(), v.cview(), p.dout.cview(), p.masks, c.scale, c.causal);
    DirectionalCheck check{{&q, &k, &v}, {&g.dq, &g.dk, &g.dv}, [&] {
                             return inner(dO, ref::softmax(q.cview(), k.cview(), v.cview(), p.masks, c.scale, c.causal));
                           }};
    for (int rep = 0; rep < 3; ++rep) EXPECT_LE(check.relative_error(), 1e-7);
  }
}

TEST(SoftmaxBackwardCpu, LseIsTheRowLogSumExp) {
  EFFATTN_TRACE_SEED();
  Problem<double> p({2, 2, 2, 100, 80, 32, 32, true, true});
  const double s = 1 / std::sqrt(32.0);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t h = 0; h < 2; ++h) {
      const ref::Mat Q = ref::head(p.data.q.view, b, h), K = ref::head(p.data.k.view, b, h);
      for (int64_t i = 0; i < 100; ++i) {
        const double got = p.lse.view(b, h, i, 0);
        if (!ref::valid(p.masks.query_valid, p.masks.query_batch_stride, b, i)) {
          EXPECT_EQ(got, -INFINITY) << "invalid query " << i;
          continue;
        }
        double mx = -INFINITY;
        std::vector<double> logits;
        for (int64_t j = 0; j <= std::min<int64_t>(79, i - 20); ++j) {
          if (!ref::valid(p.masks.key_valid, p.masks.key_batch_stride, b, j)) continue;
          double dot = 0;
          for (int64_t c = 0; c < 32; ++c) dot += Q(i, c) * K(j, c);
          logits.push_back(s * dot);
          mx = std::max(mx, s * dot);
        }
        if (logits.empty()) {
          EXPECT_EQ(got, -INFINITY) << "row " << i << " sees no key";
          continue;
        }
        double sum = 0;
        for (double l : logits) sum += std::exp(l - mx);
        EXPECT_NEAR(got, mx + std::log(sum), 1e-12 * std::max(1.0, std::abs(got))) << "row " << i;
      }
    }
}

TEST(SoftmaxBackwardCpu, WorkspaceIsExactAndDoesNotGrowWithSequenceLength) {
  const effattn::Exec<effattn::Cpu> probe{2};
  auto bytes_at = [&](int64_t n) {
    HostTensor<float> q(1, 4, n, 64);
    return effattn::backward_workspace_bytes<effattn::Cpu>(effattn::Softmax{}, q.view, q.view, q.view, probe);
  };
  EXPECT_EQ(bytes_at(1024), bytes_at(65536));
  Problem<float> p({2, 2, 2, 300, 300, 32, 32, true, true});
  GradData<float> g(p.data.q.view, p.data.k.view, p.data.v.view, Layout::bhsd);
  auto& d = p.data;
  const size_t bytes =
      effattn::backward_workspace_bytes<effattn::Cpu>(p.method(), d.q.view, d.k.view, d.v.view, probe);
  void* ws = std::aligned_alloc(64, bytes);
  const auto before = effattn::allocation_stats().current;
  effattn::reset_allocation_peak();
  effattn::attention_backward<effattn::Cpu>(p.method(), d.q.cview(), d.k.cview(), d.v.cview(), d.out.cview(),
                                            p.dout.cview(), g.grads(), p.masks, effattn::Exec<effattn::Cpu>{2, ws, bytes});
  EXPECT_EQ(effattn::allocation_stats().peak, before) << "allocated although a workspace was given";
  g.expect_matches(p.reference(), 1e-5);
  EXPECT_THROW(effattn::attention_backward<effattn::Cpu>(p.method(), d.q.cview(), d.k.cview(), d.v.cview(),
                                                         d.out.cview(), p.dout.cview(), g.grads(), p.masks,
                                                         effattn::Exec<effattn::Cpu>{2, ws, bytes - 64}),
               effattn::Error);
  std::free(ws);
}

TEST(SoftmaxBackwardCpu, Errors) {
  Problem<float> p({2, 4, 2, 50, 60, 8, 6});
  auto& d = p.data;
  GradData<float> g(d.q.view, d.k.view, d.v.view, Layout::bhsd);
  const auto run = [&](effattn::Grads<float> grads, effattn::Tensor<const float> out, effattn::Tensor<const float> dout) {
    effattn::attention_backward<effattn::Cpu>(p.method(), d.q.cview(), d.k.cview(), d.v.cview(), out, dout, grads);
  };
  const auto good = g.grads();
  const auto out = d.out.cview(), dout = p.dout.cview();
  auto bad = good;
  bad.dq.shape[2] = 49;
  expect_error([&] { run(bad, out, dout); }, {"Softmax", "grads.dq has shape [2, 4, 49, 8]", "[2, 4, 50, 8]"});
  bad = good;
  bad.dv.shape[3] = 8;
  expect_error([&] { run(bad, out, dout); }, {"grads.dv has shape [2, 2, 60, 8]", "v's shape"});
  bad = good;
  bad.dk.data = nullptr;
  expect_error([&] { run(bad, out, dout); }, {"grads.dk.data is null"});
  auto bad_out = out;
  bad_out.shape[1] = 2;
  expect_error([&] { run(good, bad_out, dout); }, {"out has shape [2, 2, 50, 6]", "[2, 4, 50, 6]"});
  auto bad_dout = dout;
  bad_dout.shape[3] = 5;
  expect_error([&] { run(good, out, bad_dout); }, {"dout has shape [2, 4, 50, 5]"});
  // Overlaps: a gradient in an input's memory (partially: starting at its last element), or in
  // another gradient's; v alone.
  bad = good;
  bad.dv.data = d.v.storage.data() + d.v.storage.size() - 1;
  expect_error([&] { run(bad, out, dout); }, {"grads.dv overlaps input v"});
  bad = good;
  bad.dq.data = p.dout.storage.data() + 8;
  expect_error([&] { run(bad, out, dout); }, {"grads.dq overlaps input dout"});
  bad = good;
  bad.dk.data = g.dq.storage.data();
  expect_error([&] { run(bad, out, dout); }, {"grads.dk overlaps grads.dq"});
  bad = good;
  bad.dq.stride[2] = 0;
  expect_error([&] { run(bad, out, dout); }, {"grads.dq.stride", "alias"});
  // Proxy gradients for a method without proxies.
  bad = good;
  bad.dproxy_q = g.dq.view;
  expect_error([&] { run(bad, out, dout); }, {"dproxy_q", "no proxies"});
  // A bad lse.
  HostTensor<float> small_lse(2, 4, 49, 1);
  expect_error(
      [&] {
        effattn::attention_backward_with_lse<effattn::Cpu>(p.method(), d.q.cview(), d.k.cview(), d.v.cview(), out,
                                                           dout, small_lse.cview(), good);
      },
      {"lse has shape [2, 4, 49, 1]", "[2, 4, 50, 1]"});
  expect_error(
      [&] {
        effattn::attention_with_lse<effattn::Cpu>(p.method(), d.q.cview(), d.k.cview(), d.v.cview(), d.out.view,
                                                  effattn::Tensor<float>(d.out.view.data, {2, 4, 50, 1}, {200, 50, 1, 1}));
      },
      {"lse overlaps out"});
}

}  // namespace
