// What every bench binary shares, whatever the backend: the command-line sweep, the shapes, the
// method names, FLOP counts, benchmark names and counters. No Eigen and no CUDA here, so that
// the .cpp (CPU) and .cu (CUDA) binaries describe a case identically and render.py reads both.
#pragma once
#include <benchmark/benchmark.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace bench {

/// A model shape: heads and head dim per sequence. The approximate methods take their size
/// (landmarks, proxies, features) from the method name, e.g. nystrom-128, favor-256.
struct Shape {
  std::string name;
  int64_t heads, dim;
};

/// lra: the LRA / Nyströmformer / Proxyformer attention (2 heads, head dim 32);
/// fa64, fa128: FlashAttention's benchmark shapes (hidden size H·D = 2048).
/// targets: B·H = 4, D = 64, the shape of the per-issue speed targets.
inline const std::vector<Shape>& known_shapes() {
  static const std::vector<Shape> shapes{{"lra", 2, 32}, {"fa64", 32, 64}, {"fa128", 16, 128}, {"targets", 4, 64}};
  return shapes;
}

enum class Family { standard, softmax, nystrom, proxy, favor };

/// One method as named on the command line and in the tables: "standard" (materialized N×N
/// baseline), "softmax", "nystrom-M", "proxy-M", "favor-M"; a "-causal" suffix where it applies.
struct MethodSpec {
  Family family = Family::softmax;
  int size = 0;  // landmarks, proxy tokens or random features; 0 for standard and softmax
  bool causal = false;
  std::string name;

  static MethodSpec parse(const std::string& text) {
    MethodSpec m;
    m.name = text;
    std::string s = text;
    const std::string causal_suffix = "-causal";
    if (s.size() > causal_suffix.size() && s.compare(s.size() - causal_suffix.size(), causal_suffix.size(), causal_suffix) == 0) {
      m.causal = true;
      s.resize(s.size() - causal_suffix.size());
    }
    const auto dash = s.find('-');
    const std::string family = s.substr(0, dash);
    if (dash != std::string::npos) m.size = std::atoi(s.c_str() + dash + 1);
    const bool sized = family == "nystrom" || family == "proxy" || family == "favor";
    if (family == "standard") m.family = Family::standard;
    else if (family == "softmax") m.family = Family::softmax;
    else if (family == "nystrom") m.family = Family::nystrom;
    else if (family == "proxy") m.family = Family::proxy;
    else if (family == "favor") m.family = Family::favor;
    else throw std::invalid_argument("unknown method '" + text + "' (standard, softmax, nystrom-M, proxy-M, favor-M, -causal)");
    if (sized != (m.size > 0) || (dash != std::string::npos && !sized))
      throw std::invalid_argument("method '" + text + "': nystrom/proxy/favor need a size (e.g. nystrom-128), the others none");
    if (m.causal && (m.family == Family::nystrom || m.family == Family::proxy || m.family == Family::standard))
      throw std::invalid_argument("method '" + text + "': causal applies to softmax and favor only");
    return m;
  }
};

/// One benchmark: a method on a backend and element type, at one shape and sequence length,
/// over a batch of B sequences.
struct Case {
  std::string suite;  // "table" (the papers' tables) or "targets" (per-issue speed targets)
  MethodSpec method;
  std::string backend, type;
  Shape shape;
  int64_t seq = 0, batch = 1;
  bool backward = false;  // time one forward and one backward (attention_backward) per call

  /// Matrix-product FLOPs of one call, counted as FlashAttention does (only the matrix
  /// products, causal softmax halved; a backward is 2.5 forwards, so forward + backward is 3.5);
  /// the approximations count their own products, with the same 3.5 for forward + backward.
  double flops() const { return forward_flops() * (backward ? 3.5 : 1.0); }

