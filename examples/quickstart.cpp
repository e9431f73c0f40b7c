// quickstart: the four attention operators of effattn on one problem, on the CPU. Makes Q, K, V,
// runs exact softmax attention, then Nyström, FAVOR+ and proxy-token attention, and prints how
// far each approximation is from the exact result, its time and its scratch memory.
//
// Build and run (from the repository root):
//   cmake -S . -B build && cmake --build build --target quickstart
//   ./build/examples/quickstart            # sequence length 2048
//   ./build/examples/quickstart 8192       # another length
// The same on a GPU: examples/quickstart_cuda.cu (built when CUDA is found).
#include "quickstart.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <effattn/effattn.hpp>

int main(int argc, char** argv) {
  const int64_t N = quickstart::parse_length(argc, argv, "quickstart");  // tokens per sequence
  if (N < 0) return 2;
  const int64_t B = 1, H = 4, D = 64;          // batch, heads, head dim
  const int64_t M = std::min<int64_t>(64, N);  // landmarks and proxies
  const int features = 256;                    // FAVOR+ random features

  // Inputs in the [batch, heads, seq, dim] layout; effattn::bshd views [B, S, H, D] memory.
  std::mt19937 gen(42);
  const std::vector<float> q = quickstart::structured(gen, H, N, D), k = quickstart::structured(gen, H, N, D),
                           v = quickstart::structured(gen, H, N, D);
  const auto Q = effattn::bhsd(q.data(), B, H, N, D);
  const auto K = effattn::bhsd(k.data(), B, H, N, D);
  const auto V = effattn::bhsd(v.data(), B, H, N, D);

  std::printf("B = %lld, H = %lld, N = %lld, D = %lld, float, %d CPU threads\n", (long long)B, (long long)H,
              (long long)N, (long long)D, effattn::cpu::thread_count({}));
  std::printf("%-34s %10s %9s %14s\n", "method", "rel. error", "ms", "workspace KiB");
  std::vector<float> exact;
  bool finite = true;
  const auto run = [&](const char* name, const auto& method) {
    std::vector<float> out(q.size());
    // Scratch the call needs; pass a buffer of this size in Exec<Cpu>{threads, ptr, size} to
    // keep the library from allocating. Without one it allocates (and frees) it itself.
    const size_t workspace = effattn::workspace_bytes<effattn::Cpu>(method, Q, K, V);
    const auto t0 = std::chrono::steady_clock::now();
    effattn::attention<effattn::Cpu>(method, Q, K, V, effattn::bhsd(out.data(), B, H, N, D));
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (exact.empty()) exact = out;
    const double error = quickstart::relative_error(out, exact);
    finite = finite && std::isfinite(error);
    std::printf("%-34s %10.3g %9.1f %14.1f\n", name, error, ms, double(workspace) / 1024.0);
  };

  // Exact: softmax(Q K^T / sqrt(D)) V, tiled so that the N x N matrix never exists.
  run("softmax (exact)", effattn::Softmax{});

  // Nyström: M segment-mean landmarks and a Newton-Schulz pseudo-inverse.
  effattn::Nystrom nystrom;
  nystrom.landmarks = int(M);
  run("nystrom, 64 landmarks", nystrom);

  // FAVOR+: positive random features; the projection [H, features, D] comes from a seed.
  const std::vector<float> projection = effattn::favor_projection(/*seed=*/7, int(H), features, int(D));
  effattn::Favor favor;
  favor.projection = effattn::bhsd(projection.data(), 1, H, features, D);
  run("favor+, 256 features", favor);

  // Proxy tokens [1, H, M, D]: trained parameters in Proxyformer; here sampled from Q and K.
  const std::vector<float> pq = quickstart::sample_tokens(q, H, N, D, M), pk = quickstart::sample_tokens(k, H, N, D, M);
  effattn::Proxy<float> proxy;
  proxy.proxy_q = effattn::bhsd(pq.data(), 1, H, M, D);
  proxy.proxy_k = effattn::bhsd(pk.data(), 1, H, M, D);
  run("proxy, 64 tokens sampled from Q/K", proxy);

  std::printf("rel. error = max |out - exact| / max |exact|; ms = one call, first touch of memory included.\n%s",
              quickstart::kFavorNote);
  return finite ? 0 : 1;
}
