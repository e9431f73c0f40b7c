// The training pair attention_with_saved / attention_backward_with_saved on the CPU: out bit for
// bit as attention's, gradients against the float64 reference (the Nyström and Proxy backward
// suites run all their cases this way too), other thread counts on either side, saved_bytes
// exact and O(N) per (b, h), nothing written outside the block, FAVOR+ (nothing to keep) through
// the plain pair, and the errors of a missing, small, misaligned, overlapping or foreign block.
#include <cstring>
#include <effattn/effattn.hpp>

#include "grad_util.hpp"
#include "reference/landmark.hpp"
#include "reference/softmax.hpp"

namespace {

using namespace testing_util;
using effattn::Cpu;

/// A problem with masks and, for Proxy, its proxies.
template <class T>
struct Problem {
  BackwardData<T> p;
  HostTensor<T> pq, pk;
  Problem(int64_t B, int64_t H, int64_t Hk, int64_t Nq, int64_t Nk, int64_t D, int64_t M, int64_t proxy_batch)
      : p(B, H, Hk, Nq, Nk, D, D, true, Layout::bshd), pq(proxy_batch, H, M, D), pk(proxy_batch, H, M, D) {
    pq.fill_normal(1.5);
    pk.fill_normal(1.5);
  }
  GradData<T> grads(bool proxies) {
    GradData<T> g(p.data.q.view, p.data.k.view, p.data.v.view, Layout::bshd);
    if (proxies) g.add_proxies(pq.view, pk.view, Layout::bhsd);
    return g;
  }
};

/// The saving forward writes the out attention writes, bit for bit; its backward (on other
/// threads than the forward) matches the float64 reference.
template <class T, class Method, class Reference>
void expect_pair_matches(Problem<T>& pr, const Method& m, bool proxies, Reference reference) {
  auto& p = pr.p;
  for (const auto& [fwd_threads, bwd_threads] : {std::pair{1, 3}, std::pair{3, 1}, std::pair{0, 0}}) {
    SCOPED_TRACE("forward threads " + std::to_string(fwd_threads) + ", backward threads " + std::to_string(bwd_threads));
    p.forward(m, false);
    const std::vector<T> plain = p.data.out.storage;
    p.forward(m, true, fwd_threads);
    ASSERT_NE(p.saved.data, nullptr);
    EXPECT_EQ(std::memcmp(plain.data(), p.data.out.storage.data(), plain.size() * sizeof(T)), 0)
        << "attention_with_saved changed out";
    GradData<T> g = pr.grads(proxies);
    p.backward(m, g.grads(), bwd_threads);
    g.expect_matches(reference(), cpu_tolerance<T>());
  }
}

template <class T>
class SavedCpu : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SavedCpu, Types);

TYPED_TEST(SavedCpu, SoftmaxCausalAndMasked) {
  EFFATTN_TRACE_SEED();
  using T = TypeParam;
  Problem<T> pr(3, 4, 2, 190, 257, 32, 1, 1);
  auto& d = pr.p.data;
  for (bool causal : {false, true}) {
    const effattn::Softmax m{0, causal};
    expect_pair_matches(pr, m, false, [&] {
      return ref::softmax_backward(d.q.cview(), d.k.cview(), d.v.cview(), pr.p.dout.cview(), pr.p.masks, 0.0, causal);
    });
  }
}

TYPED_TEST(SavedCpu, NystromAndItsExactFallback) {
  EFFATTN_TRACE_SEED();
  using T = TypeParam;
  for (int64_t n : {300, 20}) {  // 20 <= M: exact softmax
    Problem<T> pr(3, 4, 2, n, n + 7, 32, 1, 1);
    auto& d = pr.p.data;
    const effattn::Nystrom m{24, 6};
    expect_pair_matches(pr, m, false, [&] {
      return ref::nystrom_backward(d.q.cview(), d.k.cview(), d.v.cview(), pr.p.dout.cview(), pr.p.masks, 24, 6, 0.0);
    });
  }
}

TYPED_TEST(SavedCpu, ProxySharedPerSequenceDropoutAndNoInverse) {
  EFFATTN_TRACE_SEED();
  using T = TypeParam;
  struct Variant {
    int64_t proxy_batch;
    int iterations;
    float dropout;
  };
  for (const Variant& var : {Variant{1, 6, 0.f}, Variant{1, 4, 0.25f}, Variant{3, 6, 0.1f}, Variant{3, 0, 0.f}}) {
    SCOPED_TRACE("proxy batch " + std::to_string(var.proxy_batch) + " iterations " + std::to_string(var.iterations) +
                 " dropout " + std::to_string(var.dropout));
    Problem<T> pr(3, 4, 2, 211, 180, 16, 20, var.proxy_batch);
    auto& d = pr.p.data;
    const uint64_t seed = rng()();
    const effattn::Proxy<T> m{pr.pq.cview(), pr.pk.cview(), var.iterations, var.dropout, seed};
    expect_pair_matches(pr, m, true, [&] {
      return ref::proxy_backward(d.q.cview(), d.k.cview(), d.v.cview(), pr.p.dout.cview(), pr.p.masks, pr.pq.cview(),
                                 pr.pk.cview(), var.iterations, var.dropout, seed, 0.0);
    });
  }
}