  double forward_flops() const {
    const double B = batch, H = shape.heads, N = seq, D = shape.dim, M = method.size;
    switch (method.family) {
      case Family::standard:
      case Family::softmax:
        return 4.0 * B * H * N * N * D * (method.causal ? 0.5 : 1.0);
      case Family::nystrom:
      case Family::proxy: {
        if (N <= M) return 4.0 * B * H * N * N * D;  // exact softmax then
        const double iterations = 6;
        // Per (b, h): Q·Lkᵀ, Lq·Kᵀ, K3·V, K1·W (2NMD each), Z·(K3·V) (2M²D);
        // K2 and its inverse (2M²D + 8M³ per Newton–Schulz step) once per (b, h) for Nyström,
        // once per head for Proxy (proxies shared by the batch).
        const double per_sequence = 8.0 * N * M * D + 2.0 * M * M * D;
        const double inverse = 2.0 * M * M * D + iterations * 8.0 * M * M * M;
        return B * H * per_sequence + (method.family == Family::nystrom ? B : 1.0) * H * inverse;
      }
      case Family::favor:  // features of q and k, S = φ(K)ᵀV, φ(Q)·S (2NMD each)
        return 8.0 * B * H * N * M * D;
    }
    return 0;
  }

  std::string name() const {
    std::ostringstream s;
    s << "suite:" << suite << "/method:" << method.name << "/backend:" << backend << "/type:" << type
      << "/shape:" << shape.name << "/N:" << seq << "/B:" << batch << (backward ? "/pass:backward" : "");
    return s.str();
  }
};

/// The sweep, from this binary's own flags; the rest of argv goes to Google Benchmark.
struct Options {
  std::vector<std::string> suites{"table"};
  std::vector<std::string> shapes{"lra"};
  std::vector<int64_t> seqs{512, 1024, 2048, 4096, 8192};
  std::vector<std::string> methods{"standard", "softmax", "nystrom-128", "proxy-128", "favor-256"};
  std::vector<std::string> types;            // empty: the backend's default (float)
  std::vector<std::string> passes{"forward"};  // forward, backward (forward + backward per call)
  int64_t tokens = 16384;                    // batch B = max(1, tokens / N), as FlashAttention's bench
  double max_scores_mb = 4096;               // standard attention: skip when its H·N² scores exceed this
  std::string device;                        // a name for the table header; empty: the backend decides
  std::string commit;
  bool check = false;                        // compare the standard baseline with effattn's softmax, then exit
  std::vector<char*> benchmark_argv;

  static std::vector<std::string> split(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream in(s);
    for (std::string item; std::getline(in, item, ',');)
      if (!item.empty()) out.push_back(item);
    return out;
  }

  static void usage(const char* prog) {
    std::printf(
        "usage: %s [options] [--benchmark_* flags]\n"
        "  --suite=table,targets     table: the papers' tables; targets: the per-issue speed targets\n"
        "  --shapes=lra,fa64,fa128   lra: 2 heads, D=32; fa64: 32 heads, D=64; fa128: 16 heads, D=128\n"
        "  --seq=512,...,65536       sequence lengths of the table suite\n"
        "  --methods=standard,softmax,nystrom-128,proxy-128,favor-256[,softmax-causal,favor-256-causal]\n"
        "  --types=float[,double|half|bf16]   element types (default float)\n"
        "  --pass=forward[,backward] backward: one forward and one attention_backward per call (table suite)\n"
        "  --tokens=16384            tokens per call: batch B = max(1, tokens / N)\n"
        "  --max-scores-mb=4096      skip standard attention when its H·N² score matrix exceeds this\n"
        "  --device=NAME --commit=HASH   recorded in the JSON context for the rendered table\n"
        "  --check                   check the standard baseline against effattn's softmax and exit\n",
        prog);
  }

