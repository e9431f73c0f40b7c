// CUDA FAVOR+ attention against the float64 reference (tests/reference/favor.hpp) for float,
// __half and __nv_bfloat16: every feature map, bidirectional and causal (bottom-right aligned,
// Nq != Nk), odd sizes and feature counts (M not a multiple of the 32-feature blocks), every head
// dim, layouts, masks with fully masked rows, grouped heads with shared and per-head projections,
// input ranges where the stabilizers matter, many key splits, a caller workspace, leading key
// tiles fully masked, q/k/v offsets past 2^31; argument errors and workspace sizing run without
// a device.
//
// Tolerance: the kernels compute in float from the T inputs, so against the float64 reference of
// the same T inputs only float rounding and the final rounding to T remain. float: DESIGN's 1e-5
// (times the condition number of the normalizer sums, as the CPU test: 1 for positive and relu);
// 16-bit: T's epsilon (times the same condition number) — the floor of DESIGN's CUDA rule, which
// 2x the naive error in T can only raise.
#include <effattn/cuda.cuh>
#include <effattn/favor_projection.hpp>

#include <cmath>

#include "landmark_cases.cuh"
#include "reference/favor.hpp"

namespace {

using namespace cuda_test;
using effattn::FeatureMap;

const char* map_name(FeatureMap m) {
  return m == FeatureMap::positive ? "positive" : m == FeatureMap::relu ? "relu" : "trig";
}

struct Case {
  int64_t B, H, Hk, Nq, Nk, D, M;
  FeatureMap map;
  bool causal;
  bool masks;
  Layout layout = Layout::bhsd;
  bool shared_projection = false;
  float scale = 0, eps = 0;
  double input_std = 0;  // 0: 1, or the trig default below
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         " M=" + std::to_string(c.M) + " " + map_name(c.map) + (c.causal ? " causal" : "") + (c.masks ? " masks" : "") +
         " " + testing_util::layout_name(c.layout) + (c.shared_projection ? " shared-projection" : "") +
         " std=" + std::to_string(c.input_std);
}

template <class T>
void run_case(const Case& c, const RunOptions& options = {}) {
  SCOPED_TRACE(describe(c) + " " + type_name<T>());
  EFFATTN_TRACE_SEED();
  // Trig by default at small |x'|², where its normalizer stays away from zero (as the CPU test).
  const double stddev =
      c.input_std > 0 ? c.input_std : c.map == FeatureMap::trig ? 0.8 / std::pow(double(c.D), 0.25) : 1.0;
  DeviceProblem<T> p(c.B, c.H, c.Hk, c.Nq, c.Nk, c.D, c.layout, c.masks, options, stddev);
  const int64_t ph = c.shared_projection ? 1 : c.H;
  const std::vector<float> w = effattn::favor_projection(testing_util::rng()(), int(ph), int(c.M), int(c.D));
  const effattn::Tensor<const float> host_proj(w.data(), {1, ph, c.M, c.D}, {ph * c.M * c.D, c.M * c.D, c.D, 1});
  DeviceBuffer<float> dproj(w.size());
  ASSERT_TRUE(dproj.ok());
  EFFATTN_TEST_CUDA(cudaMemcpy(dproj.data, w.data(), w.size() * sizeof(float), cudaMemcpyHostToDevice));
  effattn::Favor m{host_proj, c.map, c.causal, c.scale, c.eps};
  m.projection.data = dproj.data;
  p.run(m);
  if (!p.ran) return;
  double condition = 0;
  const ref::Result r = ref::favor<double>(p.q.cview(), p.k.cview(), p.v.cview(), p.host_masks, host_proj, c.map,
                                           c.causal, c.scale, c.eps, &condition);
  const double error = testing_util::relative_error(p.out.view, r);
  const double bound = (std::is_same_v<T, float> ? 1e-5 : epsilon_of<T>()) * std::max(1.0, condition);
  EXPECT_LE(error, bound) << "condition number " << condition;
  EXPECT_TRUE(outside_unchanged(p.out, p.sentinel)) << "wrote outside the out view";
}

constexpr FeatureMap kMaps[] = {FeatureMap::positive, FeatureMap::relu, FeatureMap::trig};

template <class T>
class FavorCuda : public DeviceTest<T> {};
TYPED_TEST_SUITE(FavorCuda, ElementTypes);

TYPED_TEST(FavorCuda, EveryMapBidirectionalAndCausal) {
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true}) run_case<TypeParam>({2, 2, 2, 300, 300, 32, 64, map, causal, false});
}

