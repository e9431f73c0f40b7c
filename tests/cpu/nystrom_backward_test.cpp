// CPU Nyström backward against the float64 reference backward (DESIGN.md, "Backward", landmark),
// itself checked against finite differences of the float64 forward: segment means, K1, K2, K3,
// Newton–Schulz as computed (Z0's scale included), the exact-softmax fallback, masks with fully
// masked rows and sequences (dropped landmarks), grouped heads, strided views, odd sizes.
#include <effattn/effattn.hpp>

#include "grad_util.hpp"
#include "reference/landmark.hpp"

namespace {

using namespace testing_util;

struct Case {
  int64_t B, H, Hk, Nq, Nk, D, Dv, M;
  int iterations = 6;
  bool masks = false;
  Layout layout = Layout::bhsd;
  double scale = 0;
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         " Dv=" + std::to_string(c.Dv) + " M=" + std::to_string(c.M) + " iters=" + std::to_string(c.iterations) +
         (c.masks ? " masks" : "") + " " + layout_name(c.layout);
}

effattn::Nystrom method(const Case& c) { return {static_cast<int>(c.M), c.iterations, c.scale}; }

/// Recomputing the forward, and from the training forward's saved block.
template <class T>
void run_case(const Case& c, int threads = 0) {
  for (bool saving : {false, true}) {
    SCOPED_TRACE(describe(c) + (saving ? " saved" : ""));
    EFFATTN_TRACE_SEED();
    BackwardData<T> p(c.B, c.H, c.Hk, c.Nq, c.Nk, c.D, c.Dv, c.masks, c.layout);
    p.forward(method(c), saving);
    GradData<T> g(p.data.q.view, p.data.k.view, p.data.v.view, c.layout);
    p.backward(method(c), g.grads(), threads);
    const auto& d = p.data;
    g.expect_matches(ref::nystrom_backward(d.q.cview(), d.k.cview(), d.v.cview(), p.dout.cview(), p.masks, c.M,
                                           c.iterations, c.scale),
                     cpu_tolerance<T>());
  }
}

template <class T>
class NystromBackwardCpu : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(NystromBackwardCpu, Types);

TYPED_TEST(NystromBackwardCpu, OddLengthsAndLandmarkCounts) {
  for (int64_t n : {1, 7, 333, 1000})
    for (int64_t m : {1, 16, 64}) run_case<TypeParam>({2, 2, 2, n, n, 32, 32, m});
}

TYPED_TEST(NystromBackwardCpu, IterationCountsAndScale) {
  for (int it : {0, 1, 3, 6}) run_case<TypeParam>({1, 2, 2, 300, 300, 32, 32, 32, it});
  run_case<TypeParam>({2, 2, 2, 300, 257, 64, 64, 32, 6, true, Layout::bhsd, 0.3});
}

TYPED_TEST(NystromBackwardCpu, MasksLayoutsAndValueDims) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})
    run_case<TypeParam>({3, 4, 2, 600, 500, 64, 48, 64, 6, true, l});
  run_case<TypeParam>({3, 2, 2, 333, 290, 16, 96, 16, 6, true, Layout::padded});
}

TYPED_TEST(NystromBackwardCpu, GroupedHeadsAndThreads) {
  run_case<TypeParam>({2, 6, 2, 400, 350, 32, 32, 32, 6, true, Layout::bshd});
  for (int threads : {1, 2, 3}) run_case<TypeParam>({2, 3, 3, 300, 300, 32, 32, 16, 6, true}, threads);
}

TYPED_TEST(NystromBackwardCpu, ExactSoftmaxFallback) {
  run_case<TypeParam>({2, 2, 1, 40, 300, 32, 32, 64, 6, true});  // min(Nq, Nk) <= M
}

