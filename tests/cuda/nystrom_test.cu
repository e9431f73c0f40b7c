// CUDA Nyström attention against the float64 reference (tests/reference/landmark.hpp) for float,
// __half and __nv_bfloat16: odd N, N not divisible by M, M up to 256, masks that empty whole
// segments and whole sequences, grouped heads, bshd/padded views, the exact-softmax fallback,
// iteration counts, a caller workspace, leading key tiles fully masked, q/k/v offsets past 2^31;
// argument errors and workspace sizing run without a device.
#include <effattn/cuda.cuh>

#include "landmark_cases.cuh"

namespace {

using namespace cuda_test;

struct Case {
  int64_t B, H, Hk, Nq, Nk, D;
  int M;
  bool masks = false;
  Layout layout = Layout::bhsd;
  int iterations = 6;
  float scale = 0;
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         " M=" + std::to_string(c.M) + " iters=" + std::to_string(c.iterations) + (c.masks ? " masks" : "") + " " +
         testing_util::layout_name(c.layout);
}

/// ref::nystrom computed in T (see landmark_cases.cuh).
template <class T>
HostTensor<T> nystrom_in(const DeviceProblem<T>& p, const Case& c) {
  const auto& q = p.q.view;
  const auto& masks = p.host_masks;
  HostTensor<T> out(c.B, c.H, c.Nq, c.D);
  const double s = ref::default_scale(c.scale, c.D);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t hk = h / (c.H / c.Hk);
      const ref::Mat Q = ref::head(q, b, h), K = ref::head(p.k.view, b, hk), V = ref::head(p.v.view, b, hk);
      const auto query_ok = [&](int64_t i) { return ref::valid(masks.query_valid, masks.query_batch_stride, b, i); };
      const auto key_ok = [&](int64_t j) { return ref::valid(masks.key_valid, masks.key_batch_stride, b, j); };
      ref::Mat O;
      if (std::min(c.Nq, c.Nk) <= c.M) {
        O = matmul_in<T>(softmax_rows_in<T>(Q, K, s, [&](int64_t, int64_t j) { return key_ok(j); }), V);
      } else {
        O = landmark_head_in<T>(Q, K, V, ref::segment_means(Q, query_ok, c.M), ref::segment_means(K, key_ok, c.M),
                                key_ok, s, c.iterations, {});
      }
      store_head_in(out, O, masks, b, h);
    }
  return out;
}

template <class T>
void run_case(const Case& c, const RunOptions& options = {}) {
  SCOPED_TRACE(describe(c) + " " + type_name<T>());
  EFFATTN_TRACE_SEED();
  DeviceProblem<T> p(c.B, c.H, c.Hk, c.Nq, c.Nk, c.D, c.layout, c.masks, options);
  p.run(effattn::Nystrom{c.M, c.iterations, c.scale});
  if (!p.ran) return;
  const ref::Result r = ref::nystrom(p.q.cview(), p.k.cview(), p.v.cview(), p.host_masks, c.M, c.iterations, c.scale);
  // The naive math in T only sets the 16-bit tolerance.
  p.expect_close(r, std::is_same_v<T, float> ? HostTensor<T>(1, 1, 1, 1) : nystrom_in(p, c));
}

template <class T>
class NystromCuda : public DeviceTest<T> {};
TYPED_TEST_SUITE(NystromCuda, ElementTypes);

TYPED_TEST(NystromCuda, OddLengthsAndLandmarkCounts) {
  for (int64_t n : {1, 7, 1000, 4097})
    for (int m : {1, 16, 64, 128}) run_case<TypeParam>({1, 2, 2, n, n, 32, m});
}

TYPED_TEST(NystromCuda, DivisibleAndNot) {
  for (int64_t n : {256, 257, 300, 383, 384}) run_case<TypeParam>({2, 2, 1, n, n, 64, 64});
}

TYPED_TEST(NystromCuda, DifferentQueryAndKeyLengths) {
  run_case<TypeParam>({2, 2, 2, 300, 700, 32, 16});
  run_case<TypeParam>({1, 2, 2, 900, 130, 32, 64});
}

TYPED_TEST(NystromCuda, HeadDimsAndLargestLandmarkCount) {
  for (int64_t d : {32, 64, 96, 128, 256}) run_case<TypeParam>({1, 2, 1, 333, 333, d, 32});
  run_case<TypeParam>({1, 1, 1, 1500, 1400, 64, 256});
}

