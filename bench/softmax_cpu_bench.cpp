// CPU softmax attention against an Eigen float GEMM of similar size, in the same run.
// FLOPs are counted as FlashAttention does: 4 N^2 D per head (halved with causal).
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <effattn/effattn.hpp>
#include <random>
#include <vector>

namespace {

std::vector<float> random_vector(size_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

void BM_SoftmaxCpu(benchmark::State& st) {
  const int64_t BH = st.range(0), N = st.range(1), D = st.range(2);
  const bool causal = st.range(3) != 0;
  auto q = random_vector(BH * N * D, 1), k = random_vector(BH * N * D, 2), v = random_vector(BH * N * D, 3);
  std::vector<float> out(BH * N * D);
  for (auto _ : st) {
    effattn::attention<effattn::Cpu>(effattn::Softmax{0, causal}, effattn::bhsd<const float>(q.data(), 1, BH, N, D),
                                     effattn::bhsd<const float>(k.data(), 1, BH, N, D),
                                     effattn::bhsd<const float>(v.data(), 1, BH, N, D),
                                     effattn::bhsd(out.data(), 1, BH, N, D));
    benchmark::DoNotOptimize(out.data());
  }
  const double flops = 4.0 * BH * N * N * D * (causal ? 0.5 : 1.0);
  st.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_SoftmaxCpu)->Args({4, 4096, 64, 0})->Args({4, 4096, 64, 1})->Unit(benchmark::kMillisecond)->UseRealTime();

// Eigen SGEMM of similar size: the ceiling the attention kernel is measured against.
void BM_EigenGemm(benchmark::State& st) {
  const int64_t n = st.range(0);
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(n, n), b = Eigen::MatrixXf::Random(n, n), c(n, n);
  for (auto _ : st) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
  }
  st.counters["FLOP/s"] = benchmark::Counter(2.0 * n * n * n, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_EigenGemm)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
