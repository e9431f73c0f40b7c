// CUDA proxy-token attention against the float64 reference (tests/reference/landmark.hpp) for
// float, __half and __nv_bfloat16: proxies shared by the batch or per sequence (and mixed), M up
// to 256, odd N, no inverse, iteration counts, column dropout with the CPU's Philox draw, masks,
// grouped heads, strided views, a caller workspace, leading key tiles fully masked, q/k/v
// offsets past 2^31; errors and workspace sizing without a device.
#include <effattn/cuda.cuh>

#include "landmark_cases.cuh"

namespace {

using namespace cuda_test;

struct Case {
  int64_t B, H, Hk, Nq, Nk, D, M;
  int64_t proxy_batch_q = 1, proxy_batch_k = 1;
  int iterations = 6;
  float dropout = 0;
  bool masks = false;
  Layout layout = Layout::bhsd;
  float scale = 0;
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         " M=" + std::to_string(c.M) + " proxies " + std::to_string(c.proxy_batch_q) + "/" +
         std::to_string(c.proxy_batch_k) + " iters=" + std::to_string(c.iterations) +
         " dropout=" + std::to_string(c.dropout) + (c.masks ? " masks" : "") + " " + testing_util::layout_name(c.layout);
}

/// ref::proxy computed in T (see landmark_cases.cuh).
template <class T>
HostTensor<T> proxy_in(const DeviceProblem<T>& p, const HostTensor<T>& pq, const HostTensor<T>& pk, const Case& c,
                       uint64_t seed) {
  const auto& masks = p.host_masks;
  HostTensor<T> out(c.B, c.H, c.Nq, c.D);
  const double s = ref::default_scale(c.scale, c.D);
  const bool shared = c.proxy_batch_q == 1 && c.proxy_batch_k == 1;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t hk = h / (c.H / c.Hk);
      const ref::Mat Q = ref::head(p.q.view, b, h), K = ref::head(p.k.view, b, hk), V = ref::head(p.v.view, b, hk);
      const ref::Landmarks lq = ref::given(ref::head(pq.view, c.proxy_batch_q == 1 ? 0 : b, h));
      const ref::Landmarks lk = ref::given(ref::head(pk.view, c.proxy_batch_k == 1 ? 0 : b, h));
      std::vector<double> column_scale(static_cast<size_t>(c.M), 1.0);
      for (int64_t col = 0; col < c.M && c.dropout > 0; ++col)
        column_scale[size_t(col)] =
            effattn::column_keep(seed, shared ? 0 : b, h, col, c.dropout) ? 1.0 / (1.0 - c.dropout) : 0.0;
      const auto key_ok = [&](int64_t j) { return ref::valid(masks.key_valid, masks.key_batch_stride, b, j); };
      store_head_in(out,
                    landmark_head_in<T>(Q, K, V, lq, lk, key_ok, s, c.iterations == 0 ? -1 : c.iterations, column_scale),
                    masks, b, h);
    }
  return out;
}

template <class T>
void run_case(const Case& c, const RunOptions& options = {}) {
  SCOPED_TRACE(describe(c) + " " + type_name<T>());
  EFFATTN_TRACE_SEED();
  DeviceProblem<T> p(c.B, c.H, c.Hk, c.Nq, c.Nk, c.D, c.layout, c.masks, options);
  HostTensor<T> pq(c.proxy_batch_q, c.H, c.M, c.D, c.layout), pk(c.proxy_batch_k, c.H, c.M, c.D, c.layout);
  pq.fill_normal(1.5);
  pk.fill_normal(1.5);
  const uint64_t seed = testing_util::rng()();
  DeviceTensor<T> dpq(pq), dpk(pk);
  ASSERT_TRUE(dpq.buf.ok() && dpk.buf.ok());
  p.run(effattn::Proxy<T>{dpq.cview(), dpk.cview(), c.iterations, c.dropout, seed, c.scale});
  if (!p.ran) return;
  const ref::Result r = ref::proxy(p.q.cview(), p.k.cview(), p.v.cview(), p.host_masks, pq.cview(), pk.cview(),
                                   c.iterations, c.dropout, seed, c.scale);
  // The naive math in T only sets the 16-bit tolerance.
  p.expect_close(r, std::is_same_v<T, float> ? HostTensor<T>(1, 1, 1, 1) : proxy_in(p, pq, pk, c, seed));
}

template <class T>
class ProxyCuda : public DeviceTest<T> {};
TYPED_TEST_SUITE(ProxyCuda, ElementTypes);

TYPED_TEST(ProxyCuda, OddLengthsAndProxyCounts) {
  for (int64_t n : {1, 7, 1000, 4097})
    for (int64_t m : {1, 16, 64, 128}) run_case<TypeParam>({2, 2, 2, n, n, 32, m});
  run_case<TypeParam>({1, 2, 1, 700, 900, 64, 256});
}

TYPED_TEST(ProxyCuda, SharedPerSequenceAndMixedProxies) {
  for (auto [bq, bk] : {std::pair<int64_t, int64_t>{1, 1}, {3, 3}, {1, 3}, {3, 1}})
    run_case<TypeParam>({3, 2, 2, 300, 300, 32, 16, bq, bk});
}

TYPED_TEST(ProxyCuda, NoInverse) {
  for (int64_t pb : {1, 2}) run_case<TypeParam>({2, 2, 2, 500, 400, 32, 64, pb, pb, 0, 0.5f, true});
}