TYPED_TEST(NystromCuda, MasksEmptySegmentsAndSequences) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded}) run_case<TypeParam>({3, 4, 2, 600, 500, 64, 64, true, l});
  run_case<TypeParam>({3, 2, 2, 50, 40, 32, 64, true});  // exact fallback with masks
}

TYPED_TEST(NystromCuda, GroupedHeadsIterationsScaleAndCallerWorkspace) {
  run_case<TypeParam>({2, 8, 2, 400, 400, 64, 32, true});
  run_case<TypeParam>({2, 6, 1, 350, 290, 32, 16, false, Layout::bshd});
  for (int it : {0, 1, 3, 6}) run_case<TypeParam>({1, 2, 2, 300, 300, 32, 32, false, Layout::bhsd, it});
  run_case<TypeParam>({2, 2, 2, 300, 300, 64, 32, true, Layout::bhsd, 6, 0.3f});
  run_case<TypeParam>({2, 3, 3, 500, 500, 32, 64, true}, with_caller_workspace());
}

// Keys [0, 600) masked: K3's query landmarks see no key in the first tiles, and the key
// landmarks of those segments drop, so K1's first landmark tile (64 or 32 wide) has none either.
TYPED_TEST(NystromCuda, FirstAllowedKeyInALaterTile) {
  run_case<TypeParam>({2, 2, 1, 1000, 1000, 64, 128}, with_masked_key_prefix({600, 130}));
  run_case<TypeParam>({1, 2, 2, 700, 700, 256, 64}, with_masked_key_prefix({400}));
}

// q, k, v at element offsets past 2^31 (DeviceInputs' far placement). No masks: they would empty
// batch 1, the batch past the 32-bit batch stride.
TYPED_TEST(NystromCuda, KeyValueOffsetsBeyond32Bits) {
  run_case<TypeParam>({2, 2, 1, 300, 300, 64, 32}, with_far_offsets());
}

// Host-only: runs without a device.
TEST(NystromCudaHost, WorkspaceDoesNotGrowWithSequenceLength) {
  const auto bytes = [](int64_t n) {
    float dummy = 0;
    const auto t = effattn::Tensor<const float>(&dummy, {2, 4, n, 64}, {4 * n * 64, n * 64, 64, 1});
    return effattn::workspace_bytes<effattn::Cuda>(effattn::Nystrom{64}, t, t, t);
  };
  EXPECT_GT(bytes(1000), 0u);
  EXPECT_EQ(bytes(1000), bytes(1000000));
  EXPECT_EQ(bytes(1000), bytes(int64_t(1) << 32));
}

TEST(NystromCudaHost, Errors) {
  // Host memory, never dereferenced: every check runs before the first CUDA call.
  std::vector<float> in_mem(2 * 500 * 64), out_mem(2 * 500 * 64);
  const auto run = [&](const effattn::Nystrom& m, int64_t d) {
    const effattn::Tensor<const float> in = effattn::bhsd<const float>(in_mem.data(), 1, 2, 500, d);
    effattn::attention<effattn::Cuda>(m, in, in, in, effattn::bhsd(out_mem.data(), 1, 2, 500, d));
  };
  expect_error([&] { run(effattn::Nystrom{0}, 64); }, {"attention<Cuda>(Nystrom)", "landmarks = 0", ">= 1"});
  expect_error([&] { run(effattn::Nystrom{16, -1}, 64); }, {"pinv_iterations = -1", ">= 0"});
  expect_error([&] { run(effattn::Nystrom{16}, 48); }, {"head dim D = 48", "not supported on Cuda"});
  expect_error([&] { run(effattn::Nystrom{300}, 64); }, {"300 landmarks", "1 to 256"});
  expect_error([&] { run(effattn::Nystrom{16, 6, NAN}, 64); }, {"scale = nan", "finite"});
  expect_error([] {
    float dummy = 0;
    const auto t = effattn::Tensor<const float>(&dummy, {1, 1, 100, 64}, {6400, 6400, 64, 1});
    effattn::workspace_bytes<effattn::Cuda>(effattn::Nystrom{-3}, t, t, t);
  }, {"workspace_bytes<Cuda>(Nystrom)", "landmarks = -3"});
}

}  // namespace
