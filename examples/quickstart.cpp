// quickstart: the four attention operators of effattn on the CPU, each on inputs of the kind it
// is meant for. Makes Q, K, V with structure (inputs A), runs exact softmax attention, then
// Nyström and proxy-token attention on them; then scales Q and K down to the small norms FAVOR+
// is meant for (inputs B) and runs exact softmax again, FAVOR+ and Nyström on those, with the
// plain mean of V (uniform attention) as a yardstick. Prints how far each result is from the
// exact one on the same inputs (two measures), its time and its scratch memory.
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
#include <string>
#include <effattn/effattn.hpp>

int main(int argc, char** argv) {
  const int64_t N = quickstart::parse_length(argc, argv, "quickstart");  // tokens per sequence
  if (N < 0) return 2;
  const int64_t B = 1, H = 4, D = 64;          // batch, heads, head dim
  const int64_t M = std::min<int64_t>(64, N);  // landmarks and proxies

  // Inputs A in the [batch, heads, seq, dim] layout; effattn::bshd views [B, S, H, D] memory.
  std::mt19937 gen(42);
  const std::vector<float> q = quickstart::structured(gen, H, N, D), k = quickstart::structured(gen, H, N, D),
                           v = quickstart::structured(gen, H, N, D);
  // Inputs B: q and k scaled so that |q'| = |q| / D^(1/4) ~ 1 (and |k'| ~ 1), v unchanged.
  const double factor_q = quickstart::favor_factor(q, D), factor_k = quickstart::favor_factor(k, D);
  const std::vector<float> q_small = quickstart::scaled(q, factor_q), k_small = quickstart::scaled(k, factor_k);
  const auto V = effattn::bhsd(v.data(), B, H, N, D);

  std::printf("B = %lld, H = %lld, N = %lld, D = %lld, float, %d CPU threads\n", (long long)B, (long long)H,
              (long long)N, (long long)D, effattn::cpu::thread_count({}));
  quickstart::print_inputs(quickstart::rms_row_norm(q, D), quickstart::rms_row_norm(k, D), factor_q, factor_k, D);
  quickstart::print_header();
  bool finite = true;
  // One call on inputs `set` ("A" or "B"); the first call on a set is exact softmax, its reference.
  std::vector<float> exact_a, exact_b;
  const auto run = [&](const char* name, const char* set, const auto& method) {
    const bool a = set[0] == 'A';
    const auto Q = effattn::bhsd((a ? q : q_small).data(), B, H, N, D);
    const auto K = effattn::bhsd((a ? k : k_small).data(), B, H, N, D);
    std::vector<float>& exact = a ? exact_a : exact_b;
    std::vector<float> out(q.size());
    // Scratch the call needs; pass a buffer of this size in Exec<Cpu>{threads, ptr, size} to
    // keep the library from allocating. Without one it allocates (and frees) it itself.
    const size_t workspace = effattn::workspace_bytes<effattn::Cpu>(method, Q, K, V);
    const auto t0 = std::chrono::steady_clock::now();
    effattn::attention<effattn::Cpu>(method, Q, K, V, effattn::bhsd(out.data(), B, H, N, D));
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (exact.empty()) exact = out;
    const quickstart::Errors e = quickstart::errors(out, exact);
    finite = finite && std::isfinite(e.max_relative) && std::isfinite(e.frobenius);
    quickstart::print_row(name, set, e, ms, workspace);
  };

  // Exact: softmax(Q K^T / sqrt(D)) V, tiled so that the N x N matrix never exists.
  run("softmax (exact)", "A", effattn::Softmax{});

  // Nyström: M segment-mean landmarks and a Newton-Schulz pseudo-inverse.
  effattn::Nystrom nystrom;
  nystrom.landmarks = int(M);
  const std::string landmarks = std::to_string(M) + " landmarks";
  run(("nystrom, " + landmarks).c_str(), "A", nystrom);

  // Proxy tokens [1, H, M, D]: trained parameters in Proxyformer; here sampled from Q and K.
  const std::vector<float> pq = quickstart::sample_tokens(q, H, N, D, M), pk = quickstart::sample_tokens(k, H, N, D, M);
  effattn::Proxy<float> proxy;
  proxy.proxy_q = effattn::bhsd(pq.data(), 1, H, M, D);
  proxy.proxy_k = effattn::bhsd(pk.data(), 1, H, M, D);
  run(("proxy, " + std::to_string(M) + " tokens sampled from Q/K").c_str(), "A", proxy);

  // Inputs B: exact softmax again (their reference), then FAVOR+ with positive random features;
  // the projection [H, features, D] comes from a seed. Nyström on the same inputs, to compare.
  run("softmax (exact)", "B", effattn::Softmax{});
  for (const int features : {256, 1024}) {
    const std::vector<float> projection = effattn::favor_projection(/*seed=*/7, int(H), features, int(D));
    effattn::Favor favor;
    favor.projection = effattn::bhsd(projection.data(), 1, H, features, D);
    run(features == 256 ? "favor+, 256 features" : "favor+, 1024 features", "B", favor);
  }
  run(("nystrom, " + landmarks + " (to compare)").c_str(), "B", nystrom);
  // No attention at all, for scale: the mean of v in every row.
  quickstart::print_row("mean of v (uniform weights, scale)", "B",
                        quickstart::errors(quickstart::mean_of_values(v, H, N, D), exact_b), -1, 0);

  std::printf("ms = one call, first touch of memory included.\n%s", quickstart::kNotes);
  return finite ? 0 : 1;
}
