// CPU Proxy backward against the float64 reference backward, itself checked against finite
// differences of the float64 forward in every input and both proxies: shared (batch extent 1,
// one Z per head, gradients summed over the batch) and per-sequence proxies, mixed extents,
// decomposed column dropout (the forward's keep mask), pinv_iterations = 0, M up to 256, masks,
// grouped heads, strided views, and the error paths of the proxy gradients.
#include <effattn/effattn.hpp>

#include "grad_util.hpp"
#include "reference/landmark.hpp"

namespace {

using namespace testing_util;

struct Case {
  int64_t B, H, Hk, Nq, Nk, D, Dv, M;
  int64_t proxy_batch_q = 1, proxy_batch_k = 1;  // 1 (shared) or B
  int iterations = 6;
  float dropout = 0;
  bool masks = false;
  Layout layout = Layout::bhsd;
  double scale = 0;
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         " Dv=" + std::to_string(c.Dv) + " M=" + std::to_string(c.M) + " proxy batch " +
         std::to_string(c.proxy_batch_q) + "/" + std::to_string(c.proxy_batch_k) +
         " iters=" + std::to_string(c.iterations) + " dropout=" + std::to_string(c.dropout) +
         (c.masks ? " masks" : "") + " " + layout_name(c.layout);
}

/// A case's problem, proxies and dropout seed.
template <class T>
struct ProxyProblem {
  Case c;
  BackwardData<T> p;
  HostTensor<T> pq, pk;
  uint64_t seed;
  explicit ProxyProblem(const Case& cs, bool saving = false)
      : c(cs), p(c.B, c.H, c.Hk, c.Nq, c.Nk, c.D, c.Dv, c.masks, c.layout), pq(c.proxy_batch_q, c.H, c.M, c.D, c.layout),
        pk(c.proxy_batch_k, c.H, c.M, c.D, c.layout), seed(rng()()) {
    pq.fill_normal(1.5);
    pk.fill_normal(1.5);
    p.forward(method(), saving);
  }
  effattn::Proxy<T> method() const { return {pq.cview(), pk.cview(), c.iterations, c.dropout, seed, c.scale}; }
  template <class U>
  ref::Grads reference(const Tensor<const U>& q, const Tensor<const U>& k, const Tensor<const U>& v,
                       const Tensor<const U>& proxy_q, const Tensor<const U>& proxy_k) const {
    return ref::proxy_backward(q, k, v, p.dout.cview(), p.masks, proxy_q, proxy_k, c.iterations, c.dropout, seed,
                               c.scale);
  }
};

/// Recomputing the forward, and from the training forward's saved block.
template <class T>
void run_case(const Case& c, int threads = 0) {
  for (bool saving : {false, true}) {
    SCOPED_TRACE(describe(c) + (saving ? " saved" : ""));
    EFFATTN_TRACE_SEED();
    ProxyProblem<T> pp(c, saving);
    auto& d = pp.p.data;
    GradData<T> g(d.q.view, d.k.view, d.v.view, c.layout);
    g.add_proxies(pp.pq.view, pp.pk.view, c.layout);
    pp.p.backward(pp.method(), g.grads(), threads);
    g.expect_matches(pp.reference(d.q.cview(), d.k.cview(), d.v.cview(), pp.pq.cview(), pp.pk.cview()),
                     cpu_tolerance<T>());
  }
}

template <class T>
class ProxyBackwardCpu : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ProxyBackwardCpu, Types);

TYPED_TEST(ProxyBackwardCpu, OddLengthsAndProxyCounts) {
  for (int64_t n : {1, 7, 1000})
    for (int64_t m : {1, 16, 64}) run_case<TypeParam>({2, 2, 2, n, n, 32, 32, m});
  run_case<TypeParam>({1, 2, 2, 700, 600, 32, 32, 256});  // the most CUDA supports
}

TYPED_TEST(ProxyBackwardCpu, SharedPerSequenceAndMixedProxies) {
  for (auto [bq, bk] : {std::pair<int64_t, int64_t>{1, 1}, {3, 3}, {1, 3}, {3, 1}})
    run_case<TypeParam>({3, 2, 2, 300, 300, 32, 32, 16, bq, bk, 6, 0.2f});
}

TYPED_TEST(ProxyBackwardCpu, NoInverseAndIterationCounts) {
  for (int64_t pb : {1, 2}) run_case<TypeParam>({2, 2, 2, 500, 400, 32, 32, 64, pb, pb, 0, 0.5f, true});
  for (int it : {1, 3, 6}) run_case<TypeParam>({1, 2, 2, 300, 300, 32, 32, 32, 1, 1, it});
}

TYPED_TEST(ProxyBackwardCpu, ColumnDropout) {
  for (float p : {0.1f, 0.5f}) {
    run_case<TypeParam>({3, 2, 2, 400, 400, 32, 32, 128, 1, 1, 6, p});
    run_case<TypeParam>({3, 2, 2, 400, 400, 32, 32, 128, 3, 3, 6, p});
  }
}

TYPED_TEST(ProxyBackwardCpu, LayoutsMasksGroupedHeadsAndThreads) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})
    run_case<TypeParam>({3, 4, 2, 600, 500, 64, 48, 64, 3, 3, 6, 0.1f, true, l});
  run_case<TypeParam>({2, 6, 1, 350, 290, 32, 40, 16, 1, 1, 6, 0.3f, true, Layout::bshd});
  for (int threads : {1, 2, 3}) run_case<TypeParam>({3, 3, 3, 300, 300, 32, 32, 32, 1, 1, 6, 0.3f, true}, threads);
}