TEST(SavedCpu, FavorKeepsNothingAndIsThePlainPair) {
  BackwardData<float> p(2, 2, 2, 100, 90, 16, 16, true, Layout::bhsd);
  const std::vector<float> projection = effattn::favor_projection(7, 1, 64, 16);
  const effattn::Favor m{effattn::bhsd<const float>(projection.data(), 1, 1, 64, 16)};
  auto& d = p.data;
  EXPECT_EQ(effattn::saved_bytes<Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview()), 0u);
  p.forward(m, false);
  const std::vector<float> plain = d.out.storage;
  GradData<float> a(d.q.view, d.k.view, d.v.view, Layout::bhsd), b(d.q.view, d.k.view, d.v.view, Layout::bhsd);
  p.backward(m, a.grads());
  effattn::attention_with_saved<Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview(), d.out.view, effattn::Saved{}, p.masks);
  EXPECT_EQ(std::memcmp(plain.data(), d.out.storage.data(), plain.size() * sizeof(float)), 0);
  effattn::attention_backward_with_saved<Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview(), d.out.cview(), p.dout.cview(),
                                              effattn::Saved{}, b.grads(), p.masks);
  for (auto [x, y] : {std::pair{&a.dq, &b.dq}, std::pair{&a.dk, &b.dk}, std::pair{&a.dv, &b.dv}})
    EXPECT_EQ(std::memcmp(x->storage.data(), y->storage.data(), x->storage.size() * sizeof(float)), 0);
}

// saved_bytes is exactly what a call uses (nothing after it is touched), and grows with N only
// by K1's row statistics: B·H·N elements.
TEST(SavedCpu, BlockIsExactAndLinearInSequenceLength) {
  const effattn::Nystrom m{32};
  const auto bytes_at = [&](int64_t n) {
    HostTensor<float> q(2, 3, n, 64);
    return effattn::saved_bytes<Cpu>(m, q.cview(), q.cview(), q.cview());
  };
  EXPECT_EQ(bytes_at(32768) - bytes_at(1024), size_t{2 * 3 * (32768 - 1024)} * sizeof(float));
  BackwardData<float> p(2, 3, 3, 500, 500, 16, 16, true, Layout::bhsd);
  auto& d = p.data;
  const size_t need = effattn::saved_bytes<Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview());
  std::vector<uint64_t> block(need / 8 + 64, 0x5a5a5a5a5a5a5a5aULL);
  auto* base = reinterpret_cast<unsigned char*>(block.data());
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  std::vector<unsigned char> tail(base + need, base + need + 256);
  effattn::attention_with_saved<Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview(), d.out.view, effattn::Saved{base, need},
                                     p.masks, effattn::Exec<Cpu>{2});
  EXPECT_EQ(std::memcmp(tail.data(), base + need, tail.size()), 0) << "wrote past saved_bytes";
}

TEST(SavedCpu, Errors) {
  BackwardData<float> p(2, 2, 2, 300, 300, 16, 16, false, Layout::bhsd);
  auto& d = p.data;
  const effattn::Nystrom m{32};
  const size_t need = effattn::saved_bytes<Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview());
  std::vector<uint64_t> block(2 * need / 8 + 64, 0);
  auto* base = reinterpret_cast<unsigned char*>(block.data());
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  const auto forward = [&](effattn::Saved s, effattn::Exec<Cpu> exec = {}) {
    effattn::attention_with_saved<Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview(), d.out.view, s, p.masks, exec);
  };
  GradData<float> g(d.q.view, d.k.view, d.v.view, Layout::bhsd);
  const auto backward = [&](const auto& method, effattn::Saved s) {
    effattn::attention_backward_with_saved<Cpu>(method, d.q.cview(), d.k.cview(), d.v.cview(), d.out.cview(),
                                                p.dout.cview(), s, g.grads(), p.masks);
  };
  expect_error([&] { forward({nullptr, need}); }, {"attention_with_saved<Cpu>(Nystrom)", "saved.data is null"});
  expect_error([&] { forward({base, need - 1}); },
               {"saved.bytes = " + std::to_string(need - 1), "needs " + std::to_string(need)});
  expect_error([&] { forward({base + 8, need}); }, {"saved.data must be 64-byte aligned"});
  // The block shares bytes with the caller's workspace.
  const size_t ws = effattn::workspace_bytes<Cpu>(m, d.q.cview(), d.k.cview(), d.v.cview());
  std::vector<uint64_t> big((need + ws) / 8 + 64);
  auto* both = reinterpret_cast<unsigned char*>(big.data());
  both += (64 - reinterpret_cast<uintptr_t>(both) % 64) % 64;
  expect_error([&] { forward({both, need}, effattn::Exec<Cpu>{0, both + need - 64, ws}); },
               {"saved (" + std::to_string(need) + " bytes) overlaps exec.workspace"});
  // A block no forward finished, and one written for another call.
  expect_error([&] { backward(m, {base, need}); }, {"attention_backward_with_saved<Cpu>(Nystrom)", "no finished forward"});
  forward({base, need});
  expect_error([&] { backward(effattn::Nystrom{16}, {base, need}); }, {"saved was written for", "M=32", "M=16"});
  expect_error([&] { backward(effattn::Softmax{}, {base, 2 * need}); }, {"(layout 2)", "(layout 1)"});
  backward(m, {base, need});  // the right one still works
  g.expect_matches(ref::nystrom_backward(d.q.cview(), d.k.cview(), d.v.cview(), p.dout.cview(), p.masks, 32, 6, 0.0),
                   1e-5);
}

}  // namespace
