// CUDA softmax attention against the float64 reference, for one element type per test file
// (EFFATTN_SOFTMAX_CUDA_TESTS(Suite, T)): every dispatched head dim, odd sizes, layouts, masks
// with fully masked rows, leading key tiles fully masked, causal (bottom-right aligned), grouped
// heads, B*H beyond the grid's y limit, q/out and q/k/v offsets beyond 2^31. Tolerance:
// DESIGN.md's CUDA rule against the naive math in T.
#pragma once
#include <effattn/cuda.cuh>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"
#include "reference/softmax.hpp"

namespace cuda_test {

using effattn::Masks;
using effattn::Tensor;

/// The naive computation done in T, as a framework does it: logits q.k accumulated in float and
/// rounded to T, times the scale rounded to T, softmax in float rounded to T, P.V accumulated in
/// float and rounded to T. For float this is plain naive float attention.
template <class T>
HostTensor<T> naive_softmax(const Tensor<const T>& q, const Tensor<const T>& k, const Tensor<const T>& v,
                            const Masks& masks, float scale, bool causal) {
  using effattn::cuda::from_float;
  using effattn::cuda::to_float;
  const int64_t B = q.shape[0], H = q.shape[1], Hk = k.shape[1], Nq = q.shape[2], Nk = k.shape[2];
  const int64_t D = q.shape[3], Dv = v.shape[3];
  const float s = static_cast<float>(ref::default_scale(scale, D));
  const auto round = [](float x) { return to_float(from_float<T>(x)); };
  HostTensor<T> out(B, H, Nq, Dv);
  std::vector<float> w(static_cast<size_t>(Nk));
  std::vector<uint8_t> allowed(static_cast<size_t>(Nk));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      for (int64_t i = 0; i < Nq; ++i) {
        float mx = -INFINITY;
        bool any = false;
        for (int64_t j = 0; j < Nk; ++j) {
          allowed[j] = ref::valid(masks.key_valid, masks.key_batch_stride, b, j) && (!causal || j <= i + (Nk - Nq));
          if (!allowed[j]) continue;
          float dot = 0;
          for (int64_t c = 0; c < D; ++c) dot += to_float(q(b, h, i, c)) * to_float(k(b, hk, j, c));
          w[j] = round(round(dot) * s);
          mx = std::max(mx, w[j]);
          any = true;
        }
        const bool live = any && ref::valid(masks.query_valid, masks.query_batch_stride, b, i);
        float sum = 0;
        for (int64_t j = 0; j < Nk; ++j)
          if (allowed[j]) sum += w[j] = std::exp(w[j] - mx);
        for (int64_t j = 0; j < Nk; ++j) w[j] = allowed[j] ? round(w[j] / sum) : 0.0f;
        for (int64_t c = 0; c < Dv; ++c) {
          float o = 0;
          for (int64_t j = 0; j < Nk; ++j)
            if (allowed[j]) o += w[j] * to_float(v(b, hk, j, c));
          out.view(b, h, i, c) = from_float<T>(live ? o : 0.0f);
        }
      }
    }
  return out;
}

struct Case {
  int64_t B, H, Hk, Nq, Nk, D;
  bool causal;
  bool masks;
  Layout layout;
  float scale = 0;
};

inline std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Nq=" + std::to_string(c.Nq) + " Nk=" + std::to_string(c.Nk) + " D=" + std::to_string(c.D) +
         (c.causal ? " causal" : "") + (c.masks ? " masks" : "") + " " + testing_util::layout_name(c.layout) +
         " scale=" + std::to_string(c.scale);
}

/// Runs one case and checks it against the float64 reference.
template <class T>
void run_case(const Case& c, const RunOptions& options = {}) {
  SCOPED_TRACE(describe(c) + " " + type_name<T>());
  EFFATTN_TRACE_SEED();
  DeviceProblem<T> p(c.B, c.H, c.Hk, c.Nq, c.Nk, c.D, c.layout, c.masks, options);
  p.run(effattn::Softmax{c.scale, c.causal});
  if (!p.ran) return;
  const ref::Result r = ref::softmax(p.q.cview(), p.k.cview(), p.v.cview(), p.host_masks, c.scale, c.causal);
  const HostTensor<T> naive = naive_softmax(p.q.cview(), p.k.cview(), p.v.cview(), p.host_masks, c.scale, c.causal);
  const double naive_error = testing_util::relative_error(naive.view, r);
  const double error = testing_util::relative_error(p.out.view, r);
  EXPECT_LE(error, tolerance<T>(naive_error)) << "naive " << type_name<T>() << " error " << naive_error;
  EXPECT_TRUE(outside_unchanged(p.out, p.sentinel)) << "wrote outside the out view";
}

