// CUDA softmax: argument errors (no device needed), CudaError, workspace, and the raw tile
// interface with mixed element types as the landmark operators use it. Value tests per element
// type live in softmax_{float,half,bf16}_test.cu.
#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "softmax_cases.cuh"

namespace {

using cuda_test::HostTensor;
using effattn::Cuda;
using effattn::Tensor;
using testing_util::Layout;
using testing_util::expect_error;

// Fake device pointers are fine here: every call below fails validation before any launch.
struct Views {
  std::vector<__half> storage = std::vector<__half>(1 << 16);
  Tensor<const __half> in(int64_t b, int64_t h, int64_t n, int64_t d, int64_t at = 0) const {
    return effattn::bhsd<const __half>(storage.data() + at, b, h, n, d);
  }
  Tensor<__half> out(int64_t b, int64_t h, int64_t n, int64_t d) {
    return effattn::bhsd(storage.data() + (1 << 15), b, h, n, d);
  }
};

TEST(SoftmaxCuda, ErrorsNameTheArgument) {
  Views m;
  const effattn::Softmax sm{};
  expect_error([&] { effattn::attention<Cuda>(sm, m.in(1, 2, 8, 80), m.in(1, 2, 8, 80), m.in(1, 2, 8, 80), m.out(1, 2, 8, 80)); },
               {"attention<Cuda>(Softmax)", "head dim D = 80", "not supported"});
  expect_error([&] { effattn::attention<Cuda>(sm, m.in(1, 2, 8, 64), m.in(1, 2, 8, 64), m.in(1, 2, 8, 32), m.out(1, 2, 8, 32)); },
               {"v.shape[3] (Dv) = 32", "D = 64"});
  Tensor<const __half> strided = m.in(1, 2, 8, 32);
  strided.stride = {2 * 8 * 64, 8 * 64, 64, 2};
  expect_error([&] { effattn::attention<Cuda>(sm, strided, m.in(1, 2, 8, 32), m.in(1, 2, 8, 32), m.out(1, 2, 8, 32)); },
               {"q.stride[3] = 2", "contiguous rows"});
  expect_error([&] { effattn::attention<Cuda>(sm, m.in(2, 2, 8, 32), m.in(1, 2, 8, 32), m.in(1, 2, 8, 32), m.out(2, 2, 8, 32)); },
               {"batch sizes disagree", "q 2", "k 1"});
  expect_error([&] { effattn::attention<Cuda>(sm, m.in(1, 4, 8, 32), m.in(1, 3, 8, 32), m.in(1, 3, 8, 32), m.out(1, 4, 8, 32)); },
               {"multiple of k/v heads", "(4)", "(3)"});
  Tensor<const __half> null_q = m.in(1, 2, 8, 32);
  null_q.data = nullptr;
  expect_error([&] { effattn::attention<Cuda>(sm, null_q, m.in(1, 2, 8, 32), m.in(1, 2, 8, 32), m.out(1, 2, 8, 32)); },
               {"q.data is null"});
  expect_error([&] {
    effattn::attention<Cuda>(sm, m.in(1, 2, 8, 32, 1 << 15), m.in(1, 2, 8, 32), m.in(1, 2, 8, 32), m.out(1, 2, 8, 32));
  }, {"overlaps input q"});
  expect_error([&] {
    effattn::attention<Cuda>(effattn::Softmax{NAN, false}, m.in(1, 2, 8, 32), m.in(1, 2, 8, 32), m.in(1, 2, 8, 32),
                             m.out(1, 2, 8, 32));
  }, {"scale", "finite"});
}

TEST(SoftmaxCuda, RawInterfaceErrors) {
  Views m;
  effattn::cuda::SoftmaxTiles<__half> p;
  p.q = p.k = p.v = m.storage.data();
  p.out = m.storage.data() + (1 << 15);
  p.nq = p.nk = 8;
  p.head_dim = 32;
  expect_error([&] { effattn::cuda::launch_softmax_tiles<64>(p, nullptr); }, {"head_dim = 32", "chosen for 64"});
  p.head_dim = 80;
  expect_error([&] { effattn::cuda::run_softmax_tiles(p, nullptr); }, {"run_softmax_tiles", "head dim 80"});
  p.head_dim = 32;
  p.nq = 0;
  expect_error([&] { effattn::cuda::run_softmax_tiles(p, nullptr); }, {"sizes must be positive", "nq 0"});
  p.nq = 8;
  p.heads = 6;
  p.group = 4;
  expect_error([&] { effattn::cuda::run_softmax_tiles(p, nullptr); }, {"heads (6)", "group (4)"});
  p.group = 1;
  p.v = nullptr;
  expect_error([&] { effattn::cuda::run_softmax_tiles(p, nullptr); }, {"null pointer"});
}

TEST(SoftmaxCuda, CudaFailuresThrowCudaError) {
  try {
    EFFATTN_CUDA_CHECK(cudaErrorInvalidValue);
    ADD_FAILURE() << "no effattn::CudaError thrown";
  } catch (const effattn::CudaError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("cudaErrorInvalidValue"), std::string::npos) << what;
    EXPECT_NE(what.find(cudaGetErrorString(cudaErrorInvalidValue)), std::string::npos) << what;
    EXPECT_NE(what.find("softmax_test.cu"), std::string::npos) << what;
  }
}

