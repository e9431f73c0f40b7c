// Every argument check of the public API throws effattn::Error with a message that names the
// argument and the values seen.
#include <effattn/effattn.hpp>

#include "reference/favor.hpp"
#include "reference/landmark.hpp"
#include "reference/softmax.hpp"
#include "test_util.hpp"

namespace {

using namespace testing_util;
using effattn::Cpu;
using effattn::Error;

struct Problem {
  HostTensor<float> q{2, 4, 10, 8}, k{2, 2, 12, 8}, v{2, 2, 12, 6}, out{2, 4, 10, 6};
  Problem() {
    q.fill_normal();
    k.fill_normal();
    v.fill_normal();
  }
  void run(effattn::Tensor<const float> qq, effattn::Tensor<const float> kk, effattn::Tensor<const float> vv,
           effattn::Tensor<float> oo, const effattn::Masks& m = {}, effattn::Softmax s = {}) {
    effattn::attention<Cpu>(s, qq, kk, vv, oo, m);
  }
};

TEST(Api, ErrorIsInvalidArgument) { static_assert(std::is_base_of_v<std::invalid_argument, Error>); }

TEST(Api, ValidProblemRuns) {
  Problem p;
  p.out.poison();
  p.run(p.q.view, p.k.view, p.v.view, p.out.view);
  EXPECT_LE(relative_error(p.out.view, ref::softmax(p.q.cview(), p.k.cview(), p.v.cview(), {}, 0, false)), 1e-5);
}

TEST(Api, ShapeDisagreements) {
  Problem p;
  auto q = p.q.cview();
  auto k = p.k.cview();
  auto v = p.v.cview();
  auto o = p.out.view;
  auto with = [](auto t, int dim, int64_t value) { t.shape[dim] = value; return t; };
  expect_error([&] { p.run(q, with(k, 0, 1), v, o); }, {"batch", "q 2", "k 1"});
  expect_error([&] { p.run(q, k, with(v, 1, 1), o); }, {"k has 2 heads", "v has 1"});
  expect_error([&] { p.run(with(q, 1, 3), k, v, with(o, 1, 3)); }, {"q heads (3)", "k/v heads (2)"});
  expect_error([&] { p.run(q, k, v, with(o, 1, 2)); }, {"out has 2 heads", "q has 4"});
  expect_error([&] { p.run(q, k, with(v, 2, 11), o); }, {"12 keys", "v has 11"});
  expect_error([&] { p.run(q, k, v, with(o, 2, 9)); }, {"out has 9 rows", "q has 10"});
  expect_error([&] { p.run(q, with(k, 3, 4), v, o); }, {"q.shape[3] = 8", "k.shape[3] = 4"});
  expect_error([&] { p.run(q, k, v, with(o, 3, 5)); }, {"out.shape[3] = 5", "v.shape[3] = 6"});
}

TEST(Api, NonPositiveSizesAndNullPointers) {
  Problem p;
  auto q = p.q.cview();
  q.shape[2] = 0;
  expect_error([&] { p.run(q, p.k.view, p.v.view, p.out.view); }, {"q.shape[2] (seq) = 0", "positive"});
  auto k = p.k.cview();
  k.shape[3] = -1;
  expect_error([&] { p.run(p.q.view, k, p.v.view, p.out.view); }, {"k.shape[3] (dim) = -1"});
  auto v = p.v.cview();
  v.data = nullptr;
  expect_error([&] { p.run(p.q.view, p.k.view, v, p.out.view); }, {"v.data is null"});
  auto o = p.out.view;
  o.data = nullptr;
  expect_error([&] { p.run(p.q.view, p.k.view, p.v.view, o); }, {"out.data is null"});
}

TEST(Api, OutputOverlappingAnInput) {
  HostTensor<float> x(1, 1, 16, 8);
  x.fill_normal();
  expect_error([&] { effattn::attention<Cpu>(effattn::Softmax{}, x.cview(), x.cview(), x.cview(), x.view); },
               {"out overlaps input q"});
  HostTensor<float> kv(1, 1, 16, 8);
  kv.fill_normal();
  // out shares memory with k and v (k reported first; v alone and partial overlaps:
  // hardening_test.cpp).
  expect_error([&] { effattn::attention<Cpu>(effattn::Softmax{}, x.cview(), kv.cview(), kv.cview(), kv.view); },
               {"out overlaps input k"});
}

TEST(Api, SelfAliasingOutput) {
  Problem p;
  auto o = p.out.view;
  o.stride[2] = 0;  // every row writes the same memory
  expect_error([&] { p.run(p.q.view, p.k.view, p.v.view, o); }, {"alias each other"});
}

TEST(Api, BadScaleThreadsAndMaskStrides) {
  Problem p;
  expect_error([&] { p.run(p.q.view, p.k.view, p.v.view, p.out.view, {}, {NAN, false}); }, {"scale = nan"});
  std::vector<uint8_t> km(2 * 12, 1);
  expect_error([&] { p.run(p.q.view, p.k.view, p.v.view, p.out.view, {nullptr, 0, km.data(), 5}); },
               {"key_batch_stride = 5", "Nk = 12"});
  expect_error(
      [&] {
        effattn::attention<Cpu>(effattn::Softmax{}, p.q.cview(), p.k.cview(), p.v.cview(), p.out.view, {},
                                effattn::Exec<Cpu>{-2});
      },
      {"exec.threads = -2"});
}

// One mask row shared by the batch (batch stride 0, B = 2): every operator against its reference,
// which reads the masks the same way (row b at b * stride).
TEST(Api, SharedMaskRowWithZeroBatchStride) {
  Problem p;
  std::vector<uint8_t> km(12, 1), qm(10, 1);
  km[3] = km[7] = 0;
  qm[2] = 0;
  const effattn::Masks masks{qm.data(), 0, km.data(), 0};
  const auto q = p.q.cview(), k = p.k.cview(), v = p.v.cview();
  p.out.poison();
  p.run(q, k, v, p.out.view, masks);
  EXPECT_LE(relative_error(p.out.view, ref::softmax(q, k, v, masks, 0, false)), 1e-5) << "Softmax";
  p.out.poison();
  effattn::attention<Cpu>(effattn::Nystrom{3}, q, k, v, p.out.view, masks);
  EXPECT_LE(relative_error(p.out.view, ref::nystrom(q, k, v, masks, 3, 6, 0)), 1e-5) << "Nystrom";
  HostTensor<float> proxies(1, 4, 5, 8);
  proxies.fill_normal();
  p.out.poison();
  effattn::attention<Cpu>(effattn::Proxy<float>{proxies.cview(), proxies.cview()}, q, k, v, p.out.view, masks);
  EXPECT_LE(relative_error(p.out.view, ref::proxy(q, k, v, masks, proxies.cview(), proxies.cview(), 6, 0, 0, 0)), 1e-5)
      << "Proxy";
  const std::vector<float> w = effattn::favor_projection(5, 4, 32, 8);
  const effattn::Tensor<const float> proj(w.data(), {1, 4, 32, 8}, {4 * 32 * 8, 32 * 8, 8, 1});
  p.out.poison();
  effattn::attention<Cpu>(effattn::Favor{proj}, q, k, v, p.out.view, masks);
  EXPECT_LE(relative_error(p.out.view, ref::favor(q, k, v, masks, proj, effattn::FeatureMap::positive, false, 0, 0)),
            1e-5)
      << "Favor";
}

TEST(Api, ColumnKeepIsDeterministicAndHonorsP) {
  EXPECT_TRUE(effattn::column_keep(1, 0, 0, 0, 0.0f));
  int kept = 0;
  for (int c = 0; c < 20000; ++c) kept += effattn::column_keep(42, 3, 1, c, 0.25f);
  EXPECT_NEAR(kept / 20000.0, 0.75, 0.015);
  for (int c = 0; c < 100; ++c) EXPECT_EQ(effattn::column_keep(7, 1, 2, c, 0.5f), effattn::column_keep(7, 1, 2, c, 0.5f));
}

TEST(Api, PhiloxKnownAnswer) {
  // Random123's published known-answer vector for philox4x32_10 with counter = key = 0.
  const auto r = effattn::detail::philox4x32_10({0, 0, 0, 0}, 0);
  EXPECT_EQ(r.x, 0x6627e8d5u);
  EXPECT_EQ(r.y, 0xe169c58du);
  EXPECT_EQ(r.z, 0xbc57ac4cu);
  EXPECT_EQ(r.w, 0x9b00dbd8u);
}

}  // namespace