TYPED_TEST(ProxyCuda, IterationCountsAndScale) {
  for (int it : {1, 3, 6}) run_case<TypeParam>({1, 2, 2, 300, 300, 32, 32, 1, 1, it});
  run_case<TypeParam>({2, 2, 2, 300, 300, 64, 32, 2, 2, 6, 0, true, Layout::bhsd, 0.3f});
}

TYPED_TEST(ProxyCuda, ColumnDropoutDrawnAsOnTheCpu) {
  for (float p : {0.1f, 0.5f, 0.9f}) {
    run_case<TypeParam>({3, 2, 2, 400, 400, 32, 128, 1, 1, 6, p});
    run_case<TypeParam>({3, 2, 2, 400, 400, 32, 128, 3, 3, 6, p});
  }
}

TYPED_TEST(ProxyCuda, LayoutsMasksGroupedHeadsAndCallerWorkspace) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})
    run_case<TypeParam>({3, 4, 2, 600, 500, 64, 64, 3, 3, 6, 0.1f, true, l});
  run_case<TypeParam>({2, 8, 2, 400, 400, 128, 32, 1, 1, 6, 0.2f, true});
  run_case<TypeParam>({2, 6, 1, 350, 290, 96, 16, 2, 2, 6, 0, false, Layout::bshd});
  run_case<TypeParam>({2, 3, 3, 500, 500, 256, 64, 1, 1, 6, 0.3f, true}, with_caller_workspace());
}

// Keys [0, 300) masked: K3's proxies see no key in their first tiles.
TYPED_TEST(ProxyCuda, FirstAllowedKeyInALaterTile) {
  run_case<TypeParam>({2, 2, 1, 700, 700, 64, 64, 2, 2}, with_masked_key_prefix({300, 64}));
  run_case<TypeParam>({1, 2, 2, 500, 500, 256, 32, 1, 1, 0}, with_masked_key_prefix({130}));
}

// q, k, v at element offsets past 2^31 (DeviceInputs' far placement). No masks: they would empty
// batch 1, the batch past the 32-bit batch stride.
TYPED_TEST(ProxyCuda, KeyValueOffsetsBeyond32Bits) {
  for (int64_t pb : {1, 2}) run_case<TypeParam>({2, 2, 1, 300, 300, 64, 32, pb, pb, 6, 0.1f}, with_far_offsets());
}

// Host-only: runs without a device.
TEST(ProxyCudaHost, WorkspaceDoesNotGrowWithSequenceLength) {
  float dummy = 0;
  const auto proxies = effattn::Tensor<const float>(&dummy, {1, 4, 64, 64}, {0, 64 * 64, 64, 1});
  const auto bytes = [&](int64_t n) {
    const auto t = effattn::Tensor<const float>(&dummy, {2, 4, n, 64}, {4 * n * 64, n * 64, 64, 1});
    return effattn::workspace_bytes<effattn::Cuda>(effattn::Proxy<float>{proxies, proxies}, t, t, t);
  };
  EXPECT_GT(bytes(1000), 0u);
  EXPECT_EQ(bytes(1000), bytes(1000000));
}

TEST(ProxyCudaHost, Errors) {
  // Host memory, never dereferenced: every check runs before the first CUDA call.
  std::vector<float> in_mem(3 * 4 * 50 * 32), out_mem(3 * 4 * 50 * 32), p_mem(4 * 300 * 32);
  const effattn::Tensor<const float> in = effattn::bhsd<const float>(in_mem.data(), 3, 4, 50, 32);
  const auto proxies = [&](int64_t b, int64_t h, int64_t m, int64_t d) {
    return effattn::bhsd<const float>(p_mem.data(), b, h, m, d);
  };
  const auto good = proxies(1, 4, 16, 32);
  const auto run = [&](const effattn::Proxy<float>& m) {
    effattn::attention<effattn::Cuda>(m, in, in, in, effattn::bhsd(out_mem.data(), 3, 4, 50, 32));
  };
  expect_error([&] { run({proxies(2, 4, 16, 32), good}); },
               {"attention<Cuda>(Proxy)", "proxy_q.shape[0] (batch) = 2", "1 (shared) or q's batch 3"});
  expect_error([&] { run({good, proxies(1, 2, 16, 32)}); }, {"proxy_k.shape[1] (heads) = 2", "q's heads 4"});
  expect_error([&] { run({proxies(1, 4, 16, 8), good}); }, {"proxy_q.shape[3] (dim) = 8", "q's head dim 32"});
  expect_error([&] { run({good, proxies(1, 4, 12, 32)}); }, {"proxy_q has 16 proxies", "proxy_k has 12"});
  expect_error([&] { run({good, good, -1}); }, {"pinv_iterations = -1"});
  expect_error([&] { run({good, good, 6, 1.0f}); }, {"column_dropout = 1", "[0, 1)"});
  expect_error([&] { run({proxies(1, 4, 300, 32), proxies(1, 4, 300, 32)}); }, {"300 landmarks", "1 to 256"});
  const effattn::Tensor<const float> strided(p_mem.data(), {1, 4, 16, 32}, {0, 16 * 64, 64, 2});
  expect_error([&] { run({strided, good}); }, {"proxy_q.stride[3] = 2", "contiguous rows"});
  expect_error([&] {
    effattn::attention<effattn::Cuda>(effattn::Proxy<float>{good, good}, in, in, in,
                                      effattn::bhsd(p_mem.data(), 3, 4, 50, 32));
  }, {"out overlaps proxy_q or proxy_k"});
}

}  // namespace
