// CPU benches: every effattn CPU operator in float and double, the materialized "standard
// self-attention" baseline on Eigen (the papers' reference column), and an Eigen SGEMM as the
// FLOP-rate ceiling of the per-issue targets. Run with --help for the sweep flags.
//
// Memory per sequence = bytes of q, k, v, out of one sequence + the method's parameters (proxy
// tokens, random features) + the high-water mark of effattn's own allocations
// (effattn::allocation_stats) during a call on that one sequence without a caller workspace.
// The standard baseline allocates its H·N² score matrix through the same counter.
#include <Eigen/Core>
#include <cstdlib>
#include <effattn/effattn.hpp>
#include <memory>
#include <type_traits>
#include <vector>

#include "harness.hpp"

namespace {

using effattn::Tensor;

/// A method bound to its parameters: run it on (q, k, v, out) with a caller workspace (or
/// none: it allocates its own), and ask how much workspace it needs.
template <class T>
struct Runner {
  using Sizes = std::function<size_t(Tensor<const T>, Tensor<const T>, Tensor<const T>)>;
  std::function<void(Tensor<const T>, Tensor<const T>, Tensor<const T>, Tensor<T>, void*, size_t)> run;
  Sizes workspace;
  // attention_backward(q, k, v, out, dout) into dq, dk, dv (and the method's own parameter
  // gradients, held by the runner); empty where the method has none here.
  std::function<void(Tensor<const T>, Tensor<const T>, Tensor<const T>, Tensor<const T>, Tensor<const T>, Tensor<T>,
                     Tensor<T>, Tensor<T>, void*, size_t)>
      backward;
  Sizes backward_workspace;
  // The forward of a training step (attention_with_saved): it keeps what the backward would
  // recompute (softmax's row lse; Nyström's and Proxy's K3·V, Z with its iterates and K1's row
  // statistics) in a block the runner holds, which `backward` reads; `saved` is that block's size.
  std::function<void(Tensor<const T>, Tensor<const T>, Tensor<const T>, Tensor<T>, void*, size_t)> train_forward;
  Sizes saved;
  size_t parameter_bytes = 0;  // proxy tokens or random features, counted with the inputs
  std::shared_ptr<void> storage;
};

/// The caller-held block of a training step (effattn::Saved), grown when a call needs more.
struct SavedBlock {
  std::unique_ptr<void, void (*)(void*)> memory{nullptr, std::free};
  size_t capacity = 0;
  effattn::Saved saved;
  effattn::Saved fit(size_t bytes) {
    if (bytes > capacity) {
      memory.reset(std::aligned_alloc(64, effattn::detail::align_up(bytes)));
      if (!memory) throw std::bad_alloc();
      capacity = bytes;
    }
    saved = {bytes > 0 ? memory.get() : nullptr, bytes};
    return saved;
  }
};

/// Any effattn method through the public API. `grads` adds the method's parameter gradients to
/// the backward's Grads (the proxies' for Proxy).
template <class T, class Method>
Runner<T> library(Method m, std::shared_ptr<void> storage = nullptr, size_t parameter_bytes = 0,
                  std::function<void(effattn::Grads<T>&)> grads = nullptr) {
  Runner<T> r;
  const auto exec_of = [](void* ws, size_t ws_size) {
    effattn::Exec<effattn::Cpu> exec;
    exec.workspace = ws;
    exec.workspace_size = ws_size;
    return exec;
  };
  r.run = [m, exec_of](Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out, void* ws,
                       size_t ws_size) { effattn::attention<effattn::Cpu>(m, q, k, v, out, {}, exec_of(ws, ws_size)); };
  r.workspace = [m](Tensor<const T> q, Tensor<const T> k, Tensor<const T> v) {
    return effattn::workspace_bytes<effattn::Cpu>(m, q, k, v);
  };
  r.backward_workspace = [m](Tensor<const T> q, Tensor<const T> k, Tensor<const T> v) {
    return effattn::backward_workspace_bytes<effattn::Cpu>(m, q, k, v);
  };
  r.saved = [m](Tensor<const T> q, Tensor<const T> k, Tensor<const T> v) {
    return effattn::saved_bytes<effattn::Cpu>(m, q, k, v);
  };
  auto block = std::make_shared<SavedBlock>();
  r.train_forward = [m, exec_of, block](Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out,
                                        void* ws, size_t ws_size) {
    const effattn::Saved saved = block->fit(effattn::saved_bytes<effattn::Cpu>(m, q, k, v));
    effattn::attention_with_saved<effattn::Cpu>(m, q, k, v, out, saved, {}, exec_of(ws, ws_size));
  };
  r.backward = [m, exec_of, grads, block](Tensor<const T> q, Tensor<const T> k, Tensor<const T> v,
                                          Tensor<const T> out, Tensor<const T> dout, Tensor<T> dq, Tensor<T> dk,
                                          Tensor<T> dv, void* ws, size_t ws_size) {
    effattn::Grads<T> g{dq, dk, dv, {}, {}};
    if (grads) grads(g);
    effattn::attention_backward_with_saved<effattn::Cpu>(m, q, k, v, out, dout, block->saved, g, {},
                                                         exec_of(ws, ws_size));
  };
  r.storage = std::move(storage);
  r.parameter_bytes = parameter_bytes;
  return r;
}

// ---- The reference column: standard self-attention that materializes softmax(s Q Kᵀ) ----

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Map = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstMap = Eigen::Map<const RowMatrix<T>>;

/// Bytes of the score matrices of one sequence, [H, Nq, Nk]: what standard attention holds.
template <class T>
size_t standard_scores_bytes(Tensor<const T> q, Tensor<const T> k) {
  return effattn::detail::bytes_of<T>(static_cast<size_t>(q.shape[1] * q.shape[2] * k.shape[2]));
}

/// out = softmax(s Q Kᵀ) V per sequence, as the papers' baseline (and torch without a fused
/// kernel) computes it: all heads' N×N scores in memory, written by one GEMM, normalized in a
/// second pass and read back by a third. The passes run per (head, block of rows) on OpenMP
/// threads, each a single-threaded Eigen GEMM, so the baseline is as parallel as the operators.
/// Contiguous [B, H, N, D] views only; bench code, not library code.
template <class T>
void standard_attention(Tensor<const T> q, Tensor<const T> k, Tensor<const T> v, Tensor<T> out, void* ws,
                        size_t ws_size) {
  const int64_t B = q.shape[0], H = q.shape[1], Nq = q.shape[2], Nk = k.shape[2], D = q.shape[3], Dv = v.shape[3];
  constexpr int64_t kRows = 64;
  const int64_t blocks = (Nq + kRows - 1) / kRows;
  const T scale = T(1) / std::sqrt(T(D));
  effattn::detail::HostWorkspace workspace(ws, ws_size, standard_scores_bytes(q, k));
  T* scores = workspace.arena().template take<T>(static_cast<size_t>(H * Nq * Nk));
  for (int64_t b = 0; b < B; ++b) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < H * blocks; ++item) {
      const int64_t h = item / blocks, r0 = item % blocks * kRows, rows = std::min(kRows, Nq - r0);
      Map<T> s(scores + (h * Nq + r0) * Nk, rows, Nk);
      s.noalias() = scale * ConstMap<T>(&q(b, h, r0, 0), rows, D) * ConstMap<T>(&k(b, h, 0, 0), Nk, D).transpose();
      for (int64_t r = 0; r < rows; ++r) {
        auto row = s.row(r).array();
        row = (row - row.maxCoeff()).exp();
        row /= row.sum();
      }
      Map<T>(&out(b, h, r0, 0), rows, Dv).noalias() = s * ConstMap<T>(&v(b, h, 0, 0), Nk, Dv);
    }
  }
}