TEST(SoftmaxCuda, NeedsNoWorkspace) {
  Views m;
  EXPECT_EQ(effattn::workspace_bytes<Cuda>(effattn::Softmax{}, m.in(2, 4, 1000, 64), m.in(2, 4, 1000, 64),
                                           m.in(2, 4, 1000, 64)),
            0u);
}

// Host-only: the far placement of the KeyValueOffsetsBeyond32Bits tests really puts rows and
// batches past 2^31, keeps every operand 16-byte aligned (the cp.async path) and gives every
// element of q, k and v an address of its own.
TEST(SoftmaxCuda, FarTestPlacementPassesTwoToThe31) {
  const HostTensor<__half> q(2, 2, 300, 64), k(2, 1, 300, 64), v(2, 1, 300, 64);
  const auto p = cuda_test::DeviceInputs<__half>::far_placement(q, k);
  const int64_t two31 = int64_t(1) << 31;
  std::vector<std::pair<int64_t, int64_t>> rows;  // [start, end) of every view row
  const HostTensor<__half>* views[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    const auto& shape = views[i]->view.shape;
    const auto& st = p.stride;
    EXPECT_GT(st[0], std::numeric_limits<int32_t>::max()) << "batch stride of operand " << i;
    EXPECT_GE((shape[2] - 1) * st[2], two31) << "row offsets of operand " << i;
    for (int64_t x : {p.at[i], st[0], st[1], st[2]}) EXPECT_EQ(x * 2 % 16, 0) << "operand " << i;
    for (int64_t b = 0; b < shape[0]; ++b)
      for (int64_t h = 0; h < shape[1]; ++h)
        for (int64_t r = 0; r < shape[2]; ++r) {
          const int64_t start = p.at[i] + b * st[0] + h * st[1] + r * st[2];
          rows.push_back({start, start + shape[3]});
        }
  }
  std::sort(rows.begin(), rows.end());
  for (size_t j = 1; j < rows.size(); ++j) ASSERT_LE(rows[j - 1].second, rows[j].first) << "rows overlap";
  EXPECT_LE(rows.back().second, static_cast<int64_t>(p.elements));
}

TEST(SoftmaxCuda, DeviceWorkspaceIsCountedAndStreamOrdered) {
  EFFATTN_REQUIRE_DEVICE();
  cudaStream_t stream = nullptr;
  EFFATTN_TEST_CUDA(cudaStreamCreate(&stream));
  const size_t before = effattn::allocation_stats().current;
  {
    effattn::cuda::DeviceWorkspace ws(effattn::Exec<Cuda>{stream}, 1000);
    EXPECT_EQ(effattn::allocation_stats().current, before + effattn::detail::align_up(1000));
    EXPECT_NE(ws.arena().take<float>(250), nullptr);
    ws.release();
  }
  EXPECT_EQ(effattn::allocation_stats().current, before);
  void* given = nullptr;
  EFFATTN_TEST_CUDA(cudaMalloc(&given, 256));
  {
    effattn::cuda::DeviceWorkspace ws(effattn::Exec<Cuda>{stream, given, 256}, 200);
    EXPECT_EQ(effattn::allocation_stats().current, before) << "allocated although a workspace was given";
  }
  expect_error([&] { effattn::cuda::DeviceWorkspace ws(effattn::Exec<Cuda>{stream, given, 256}, 300); },
               {"workspace_size = 256", "needs 300"});
  EFFATTN_TEST_CUDA(cudaStreamSynchronize(stream));
  EFFATTN_TEST_CUDA(cudaFree(given));
  EFFATTN_TEST_CUDA(cudaStreamDestroy(stream));
}

/// Converts a host tensor element by element (same layout and shape).
template <class To, class From>
HostTensor<To> converted(const HostTensor<From>& from, Layout layout) {
  const auto& s = from.view.shape;
  HostTensor<To> to(s[0], s[1], s[2], s[3], layout);
  for (int64_t b = 0; b < s[0]; ++b)
    for (int64_t h = 0; h < s[1]; ++h)
      for (int64_t i = 0; i < s[2]; ++i)
        for (int64_t c = 0; c < s[3]; ++c)
          to.view(b, h, i, c) = effattn::cuda::convert<To>(from.view(b, h, i, c));
  return to;
}