TYPED_TEST(FavorCuda, OddSizes) {
  for (int64_t n : {1, 7, 33, 1000})
    for (FeatureMap map : kMaps)
      for (bool causal : {false, true}) run_case<TypeParam>({1, 2, 2, n, n, 32, 37, map, causal, false});
}

TYPED_TEST(FavorCuda, FeatureCountsAndHeadDims) {
  for (int64_t m : {1, 3, 16, 17, 256, 300})
    for (bool causal : {false, true}) run_case<TypeParam>({1, 1, 1, 150, 150, 32, m, FeatureMap::positive, causal, false});
  for (int64_t m : {1, 17, 33}) run_case<TypeParam>({1, 1, 1, 150, 150, 32, m, FeatureMap::trig, true, false});
  for (int64_t d : {32, 64, 96, 128, 256})
    for (FeatureMap map : kMaps)
      for (bool causal : {false, true}) run_case<TypeParam>({1, 2, 1, 260, 260, d, 48, map, causal, false});
}

TYPED_TEST(FavorCuda, LayoutsAndMasksWithFullyMaskedRows) {
  for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})
    for (bool causal : {false, true})
      run_case<TypeParam>({2, 4, 2, 333, 333, 64, 64, FeatureMap::positive, causal, true, l});
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true}) run_case<TypeParam>({3, 2, 2, 400, 600, 32, 50, map, causal, true, Layout::bshd});
}

TYPED_TEST(FavorCuda, CausalBottomRightAligned) {
  for (auto [nq, nk] : {std::pair<int64_t, int64_t>{100, 250}, {250, 100}, {1, 300}, {300, 1}, {64, 64}})
    for (FeatureMap map : kMaps) run_case<TypeParam>({1, 2, 1, nq, nk, 32, 40, map, true, false});
}

TYPED_TEST(FavorCuda, GroupedHeadsWithSharedAndPerHeadProjections) {
  for (bool shared : {false, true}) {
    run_case<TypeParam>({2, 8, 2, 200, 200, 64, 64, FeatureMap::positive, false, true, Layout::bhsd, shared});
    run_case<TypeParam>({1, 6, 1, 150, 90, 32, 32, FeatureMap::relu, true, false, Layout::bshd, shared});
    run_case<TypeParam>({1, 4, 2, 120, 120, 32, 20, FeatureMap::trig, true, true, Layout::padded, shared});
  }
}

TYPED_TEST(FavorCuda, ExplicitScaleEpsAndInputRanges) {
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, FeatureMap::positive, false, false, Layout::bhsd, false, 0.3f, 1e-3f});
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, FeatureMap::relu, true, true, Layout::bhsd, false, 0.05f, 0.1f});
  run_case<TypeParam>({1, 2, 2, 300, 300, 64, 64, FeatureMap::trig, false, false, Layout::bhsd, false, 0.02f});
  for (double stddev : {0.1, 2.0, 5.0})
    for (FeatureMap map : {FeatureMap::positive, FeatureMap::relu})
      for (bool causal : {false, true})
        run_case<TypeParam>({1, 2, 2, 200, 200, 64, 64, map, causal, true, Layout::bhsd, false, 0, 0, stddev});
}

// Long keys with few heads: pass 1 splits the keys over many CTAs whose partial sums are
// rescaled to the global key max (the running-max combine).
TYPED_TEST(FavorCuda, ManyKeySplitsAndCallerWorkspace) {
  for (FeatureMap map : kMaps) run_case<TypeParam>({1, 1, 1, 70, 20000, 64, 32, map, false, true}, with_caller_workspace());
  run_case<TypeParam>({1, 1, 1, 3000, 3000, 64, 64, FeatureMap::positive, true, true, Layout::bhsd, false, 0, 0, 2.0},
                      with_caller_workspace());
}

// Keys [0, 64) and [0, 250) masked: pass 1 and the causal scan start with key tiles that hold no
// valid key (the running key max stays -inf there), and early causal rows see no key.
TYPED_TEST(FavorCuda, FirstAllowedKeyInALaterTile) {
  for (FeatureMap map : kMaps)
    for (bool causal : {false, true})
      run_case<TypeParam>({2, 2, 1, 300, 300, 32, 64, map, causal, false}, with_masked_key_prefix({64, 250}));
}