template <class T>
__global__ void repeat_block(T* dst, const T* src, int64_t block, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = src[i % block];
}

/// q and out with more than 2^31 elements (every batch a copy of one block, k/v shared through
/// batch stride 0): the last batch, beyond 32-bit offsets, must equal the first bit for bit,
/// and the first must match the reference.
template <class T>
void run_beyond_32bit_offsets() {
  const int64_t N = 256, D = 64, per_batch = N * D;
  const int64_t B = (int64_t(1) << 31) / per_batch + 1, total = B * per_batch;
  size_t free_bytes = 0, total_bytes = 0;
  EFFATTN_TEST_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < 2 * total * sizeof(T) + (size_t(1) << 30))
    GTEST_SKIP() << "needs " << 2 * total * sizeof(T) << " bytes of device memory, " << free_bytes << " free";
  EFFATTN_TRACE_SEED();
  HostTensor<T> q(1, 1, N, D), k(1, 1, N, D), v(1, 1, N, D);
  q.fill_normal(1.5);
  k.fill_normal(1.5);
  v.fill_normal();
  DeviceTensor<T> q0(q), dk(k), dv(v);
  DeviceBuffer<T> big_q(static_cast<size_t>(total)), big_out(static_cast<size_t>(total));
  ASSERT_TRUE(big_q.ok() && big_out.ok()) << "cudaMalloc of " << total << " elements failed";
  repeat_block<T><<<4096, 256>>>(big_q.data, q0.buf.data, per_batch, total);
  EFFATTN_TEST_CUDA(cudaGetLastError());
  EFFATTN_TEST_CUDA(cudaMemset(big_out.data, 0xFF, total * sizeof(T)));  // NaN in every 16/32-bit type
  const Tensor<const T> bq(big_q.data, {B, 1, N, D}, {per_batch, per_batch, D, 1});
  const Tensor<const T> bk(dk.buf.data, {B, 1, N, D}, {0, per_batch, D, 1});
  const Tensor<const T> bv(dv.buf.data, {B, 1, N, D}, {0, per_batch, D, 1});
  const Tensor<T> bout(big_out.data, {B, 1, N, D}, {per_batch, per_batch, D, 1});
  effattn::attention<effattn::Cuda>(effattn::Softmax{0, true}, bq, bk, bv, bout);
  EFFATTN_TEST_CUDA(cudaDeviceSynchronize());

  HostTensor<T> first(1, 1, N, D), last(1, 1, N, D);
  EFFATTN_TEST_CUDA(cudaMemcpy(first.storage.data(), big_out.data, per_batch * sizeof(T), cudaMemcpyDeviceToHost));
  EFFATTN_TEST_CUDA(cudaMemcpy(last.storage.data(), big_out.data + (total - per_batch), per_batch * sizeof(T),
                               cudaMemcpyDeviceToHost));
  const ref::Result r = ref::softmax(q.cview(), k.cview(), v.cview(), {}, 0, true);
  const double naive_error =
      testing_util::relative_error(naive_softmax(q.cview(), k.cview(), v.cview(), {}, 0, true).view, r);
  EXPECT_LE(testing_util::relative_error(first.view, r), tolerance<T>(naive_error));
  size_t differ = 0;
  for (int64_t i = 0; i < per_batch; ++i) differ += !same_bits(first.storage[i], last.storage[i]);
  EXPECT_EQ(differ, 0u) << "batch " << B - 1 << " (offset " << total - per_batch << ") differs from batch 0";
}

}  // namespace cuda_test