  static Options parse(int argc, char** argv) {
    Options o;
    o.benchmark_argv.push_back(argv[0]);
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      const auto eq = a.find('=');
      const std::string key = a.substr(0, eq), value = eq == std::string::npos ? "" : a.substr(eq + 1);
      if (key == "--suite") o.suites = split(value);
      else if (key == "--shapes") o.shapes = split(value);
      else if (key == "--seq") {
        o.seqs.clear();
        for (const auto& s : split(value)) o.seqs.push_back(std::stoll(s));
      } else if (key == "--methods") o.methods = split(value);
      else if (key == "--types") o.types = split(value);
      else if (key == "--pass") {
        o.passes = split(value);
        for (const auto& p : o.passes)
          if (p != "forward" && p != "backward") throw std::invalid_argument("--pass takes forward, backward, not '" + p + "'");
      }
      else if (key == "--tokens") o.tokens = std::stoll(value);
      else if (key == "--max-scores-mb") o.max_scores_mb = std::stod(value);
      else if (key == "--device") o.device = value;
      else if (key == "--commit") o.commit = value;
      else if (key == "--check") o.check = true;
      else if (key == "--help" || key == "-h") {
        usage(argv[0]);
        std::exit(0);
      } else o.benchmark_argv.push_back(argv[i]);
    }
    return o;
  }

  static const Shape& shape(const std::string& name) {
    for (const auto& s : known_shapes())
      if (s.name == name) return s;
    throw std::invalid_argument("unknown shape '" + name + "' (lra, fa64, fa128, targets)");
  }
};

/// The per-issue targets: fixed cases, B = 1 and H = 4 (B·H = 4), D = 64. render.py pairs them
/// up (the ratios and goals live there, next to the table).
inline std::vector<Case> target_cases(const std::string& backend, const std::string& type) {
  std::vector<Case> cases;
  const Shape& s = Options::shape("targets");
  const auto add = [&](const char* method, int64_t n) {
    cases.push_back(Case{"targets", MethodSpec::parse(method), backend, type, s, n, 1});
  };
  add("softmax", 4096);  // vs an Eigen GEMM of the same FLOPs (2048³)
  add("softmax-causal", 4096);
  add("softmax", 16384);
  add("nystrom-64", 16384);
  add("favor-256", 16384);
  add("favor-256-causal", 16384);
  return cases;
}

/// The table sweep: every shape × method × N of the options for one backend and type.
inline std::vector<Case> table_cases(const Options& o, const std::string& backend, const std::string& type) {
  std::vector<Case> cases;
  for (const auto& shape_name : o.shapes)
    for (const auto& method : o.methods)
      for (int64_t n : o.seqs)
        for (const auto& pass : o.passes)
          cases.push_back(Case{"table", MethodSpec::parse(method), backend, type, Options::shape(shape_name), n,
                               std::max<int64_t>(1, o.tokens / n), pass == "backward"});
  return cases;
}

inline std::vector<Case> all_cases(const Options& o, const std::string& backend, const std::string& type) {
  std::vector<Case> cases;
  for (const auto& suite : o.suites) {
    auto more = suite == "table" ? table_cases(o, backend, type)
                : suite == "targets" ? target_cases(backend, type)
                                     : throw std::invalid_argument("unknown suite '" + suite + "' (table, targets)");
    cases.insert(cases.end(), more.begin(), more.end());
  }
  return cases;
}

/// Bytes of q, k, v and out of one sequence (Dv = D).
inline double io_bytes_per_sequence(const Case& c, size_t element_size) {
  return 4.0 * c.shape.heads * c.seq * c.shape.dim * element_size;
}

/// The counters render.py reads. mem_per_seq: bytes one sequence needs (inputs, output,
/// parameters and the operator's measured scratch); workspace: what workspace_bytes reports.
inline void set_counters(benchmark::State& st, const Case& c, double mem_per_seq, double workspace) {
  using benchmark::Counter;
  st.counters["seq/s"] = Counter(static_cast<double>(c.batch), Counter::kIsIterationInvariantRate);
  st.counters["tok/s"] = Counter(static_cast<double>(c.batch * c.seq), Counter::kIsIterationInvariantRate);
  st.counters["TFLOP/s"] = Counter(c.flops() * 1e-12, Counter::kIsIterationInvariantRate);
  st.counters["mem/seq"] = Counter(mem_per_seq);
  st.counters["workspace/seq"] = Counter(workspace);
  st.counters["B"] = Counter(static_cast<double>(c.batch));
  st.counters["H"] = Counter(static_cast<double>(c.shape.heads));
  st.counters["D"] = Counter(static_cast<double>(c.shape.dim));
}