/// The raw tile interface with query, key/value and output types of its own, as the landmark
/// operators call it (e.g. float landmark queries over __half keys). The reference sees the
/// inputs converted to the compute type, which is what the kernel multiplies.
template <class TQ, class TKV, class TOut>
void run_raw_case(int64_t B, int64_t H, int64_t Hk, int64_t nq, int64_t nk, int64_t D, bool causal) {
  using Tc = effattn::cuda::softmax_compute_t<TQ, TKV>;
  SCOPED_TRACE(std::string("TQ=") + cuda_test::type_name<TQ>() + " TKV=" + cuda_test::type_name<TKV>() +
               " TOut=" + cuda_test::type_name<TOut>() + " D=" + std::to_string(D));
  EFFATTN_TRACE_SEED();
  HostTensor<TQ> q(B, H, nq, D, Layout::bshd);
  HostTensor<TKV> k(B, Hk, nk, D), v(B, Hk, nk, D, Layout::padded);
  HostTensor<TOut> out(B, H, nq, D, Layout::padded);
  q.fill_normal(1.5);
  k.fill_normal(1.5);
  v.fill_normal();
  const TOut sentinel = effattn::cuda::from_float<TOut>(-777.0f);
  cuda_test::poison_view(out, sentinel);
  std::vector<uint8_t> km = testing_util::random_mask(B, nk, 0.8, B - 1);
  cuda_test::DeviceTensor<TQ> dq(q);
  cuda_test::DeviceTensor<TKV> dk(k), dv(v);
  cuda_test::DeviceTensor<TOut> dout(out);
  cuda_test::DeviceMask dkm(km);

  effattn::cuda::SoftmaxTiles<TQ, TKV, TOut> p;
  p.q = dq.view.data;
  p.k = dk.view.data;
  p.v = dv.view.data;
  p.out = dout.view.data;
  p.q_stride = effattn::cuda::row_strides(dq.view);
  p.k_stride = effattn::cuda::row_strides(dk.view);
  p.v_stride = effattn::cuda::row_strides(dv.view);
  p.out_stride = effattn::cuda::row_strides(dout.view);
  p.batch = B;
  p.heads = H;
  p.group = H / Hk;
  p.nq = nq;
  p.nk = nk;
  p.head_dim = D;
  p.key_valid = dkm.buf.data;
  p.key_batch_stride = nk;
  p.scale = 0.2f;
  p.causal = causal;
  p.causal_offset = nk - nq;
  effattn::cuda::run_softmax_tiles(p, nullptr);
  EFFATTN_TEST_CUDA(cudaDeviceSynchronize());
  dout.download(out);

  const HostTensor<Tc> qc = converted<Tc>(q, Layout::bhsd), kc = converted<Tc>(k, Layout::bhsd),
                       vc = converted<Tc>(v, Layout::bhsd);
  const effattn::Masks masks{nullptr, 0, km.data(), nk};
  const ref::Result r = ref::softmax(qc.cview(), kc.cview(), vc.cview(), masks, 0.2f, causal);
  const double naive_error =
      testing_util::relative_error(cuda_test::naive_softmax(qc.cview(), kc.cview(), vc.cview(), masks, 0.2f, causal).view, r);
  // A 16-bit output adds its own rounding to a float computation.
  const double tol = std::max(cuda_test::tolerance<Tc>(naive_error), cuda_test::epsilon_of<TOut>());
  EXPECT_LE(testing_util::relative_error(out.view, r), tol);
  EXPECT_TRUE(cuda_test::outside_unchanged(out, sentinel));
}

TEST(SoftmaxCuda, RawTilesWithMixedTypes) {
  EFFATTN_REQUIRE_DEVICE();
  run_raw_case<float, __half, float>(2, 4, 2, 64, 300, 64, false);         // Lq (float workspace) over K, V
  run_raw_case<__half, float, __half>(2, 4, 4, 300, 64, 64, false);        // Q over Lk, W (float workspace)
  run_raw_case<__nv_bfloat16, float, __nv_bfloat16>(1, 2, 2, 129, 100, 128, true);
  run_raw_case<float, __nv_bfloat16, float>(1, 2, 1, 33, 257, 32, false);
  run_raw_case<float, float, __half>(1, 2, 2, 70, 90, 96, true);
  run_raw_case<__half, __half, float>(1, 2, 2, 100, 256, 256, false);
}

TEST(SoftmaxCuda, AllocatesNothing) {
  EFFATTN_REQUIRE_DEVICE();
  effattn::reset_allocation_peak();
  const size_t before = effattn::allocation_stats().peak;
  cuda_test::run_case<__half>({1, 2, 2, 100, 100, 64, false, false, Layout::bhsd});
  EXPECT_EQ(effattn::allocation_stats().peak, before);
}

}  // namespace
