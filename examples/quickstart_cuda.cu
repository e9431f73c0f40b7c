// quickstart_cuda: examples/quickstart.cpp on a CUDA GPU. The same inputs go to device memory:
// inputs A (structured Q, K, V) for exact softmax, Nyström and proxy-token attention, inputs B (Q
// and K scaled to the small norms FAVOR+ is meant for) for exact softmax again, FAVOR+ and
// Nyström; everything runs through effattn::attention<effattn::Cuda>, asynchronously on one
// stream. Each result's error is measured against exact softmax on the same inputs, and the exact
// result on inputs A against a direct float64 computation of a few rows on the host.
//
// Build and run (CUDA found at configure time; from the repository root):
//   cmake -S . -B build && cmake --build build --target quickstart_cuda
//   ./build/examples/quickstart_cuda [N]   # exits 77 with a message when there is no GPU
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <effattn/cuda.cuh>
#include <effattn/favor_projection.hpp>
#include <stdexcept>
#include <string>

#include "quickstart.hpp"

namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// A device copy of a host vector, freed at scope exit.
struct DeviceArray {
  float* p = nullptr;
  explicit DeviceArray(const std::vector<float>& host) {
    check(cudaMalloc(&p, host.size() * sizeof(float)), "cudaMalloc");
    check(cudaMemcpy(p, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  ~DeviceArray() { cudaFree(p); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

// Row i of head h of softmax(q k^T / sqrt(D)) v, directly in float64 (q, k, v: [H, N, D]).
double max_row_error(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                     const std::vector<float>& out, int64_t h, int64_t i, int64_t N, int64_t D) {
  std::vector<double> w(N);
  double max_logit = -INFINITY, sum = 0, err = 0;
  for (int64_t j = 0; j < N; ++j) {
    double dot = 0;
    for (int64_t c = 0; c < D; ++c) dot += double(q[(h * N + i) * D + c]) * k[(h * N + j) * D + c];
    max_logit = std::max(max_logit, w[j] = dot / std::sqrt(double(D)));
  }
  for (auto& x : w) sum += x = std::exp(x - max_logit);
  for (int64_t c = 0; c < D; ++c) {
    double o = 0;
    for (int64_t j = 0; j < N; ++j) o += w[j] / sum * v[(h * N + j) * D + c];
    err = std::max(err, std::fabs(o - out[(h * N + i) * D + c]));
  }
  return err;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t N = quickstart::parse_length(argc, argv, "quickstart_cuda");
  if (N < 0) return 2;
  int devices = 0;  // cudaGetDeviceCount leaves it unwritten when there is no driver
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("quickstart_cuda: no CUDA device (%s); nothing to run\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
    return 77;
  }
  try {
    const int64_t B = 1, H = 4, D = 64, M = std::min<int64_t>(64, N);
    std::mt19937 gen(42);  // the same data as quickstart.cpp
    const std::vector<float> q = quickstart::structured(gen, H, N, D), k = quickstart::structured(gen, H, N, D),
                             v = quickstart::structured(gen, H, N, D);
    const double factor_q = quickstart::favor_factor(q, D), factor_k = quickstart::favor_factor(k, D);
    const DeviceArray dq(q), dk(k), dv(v);
    const DeviceArray dq_small(quickstart::scaled(q, factor_q)), dk_small(quickstart::scaled(k, factor_k));
    const auto V = effattn::bhsd<const float>(dv.p, B, H, N, D);
    const DeviceArray dout(std::vector<float>(q.size()));

    cudaStream_t stream;
    check(cudaStreamCreate(&stream), "cudaStreamCreate");
    effattn::Exec<effattn::Cuda> exec;
    exec.stream = stream;  // no workspace given: the library takes it from cudaMallocAsync on this stream
    cudaDeviceProp prop;
    check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    std::printf("B = %lld, H = %lld, N = %lld, D = %lld, float, %s\n", (long long)B, (long long)H, (long long)N,
                (long long)D, prop.name);
    quickstart::print_inputs(quickstart::rms_row_norm(q, D), quickstart::rms_row_norm(k, D), factor_q, factor_k, D);
    quickstart::print_header();

    std::vector<float> exact_a, exact_b;
    bool ok = true;
    cudaEvent_t start, stop;
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
    // One call on inputs `set` ("A" or "B"); the first call on a set is exact softmax, its reference.
    const auto run = [&](const char* name, const char* set, const auto& method) {
      const bool a = set[0] == 'A';
      const auto Q = effattn::bhsd<const float>((a ? dq : dq_small).p, B, H, N, D);
      const auto K = effattn::bhsd<const float>((a ? dk : dk_small).p, B, H, N, D);
      std::vector<float>& exact = a ? exact_a : exact_b;
      const size_t workspace = effattn::workspace_bytes<effattn::Cuda>(method, Q, K, V, exec);
      check(cudaEventRecord(start, stream), "cudaEventRecord");
      effattn::attention<effattn::Cuda>(method, Q, K, V, effattn::bhsd(dout.p, B, H, N, D), {}, exec);
      check(cudaEventRecord(stop, stream), "cudaEventRecord");
      std::vector<float> out(q.size());
      check(cudaMemcpyAsync(out.data(), dout.p, out.size() * sizeof(float), cudaMemcpyDeviceToHost, stream),
            "copy out");
      check(cudaStreamSynchronize(stream), "attention");
      float ms = 0;
      check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
      if (exact.empty()) exact = out;
      const quickstart::Errors e = quickstart::errors(out, exact);
      ok = ok && std::isfinite(e.max_relative) && std::isfinite(e.frobenius);
      quickstart::print_row(name, set, e, ms, workspace);
    };

    run("softmax (exact)", "A", effattn::Softmax{});
    double row_error = 0;  // the exact result against float64 for the first, middle and last rows
    for (int64_t h = 0; h < H; ++h)
      for (const int64_t i : {int64_t(0), N / 2, N - 1})
        row_error = std::max(row_error, max_row_error(q, k, v, exact_a, h, i, N, D));
    std::printf("%-36s %6s %12.3g  (max abs. error, 12 rows)\n", "  softmax vs float64 on the host", "A", row_error);
    ok = ok && row_error < 1e-3;

    effattn::Nystrom nystrom;
    nystrom.landmarks = int(M);
    const std::string landmarks = std::to_string(M) + " landmarks";
    run(("nystrom, " + landmarks).c_str(), "A", nystrom);

    const DeviceArray pq(quickstart::sample_tokens(q, H, N, D, M)), pk(quickstart::sample_tokens(k, H, N, D, M));
    effattn::Proxy<float> proxy;
    proxy.proxy_q = effattn::bhsd<const float>(pq.p, 1, H, M, D);
    proxy.proxy_k = effattn::bhsd<const float>(pk.p, 1, H, M, D);
    run(("proxy, " + std::to_string(M) + " tokens sampled from Q/K").c_str(), "A", proxy);

    run("softmax (exact)", "B", effattn::Softmax{});
    for (const int features : {256, 1024}) {
      const DeviceArray projection(effattn::favor_projection(/*seed=*/7, int(H), features, int(D)));
      effattn::Favor favor;
      favor.projection = effattn::bhsd<const float>(projection.p, 1, H, features, D);
      run(features == 256 ? "favor+, 256 features" : "favor+, 1024 features", "B", favor);
    }
    run(("nystrom, " + landmarks + " (to compare)").c_str(), "B", nystrom);
    quickstart::print_row("mean of v (uniform weights, scale)", "B",
                          quickstart::errors(quickstart::mean_of_values(v, H, N, D), exact_b), -1, 0);

    std::printf("ms = one call (CUDA events).\n%s", quickstart::kNotes);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    cudaStreamDestroy(stream);
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quickstart_cuda: %s\n", e.what());
    return 3;
  }
}