/// Fills n values with a cheap deterministic generator (xorshift64), uniform with unit variance.
template <class Store>
void fill_uniform(size_t n, uint64_t seed, Store store) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    store(i, static_cast<float>((static_cast<double>(x >> 11) * 0x1.0p-53 * 2.0 - 1.0) * 1.7320508));
  }
}

/// Fills n values from N(0, 1), as torch.randn draws the peers' inputs (bench/peers/run_peers.py):
/// xorshift64 and Box–Muller, deterministic per seed, about 10 ns a value.
template <class Store>
void fill_normal(size_t n, uint64_t seed, Store store) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  const auto next = [&x] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return (static_cast<double>(x >> 11) + 0.5) * 0x1.0p-53;  // in (0, 1)
  };
  for (size_t i = 0; i < n; i += 2) {
    const double r = std::sqrt(-2.0 * std::log(next())), t = 6.283185307179586 * next();
    store(i, static_cast<float>(r * std::cos(t)));
    if (i + 1 < n) store(i + 1, static_cast<float>(r * std::sin(t)));
  }
}

/// Cases that failed while running (an exception from the library or the runtime): run_main's
/// exit status says so, so that a sweep with an "ERROR OCCURRED" row cannot pass for a good one.
inline std::atomic<int>& failed_cases() {
  static std::atomic<int> n{0};
  return n;
}
/// Marks the running case failed with `why` (Google Benchmark prints it as ERROR OCCURRED).
inline void fail_case(benchmark::State& st, const std::string& why) {
  ++failed_cases();
  st.SkipWithError(why.c_str());
}
/// Skips a case that cannot run here by design (e.g. over --max-scores-mb): printed the same
/// way, but not a failure.
inline void skip_case(benchmark::State& st, const std::string& why) { st.SkipWithError(why.c_str()); }

/// A bench's main: a bad flag or method name (std::invalid_argument from Options or MethodSpec)
/// or any other escaping exception is one line on stderr and exit status 2, not an abort.
inline int main_reporting_errors(int (*run)(int, char**), int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}

/// Registers one Google Benchmark per case for which make(case) gives a body (an empty
/// std::function: the operator is not in this build), then runs them.
inline int run_main(const Options& o, const std::vector<Case>& cases,
                    const std::function<std::function<void(benchmark::State&)>(const Case&)>& make,
                    benchmark::TimeUnit unit, bool manual_time) {
  int registered = 0;
  std::vector<std::string> missing;
  for (const auto& c : cases) {
    auto body = make(c);
    if (!body) {
      const std::string what = c.method.name + (c.backward ? " backward" : "") + " (" + c.backend + ", " + c.type + ")";
      bool seen = false;
      for (const auto& m : missing) seen = seen || m == what;
      if (!seen) missing.push_back(what);
      continue;
    }
    auto* b = benchmark::RegisterBenchmark(c.name().c_str(), [body](benchmark::State& st) { body(st); });
    b->Unit(unit);
    if (manual_time) b->UseManualTime();
    else b->UseRealTime();
    ++registered;
  }
  for (const auto& m : missing) std::fprintf(stderr, "note: %s is not in this build; skipped\n", m.c_str());
  benchmark::AddCustomContext("effattn_device", o.device);
  benchmark::AddCustomContext("effattn_commit", o.commit);
  int argc = static_cast<int>(o.benchmark_argv.size());
  std::vector<char*> argv = o.benchmark_argv;
  benchmark::Initialize(&argc, argv.data());
  if (benchmark::ReportUnrecognizedArguments(argc, argv.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (failed_cases() > 0) {
    std::fprintf(stderr, "error: %d case run(s) failed (ERROR OCCURRED above)\n", failed_cases().load());
    return 3;
  }
  return registered > 0 ? 0 : 1;
}

}  // namespace bench