// The reference backward against central differences of the reference forward, random
// directions in q, k and v at once (double throughout).
TEST(NystromBackwardReference, MatchesFiniteDifferencesOfTheForward) {
  EFFATTN_TRACE_SEED();
  for (const Case& c : {Case{2, 2, 1, 37, 50, 8, 6, 8, 6, true}, Case{1, 2, 2, 41, 29, 8, 8, 5, 0},
                        Case{1, 1, 1, 30, 30, 4, 4, 6, 3, false, Layout::bhsd, 0.7}}) {
    SCOPED_TRACE(describe(c));
    BackwardData<double> p(c.B, c.H, c.Hk, c.Nq, c.Nk, c.D, c.Dv, c.masks, Layout::bhsd);
    HostTensor<double> q = to_double(p.data.q.view), k = to_double(p.data.k.view), v = to_double(p.data.v.view);
    const ref::Result dO = as_result(p.dout.view);
    const ref::Grads g =
        ref::nystrom_backward(q.cview(), k.cview(), v.cview(), p.dout.cview(), p.masks, c.M, c.iterations, c.scale);
    DirectionalCheck check{{&q, &k, &v}, {&g.dq, &g.dk, &g.dv}, [&] {
                             return inner(dO, ref::nystrom(q.cview(), k.cview(), v.cview(), p.masks, c.M,
                                                           c.iterations, c.scale));
                           }};
    check.branches = [&] {
      std::vector<int64_t> b;
      ref::nystrom(q.cview(), k.cview(), v.cview(), p.masks, c.M, c.iterations, c.scale, &b);
      return b;
    };
    for (int rep = 0; rep < 3; ++rep) EXPECT_LE(check.relative_error(), 1e-7);
  }
}

TEST(NystromBackwardCpu, WorkspaceIsExactAndDoesNotGrowWithSequenceLength) {
  const effattn::Exec<effattn::Cpu> probe{2};
  const auto bytes_at = [&](int64_t n) {
    HostTensor<float> q(2, 2, n, 64);
    return effattn::backward_workspace_bytes<effattn::Cpu>(effattn::Nystrom{64}, q.view, q.view, q.view, probe);
  };
  EXPECT_EQ(bytes_at(1024), bytes_at(32768));
  BackwardData<float> p(2, 2, 2, 500, 500, 32, 32, true, Layout::bhsd);
  const effattn::Nystrom m{32};
  p.forward(m);
  GradData<float> g(p.data.q.view, p.data.k.view, p.data.v.view, Layout::bhsd);
  auto& d = p.data;
  const size_t bytes = effattn::backward_workspace_bytes<effattn::Cpu>(m, d.q.view, d.k.view, d.v.view, probe);
  void* ws = std::aligned_alloc(64, bytes);
  const auto before = effattn::allocation_stats().current;
  effattn::reset_allocation_peak();
  effattn::attention_backward<effattn::Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview(), d.out.cview(), p.dout.cview(),
                                            g.grads(), p.masks, effattn::Exec<effattn::Cpu>{2, ws, bytes});
  EXPECT_EQ(effattn::allocation_stats().peak, before) << "allocated although a workspace was given";
  g.expect_matches(ref::nystrom_backward(d.q.cview(), d.k.cview(), d.v.cview(), p.dout.cview(), p.masks, 32, 6, 0),
                   1e-5);
  EXPECT_THROW(effattn::attention_backward<effattn::Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview(), d.out.cview(),
                                                         p.dout.cview(), g.grads(), p.masks,
                                                         effattn::Exec<effattn::Cpu>{2, ws, bytes - 64}),
               effattn::Error);
  std::free(ws);
}

TEST(NystromBackwardCpu, Errors) {
  BackwardData<float> p(2, 2, 2, 100, 100, 8, 8, false, Layout::bhsd);
  GradData<float> g(p.data.q.view, p.data.k.view, p.data.v.view, Layout::bhsd);
  auto grads = g.grads();
  grads.dproxy_k = g.dk.view;
  expect_error([&] { p.backward(effattn::Nystrom{16}, grads); }, {"Nystrom", "dproxy", "no proxies"});
  expect_error([&] { p.backward(effattn::Nystrom{0}, g.grads()); }, {"Nystrom", "landmarks = 0"});
  grads = g.grads();
  grads.dv.shape[2] = 99;
  expect_error([&] { p.backward(effattn::Nystrom{16}, grads); }, {"Nystrom", "grads.dv has shape"});
}

}  // namespace