// All value tests for element type T, as TESTs of suite `Suite`. FirstAllowedKeyInALaterTile masks
// keys [0, n) for n = one 64-key tile (two float tiles at D <= 128), several tiles, and all but
// the last key; with causal and Nq < Nk most rows then see no key, and causal with Nq > Nk leaves
// rows i < Nq - Nk without one (their query tiles run no key tile at all).
// KeyValueOffsetsBeyond32Bits puts q, k and v at offsets past 2^31 (DeviceInputs' far placement),
// without masks, which would empty batch 1, the batch past the 32-bit batch stride.
#define EFFATTN_SOFTMAX_CUDA_TESTS(Suite, T)                                                            \
  using cuda_test::Case;                                                                                \
  using testing_util::Layout;                                                                           \
  TEST(Suite, OddSizes) {                                                                               \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    for (int64_t n : {1, 7, 63, 64, 65, 257, 1000})                                                     \
      for (int64_t d : {32, 64}) cuda_test::run_case<T>({2, 2, 2, n, n, d, false, false, Layout::bhsd}); \
  }                                                                                                     \
  TEST(Suite, EveryHeadDim) {                                                                           \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    for (int64_t d : {32, 64, 96, 128, 256})                                                            \
      for (bool causal : {false, true})                                                                 \
        cuda_test::run_case<T>({1, 2, 1, 300, 300, d, causal, causal, Layout::bhsd});                   \
  }                                                                                                     \
  TEST(Suite, Layouts) {                                                                                \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    for (Layout l : {Layout::bhsd, Layout::bshd, Layout::padded})                                       \
      for (bool causal : {false, true}) cuda_test::run_case<T>({2, 4, 2, 333, 333, 64, causal, true, l}); \
    cuda_test::run_case<T>({1, 2, 2, 77, 130, 128, true, true, Layout::padded});                        \
    cuda_test::run_case<T>({1, 2, 1, 77, 130, 256, false, true, Layout::padded});                       \
  }                                                                                                     \
  TEST(Suite, CausalBottomRightAligned) {                                                               \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    for (auto [nq, nk] : {std::pair<int64_t, int64_t>{1, 1}, {1, 500}, {100, 700}, {700, 100}, {513, 513}, \
                          {64, 320}, {129, 63}})                                                        \
      cuda_test::run_case<T>({2, 2, 1, nq, nk, 64, true, false, Layout::bhsd});                         \
  }                                                                                                     \
  TEST(Suite, MasksWithFullyMaskedRows) {                                                               \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    for (bool causal : {false, true})                                                                   \
      for (int64_t d : {32, 128}) cuda_test::run_case<T>({3, 2, 2, 400, 600, d, causal, true, Layout::bshd}); \
  }                                                                                                     \
  TEST(Suite, GroupedAndMultiQueryHeads) {                                                              \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    cuda_test::run_case<T>({2, 8, 2, 200, 200, 64, false, true, Layout::bhsd});                         \
    cuda_test::run_case<T>({1, 6, 1, 150, 90, 96, true, false, Layout::bshd});                          \
  }                                                                                                     \
  TEST(Suite, ExplicitScale) {                                                                          \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    cuda_test::run_case<T>({1, 2, 2, 300, 300, 64, false, false, Layout::bhsd, 0.9f});                  \
    cuda_test::run_case<T>({1, 2, 2, 300, 300, 64, true, true, Layout::bhsd, -0.3f});                   \
  }                                                                                                     \
  TEST(Suite, ManyHeadsBeyondGridYLimit) {                                                              \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    cuda_test::run_case<T>({2, 40000, 8, 3, 5, 32, true, true, Layout::bshd});                          \
    cuda_test::run_case<T>({4, 1024, 1024, 70, 33, 32, false, false, Layout::bhsd});                    \
  }                                                                                                     \
  TEST(Suite, NonDefaultStream) {                                                                       \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    cudaStream_t stream = nullptr;                                                                      \
    EFFATTN_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));                       \
    cuda_test::run_case<T>({2, 3, 3, 190, 260, 64, true, true, Layout::bhsd}, cuda_test::on_stream(stream)); \
    EFFATTN_TEST_CUDA(cudaStreamDestroy(stream));                                                       \
  }                                                                                                     \
  TEST(Suite, FirstAllowedKeyInALaterTile) {                                                            \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    const cuda_test::RunOptions prefix = cuda_test::with_masked_key_prefix({64, 200, 511});             \
    for (int64_t d : {64, 128, 256})                                                                    \
      for (bool causal : {false, true})                                                                 \
        cuda_test::run_case<T>({3, 2, 1, 300, 512, d, causal, false, Layout::bhsd}, prefix);            \
    cuda_test::run_case<T>({2, 2, 2, 400, 150, 64, true, false, Layout::bhsd},                          \
                           cuda_test::with_masked_key_prefix({64, 100}));                               \
    cuda_test::run_case<T>({2, 2, 2, 400, 150, 128, true, true, Layout::bshd});                         \
  }                                                                                                     \
  TEST(Suite, OffsetsBeyond32Bits) {                                                                    \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    cuda_test::run_beyond_32bit_offsets<T>();                                                           \
  }                                                                                                     \
  TEST(Suite, KeyValueOffsetsBeyond32Bits) {                                                            \
    EFFATTN_REQUIRE_DEVICE();                                                                           \
    for (bool causal : {false, true})                                                                   \
      cuda_test::run_case<T>({2, 2, 1, 300, 300, 64, causal, false, Layout::bhsd}, cuda_test::with_far_offsets()); \
  }