template <class T>
Runner<T> standard() {
  Runner<T> r;
  r.run = standard_attention<T>;
  r.workspace = [](Tensor<const T> q, Tensor<const T> k, Tensor<const T>) { return standard_scores_bytes(q, k); };
  return r;
}

/// Random tokens stored next to the runner, viewed as [1, H, M, D].
template <class T>
std::shared_ptr<std::vector<T>> random_tokens(int64_t count, uint64_t seed) {
  auto v = std::make_shared<std::vector<T>>(count);
  bench::fill_normal(v->size(), seed, [&](size_t i, float x) { (*v)[i] = static_cast<T>(x); });
  return v;
}

// ---- One policy per (operator, CPU, T): the operators this build has ----

template <class T>
Runner<T> make_runner(const bench::MethodSpec& m, int64_t H, int64_t D) {
  using bench::Family;
  switch (m.family) {
    case Family::standard:
      return standard<T>();
    case Family::softmax:
      return library<T>(effattn::Softmax{0, m.causal});
#if EFFATTN_BENCH_CPU_NYSTROM
    case Family::nystrom:
      return library<T>(effattn::Nystrom{m.size});
#endif
#if EFFATTN_BENCH_CPU_PROXY
    case Family::proxy: {
      auto tokens = random_tokens<T>(2 * H * m.size * D, 7);
      effattn::Proxy<T> p;
      p.proxy_q = effattn::bhsd<const T>(tokens->data(), 1, H, m.size, D);
      p.proxy_k = effattn::bhsd<const T>(tokens->data() + H * m.size * D, 1, H, m.size, D);
      auto dtokens = std::make_shared<std::vector<T>>(tokens->size());  // the proxies' gradients
      const int64_t M = m.size;
      return library<T>(p, tokens, tokens->size() * sizeof(T), [dtokens, H, M, D](effattn::Grads<T>& g) {
        g.dproxy_q = effattn::bhsd(dtokens->data(), 1, H, M, D);
        g.dproxy_k = effattn::bhsd(dtokens->data() + H * M * D, 1, H, M, D);
      });
    }
#endif
#if EFFATTN_BENCH_CPU_FAVOR && EFFATTN_BENCH_FAVOR_PROJECTION
    case Family::favor: {
      auto projection = std::make_shared<std::vector<float>>(effattn::favor_projection(11, static_cast<int>(H), m.size,
                                                                                       static_cast<int>(D)));
      effattn::Favor f;
      f.projection = effattn::bhsd<const float>(projection->data(), 1, H, m.size, D);
      f.causal = m.causal;
      return library<T>(f, projection, projection->size() * sizeof(float));
    }
#endif
    default:
      return {};
  }
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

template <class T>
std::function<void(benchmark::State&)> make_body(const bench::Case& c, const bench::Options& o) {
  const int64_t H = c.shape.heads, D = c.shape.dim, N = c.seq, B = c.batch;
  Runner<T> r = make_runner<T>(c.method, H, D);
  if (!r.run || (c.backward && !r.backward)) return {};
  const double scores_mb = H * static_cast<double>(N) * N * sizeof(T) / (1 << 20);
  const bool too_big = c.method.family == bench::Family::standard && scores_mb > o.max_scores_mb;
  return [c, r, B, H, N, D, too_big, scores_mb](benchmark::State& st) {
    if (too_big) {
      const std::string why = "standard attention's scores need " + std::to_string(static_cast<int64_t>(scores_mb)) +
                              " MB (over --max-scores-mb)";
      bench::skip_case(st, why);
      for (auto _ : st) {
      }
      return;
    }
    // An exception (a library Error, bad_alloc) fails the case, and the binary's exit status.
    try {
      std::vector<T> q(B * H * N * D), k(q.size()), v(q.size()), out(q.size());
      bench::fill_normal(q.size(), 1, [&](size_t i, float x) { q[i] = static_cast<T>(x); });
      bench::fill_normal(k.size(), 2, [&](size_t i, float x) { k[i] = static_cast<T>(x); });
      bench::fill_normal(v.size(), 3, [&](size_t i, float x) { v[i] = static_cast<T>(x); });
      // The backward's upstream gradient and its outputs (empty for a forward case).
      std::vector<T> dout(c.backward ? q.size() : 0), dq(dout.size()), dk(dout.size()), dv(dout.size());
      bench::fill_normal(dout.size(), 4, [&](size_t i, float x) { dout[i] = static_cast<T>(x); });
      const auto in = [&](const std::vector<T>& x, int64_t b) { return effattn::bhsd<const T>(x.data(), b, H, N, D); };
      const auto mut = [&](std::vector<T>& x, int64_t b) { return effattn::bhsd(x.data(), b, H, N, D); };
      // One call of the case on the first b sequences: forward, then (backward cases) backward.
      const auto call = [&](int64_t b, void* ws, size_t ws_size) {
        (c.backward && r.train_forward ? r.train_forward : r.run)(in(q, b), in(k, b), in(v, b), mut(out, b), ws, ws_size);
        if (c.backward)
          r.backward(in(q, b), in(k, b), in(v, b), in(out, b), in(dout, b), mut(dq, b), mut(dk, b), mut(dv, b), ws,
                     ws_size);
      };
      const auto workspace = [&](int64_t b) {
        const size_t f = r.workspace(in(q, b), in(k, b), in(v, b));
        return c.backward ? std::max(f, r.backward_workspace(in(q, b), in(k, b), in(v, b))) : f;
      };

      // Memory of one sequence: the library's own allocations while it runs on it.
      const size_t before = effattn::allocation_stats().current;
      effattn::reset_allocation_peak();
      call(1, nullptr, 0);
      const size_t scratch = effattn::allocation_stats().peak - before;
      const size_t ws_one = workspace(1);

      // Timed: the whole batch with a caller workspace, as a steady-state caller runs it.
      const size_t ws_size = workspace(B);
      std::unique_ptr<void, AlignedFree> ws(ws_size ? std::aligned_alloc(64, effattn::detail::align_up(ws_size)) : nullptr);
      call(B, ws.get(), ws_size);  // warm-up: first touch of ws and the outputs
      for (auto _ : st) {
        call(B, ws.get(), ws_size);
        benchmark::DoNotOptimize(out.data());
        benchmark::DoNotOptimize(dq.data());
        benchmark::ClobberMemory();
      }
      // Inputs and output of a sequence, and for the backward dout, dq, dk, dv and the forward's
      // saved block as well.
      const double io = bench::io_bytes_per_sequence(c, sizeof(T)) * (c.backward ? 2 : 1) +
                        (c.backward && r.saved ? static_cast<double>(r.saved(in(q, 1), in(k, 1), in(v, 1))) : 0.0);
      bench::set_counters(st, c, io + r.parameter_bytes * (c.backward ? 2 : 1) + scratch, static_cast<double>(ws_one));
    } catch (const std::exception& e) {
      bench::fail_case(st, e.what());
    }
  };
}

/// Eigen SGEMM n×n×n: the FLOP-rate ceiling the softmax target is a ratio to.
std::function<void(benchmark::State&)> gemm_body(int64_t n) {
  return [n](benchmark::State& st) {
    Eigen::MatrixXf a = Eigen::MatrixXf::Random(n, n), b = Eigen::MatrixXf::Random(n, n), c(n, n);
    for (auto _ : st) {
      c.noalias() = a * b;
      benchmark::DoNotOptimize(c.data());
      benchmark::ClobberMemory();
    }
    st.counters["TFLOP/s"] = benchmark::Counter(2e-12 * n * n * n, benchmark::Counter::kIsIterationInvariantRate);
  };
}

/// The baseline must compute attention: max |standard - softmax| / max |softmax| within the
/// type's CPU tolerance (DESIGN.md), on an odd size. Returns true when it does.
template <class T>
bool check_baseline(double tolerance) {
  const int64_t B = 2, H = 3, N = 333, D = 40;
  std::vector<T> q(B * H * N * D), k(q.size()), v(q.size()), a(q.size()), b(q.size());
  bench::fill_normal(q.size(), 1, [&](size_t i, float x) { q[i] = static_cast<T>(x); });
  bench::fill_normal(k.size(), 2, [&](size_t i, float x) { k[i] = static_cast<T>(x); });
  bench::fill_normal(v.size(), 3, [&](size_t i, float x) { v[i] = static_cast<T>(x); });
  const auto in = [&](const std::vector<T>& x) { return effattn::bhsd<const T>(x.data(), B, H, N, D); };
  standard<T>().run(in(q), in(k), in(v), effattn::bhsd(a.data(), B, H, N, D), nullptr, 0);
  effattn::attention<effattn::Cpu>(effattn::Softmax{}, in(q), in(k), in(v), effattn::bhsd(b.data(), B, H, N, D));
  double diff = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    ref = std::max(ref, std::abs(static_cast<double>(b[i])));
  }
  const bool ok = diff <= tolerance * ref;
  std::printf("standard baseline vs effattn softmax (%s): max|diff|/max|ref| = %.3g (tolerance %.0e): %s\n",
              sizeof(T) == 4 ? "float" : "double", diff / ref, tolerance, ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int run_bench(int argc, char** argv) {
  bench::Options o = bench::Options::parse(argc, argv);
  if (o.check) {
    const bool f = check_baseline<float>(1e-5), d = check_baseline<double>(1e-12);
    return f && d ? 0 : 1;
  }
  if (o.types.empty()) o.types = {"float"};
  if (o.device.empty()) o.device = "cpu";
  std::vector<bench::Case> cases;
  for (const auto& type : o.types) {
    if (type != "float" && type != "double") {
      std::fprintf(stderr, "the CPU backend computes in float or double, not '%s'\n", type.c_str());
      return 2;
    }
    auto more = bench::all_cases(o, "cpu", type);
    cases.insert(cases.end(), more.begin(), more.end());
  }
  bool gemm = false;
  for (const auto& s : o.suites) gemm = gemm || s == "targets";
  if (gemm) {
    bench::Case g{"targets", bench::MethodSpec::parse("softmax"), "cpu", "float", {"gemm", 1, 2048}, 2048, 1};
    g.method.name = "eigen-gemm";
    cases.push_back(g);
  }
  return bench::run_main(
      o, cases,
      [&](const bench::Case& c) -> std::function<void(benchmark::State&)> {
        if (c.method.name == "eigen-gemm") return gemm_body(c.seq);
        return c.type == "double" ? make_body<double>(c, o) : make_body<float>(c, o);
      },
      benchmark::kMillisecond, false);
}

int main(int argc, char** argv) { return bench::main_reporting_errors(run_bench, argc, argv); }