// q, k, v at element offsets past 2^31 (DeviceInputs' far placement). No masks: they would empty
// batch 1, the batch past the 32-bit batch stride.
TYPED_TEST(FavorCuda, KeyValueOffsetsBeyond32Bits) {
  for (bool causal : {false, true})
    run_case<TypeParam>({2, 2, 1, 300, 300, 64, 64, FeatureMap::positive, causal, false}, with_far_offsets());
}

// Host-only: runs without a device.
TEST(FavorCudaHost, WorkspaceDoesNotGrowWithSequenceLength) {
  float dummy = 0;
  const effattn::Tensor<const float> proj(&dummy, {1, 4, 256, 64}, {0, 256 * 64, 64, 1});
  for (bool causal : {false, true}) {
    const auto bytes = [&](int64_t n) {
      const auto t = effattn::Tensor<const float>(&dummy, {2, 4, n, 64}, {4 * n * 64, n * 64, 64, 1});
      return effattn::workspace_bytes<effattn::Cuda>(effattn::Favor{proj, FeatureMap::positive, causal}, t, t, t);
    };
    EXPECT_GT(bytes(1000), 0u);
    EXPECT_EQ(bytes(100000), bytes(10000000)) << "causal " << causal;
  }
}

TEST(FavorCudaHost, ArgumentErrors) {
  // Host memory, never dereferenced: every check runs before the first CUDA call.
  std::vector<float> in_mem(2 * 4 * 50 * 64), out_mem(2 * 4 * 50 * 64), w(2 * 4 * 50 * 64);
  const auto in = effattn::bhsd<const float>(in_mem.data(), 2, 4, 50, 64);
  const auto proj = [&](int64_t b, int64_t h, int64_t m, int64_t d) {
    return effattn::Tensor<const float>(w.data(), {b, h, m, d}, {h * m * d, m * d, d, 1});
  };
  const auto run = [&](const effattn::Favor& m) {
    effattn::attention<effattn::Cuda>(m, in, in, in, effattn::bhsd(out_mem.data(), 2, 4, 50, 64));
  };
  expect_error([&] { run({proj(1, 4, 0, 64)}); }, {"attention<Cuda>(Favor)", "projection.shape[2] (features M) = 0"});
  expect_error([&] { run({proj(2, 4, 16, 64)}); }, {"projection.shape[0] = 2"});
  expect_error([&] { run({proj(1, 3, 16, 64)}); }, {"projection has 3 heads", "1 or H = 4"});
  expect_error([&] { run({proj(1, 4, 16, 32)}); }, {"projection.shape[3] = 32", "D = 64"});
  expect_error([&] { run({proj(1, 4, 16, 64), FeatureMap::positive, false, -1.0f}); }, {"scale = -1", "positive"});
  expect_error([&] { run({proj(1, 4, 16, 64), FeatureMap(7)}); }, {"map = 7"});
  expect_error([&] { run({proj(1, 4, 16, 64), FeatureMap::relu, false, 0, -1.0f}); }, {"eps = -1"});
  expect_error([&] { run({proj(1, 4, 16, 64), FeatureMap::trig, false, 0, 0.5f}); }, {"eps = 0.5", "trig"});
  expect_error([&] {
    effattn::attention<effattn::Cuda>(effattn::Favor{proj(1, 4, 16, 64)}, in, in, in,
                                      effattn::bhsd(w.data(), 2, 4, 50, 64));
  }, {"out overlaps projection"});
  expect_error([&] {
    std::vector<float> m48(2 * 4 * 50 * 48), o48(2 * 4 * 50 * 48), w48(4 * 16 * 48);
    const auto i48 = effattn::bhsd<const float>(m48.data(), 2, 4, 50, 48);
    const effattn::Tensor<const float> p48(w48.data(), {1, 4, 16, 48}, {4 * 16 * 48, 16 * 48, 48, 1});
    effattn::attention<effattn::Cuda>(effattn::Favor{p48}, i48, i48, i48, effattn::bhsd(o48.data(), 2, 4, 50, 48));
  }, {"head dim D = 48", "not supported on Cuda"});
}

}  // namespace