// The reference backward against central differences of the reference forward: random directions
// in q, k, v, proxy_q and proxy_k at once (double throughout), with dropout, shared and not.
TEST(ProxyBackwardReference, MatchesFiniteDifferencesOfTheForward) {
  EFFATTN_TRACE_SEED();
  for (const Case& c : {Case{2, 2, 1, 37, 50, 8, 6, 8, 1, 1, 6, 0.3f, true}, Case{2, 2, 2, 29, 33, 8, 8, 5, 2, 1, 3},
                        Case{1, 1, 1, 30, 30, 4, 4, 6, 1, 1, 0, 0, false}, Case{3, 2, 2, 20, 20, 4, 4, 4, 3, 3, 6, 0.5f}}) {
    SCOPED_TRACE(describe(c));
    ProxyProblem<double> pp(c);
    auto& d = pp.p.data;
    HostTensor<double> q = to_double(d.q.view), k = to_double(d.k.view), v = to_double(d.v.view);
    HostTensor<double> pq = to_double(pp.pq.view), pk = to_double(pp.pk.view);
    const ref::Result dO = as_result(pp.p.dout.view);
    const ref::Grads g = pp.reference(q.cview(), k.cview(), v.cview(), pq.cview(), pk.cview());
    DirectionalCheck check{{&q, &k, &v, &pq, &pk}, {&g.dq, &g.dk, &g.dv, &g.dproxy_q, &g.dproxy_k}, [&] {
                             return inner(dO, ref::proxy(q.cview(), k.cview(), v.cview(), pp.p.masks, pq.cview(),
                                                         pk.cview(), c.iterations, c.dropout, pp.seed, c.scale));
                           }};
    check.branches = [&] {
      std::vector<int64_t> b;
      ref::proxy(q.cview(), k.cview(), v.cview(), pp.p.masks, pq.cview(), pk.cview(), c.iterations, c.dropout, pp.seed,
                 c.scale, &b);
      return b;
    };
    for (int rep = 0; rep < 3; ++rep) EXPECT_LE(check.relative_error(), 1e-7);
  }
}

TEST(ProxyBackwardCpu, WorkspaceIsExactAndIndependentOfSequenceLength) {
  const effattn::Exec<effattn::Cpu> probe{2};
  HostTensor<float> prox(1, 2, 64, 64);
  const auto bytes_at = [&](int64_t n) {
    HostTensor<float> q(2, 2, n, 64);
    return effattn::backward_workspace_bytes<effattn::Cpu>(effattn::Proxy<float>{prox.cview(), prox.cview()}, q.view,
                                                           q.view, q.view, probe);
  };
  EXPECT_EQ(bytes_at(1024), bytes_at(32768));
  for (int64_t pb : {1, 3}) {
    ProxyProblem<float> pp({3, 2, 2, 400, 400, 32, 32, 32, pb, pb, 6, 0.2f, true});
    auto& d = pp.p.data;
    GradData<float> g(d.q.view, d.k.view, d.v.view, Layout::bhsd);
    g.add_proxies(pp.pq.view, pp.pk.view, Layout::bhsd);
    const auto m = pp.method();
    const size_t bytes = effattn::backward_workspace_bytes<effattn::Cpu>(m, d.q.view, d.k.view, d.v.view, probe);
    void* ws = std::aligned_alloc(64, bytes);
    const auto before = effattn::allocation_stats().current;
    effattn::reset_allocation_peak();
    effattn::attention_backward<effattn::Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview(), d.out.cview(),
                                              pp.p.dout.cview(), g.grads(), pp.p.masks,
                                              effattn::Exec<effattn::Cpu>{2, ws, bytes});
    EXPECT_EQ(effattn::allocation_stats().peak, before) << "allocated although a workspace was given";
    g.expect_matches(pp.reference(d.q.cview(), d.k.cview(), d.v.cview(), pp.pq.cview(), pp.pk.cview()), 1e-5);
    EXPECT_THROW(effattn::attention_backward<effattn::Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview(), d.out.cview(),
                                                           pp.p.dout.cview(), g.grads(), pp.p.masks,
                                                           effattn::Exec<effattn::Cpu>{2, ws, bytes - 64}),
                 effattn::Error);
    std::free(ws);
  }
}

TEST(ProxyBackwardCpu, Errors) {
  ProxyProblem<float> pp({2, 2, 2, 100, 100, 8, 8, 16, 1, 1});
  auto& d = pp.p.data;
  GradData<float> g(d.q.view, d.k.view, d.v.view, Layout::bhsd);
  g.add_proxies(pp.pq.view, pp.pk.view, Layout::bhsd);
  const auto run = [&](effattn::Grads<float> grads) { pp.p.backward(pp.method(), grads); };
  auto grads = g.grads();
  grads.dproxy_q = {};
  expect_error([&] { run(grads); }, {"Proxy", "grads.dproxy_q is empty", "[1, 2, 16, 8]"});
  grads = g.grads();
  grads.dproxy_k.shape[2] = 15;
  expect_error([&] { run(grads); }, {"grads.dproxy_k has shape [1, 2, 15, 8]", "proxy_k's shape"});
  grads = g.grads();
  grads.dproxy_q.data = const_cast<float*>(pp.pk.cview().data) + 3;
  expect_error([&] { run(grads); }, {"grads.dproxy_q overlaps input proxy_k"});
  grads = g.grads();
  grads.dproxy_k.data = g.dq.storage.data();
  expect_error([&] { run(grads); }, {"grads.dproxy_k overlaps grads.dq"});
}

}  // namespace
