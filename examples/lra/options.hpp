// Command line of lra_encoder and lra_encoder_cuda, and the benchmark loop both share: free of
// Eigen and of CUDA so that the .cu program includes it as well.
#pragma once
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace lra {

enum class Attention { softmax, nystrom, favor, proxy };

inline const char* attention_name(Attention a) {
  switch (a) {
    case Attention::softmax:
      return "softmax";
    case Attention::nystrom:
      return "nystrom";
    case Attention::favor:
      return "favor";
    case Attention::proxy:
      return "proxy";
  }
  return "?";
}

/// What the user got wrong on the command line; main prints it with the usage text, exit 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int kExitUsage = 2;      // bad command line
constexpr int kExitFailure = 3;    // a run that could not complete (bad weights file, no memory)
constexpr int kExitNoDevice = 77;  // CUDA program without a CUDA device (ctest SKIP_RETURN_CODE)

struct Options {
  Attention attention = Attention::softmax;
  int m = 128;  // landmarks (nystrom), random features (favor) or proxy tokens (proxy)
  std::vector<int64_t> lengths{1024, 2048, 4096, 8192};
  int64_t batch = 2;
  int classes = 2;
  uint64_t seed = 1;        // weights (unless --weights) and, by default, input tokens
  uint64_t input_seed = 1;  // tokens
  int threads = 0;          // 0: OpenMP's default
  double min_time = 1.0;    // seconds of timed forward passes per length (at least one pass)
  std::string weights, save_weights;
  bool help = false;
};

inline const char* usage_text() {
  return "usage: lra_encoder [options]\n"
         "  Forward pass of the Long Range Arena encoder (byte tokens, 2 pre-LN layers, 64 dims,\n"
         "  2 heads, FFN 128, mean pooling, classifier) on random token sequences; prints\n"
         "  sequences/s and memory per sequence for each length.\n"
         "  --attention A      softmax | nystrom | favor | proxy          (default softmax)\n"
         "  --landmarks M      landmarks / random features / proxy tokens (default 128);\n"
         "                     --features and --proxies are the same option\n"
         "  --lengths L,L,...  sequence lengths, e.g. 1024,2048 or 1K,2K    (default 1K,2K,4K,8K)\n"
         "  --batch B          sequences per forward pass                    (default 2)\n"
         "  --classes C        classifier outputs of random weights          (default 2)\n"
         "  --seed S           seed of the random weights                    (default 1)\n"
         "  --input-seed S     seed of the random tokens                     (default: --seed)\n"
         "  --weights FILE     load weights from FILE (format: examples/lra/weights.hpp)\n"
         "  --save-weights FILE  write the weights in use to FILE\n"
         "  --threads T        CPU threads (0 = OpenMP default)              (default 0)\n"
         "  --min-time SEC     timed seconds per length, at least one pass   (default 1)\n"
         "  --help             this text\n";
}

namespace detail {

inline long long parse_int(const std::string& flag, const std::string& text, long long lo, long long hi) {
  std::string digits = text;
  long long unit = 1;
  if (!digits.empty() && (digits.back() == 'K' || digits.back() == 'k')) {  // 8K = 8192
    unit = 1024;
    digits.pop_back();
  }
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(digits.c_str(), &end, 10);
  if (digits.empty() || *end != '\0' || errno != 0 || v > hi / unit || v * unit < lo)
    throw UsageError(flag + " " + text + ": expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                     "]");
  return v * unit;
}

inline std::vector<int64_t> parse_lengths(const std::string& flag, const std::string& text) {
  std::vector<int64_t> out;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string item = text.substr(start, comma - start);
    try {
      out.push_back(parse_int(flag, item, 1, int64_t(1) << 20));
    } catch (const UsageError&) {
      throw UsageError(flag + " " + text + ": '" + item + "' is not a length in [1, 1048576] (e.g. 1024 or 1K)");
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace detail

/// Parses argv; throws UsageError naming the offending flag and value.
inline Options parse_options(int argc, char** argv) {
  Options o;
  bool input_seed_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      o.help = true;
      continue;
    }
    if (i + 1 >= argc) throw UsageError(flag == "" ? "empty argument" : flag + ": missing value or unknown option");
    const std::string value = argv[++i];
    if (flag == "--attention") {
      const Attention all[] = {Attention::softmax, Attention::nystrom, Attention::favor, Attention::proxy};
      const auto it =
          std::find_if(std::begin(all), std::end(all), [&](Attention a) { return value == attention_name(a); });
      if (it == std::end(all)) throw UsageError("--attention " + value + ": expected softmax, nystrom, favor or proxy");
      o.attention = *it;
    } else if (flag == "--landmarks" || flag == "--features" || flag == "--proxies") {
      o.m = static_cast<int>(detail::parse_int(flag, value, 1, 4096));
    } else if (flag == "--lengths") {
      o.lengths = detail::parse_lengths(flag, value);
    } else if (flag == "--batch") {
      o.batch = detail::parse_int(flag, value, 1, 4096);
    } else if (flag == "--classes") {
      o.classes = static_cast<int>(detail::parse_int(flag, value, 1, 1000));
    } else if (flag == "--seed") {
      o.seed = static_cast<uint64_t>(detail::parse_int(flag, value, 0, INT64_MAX));
    } else if (flag == "--input-seed") {
      o.input_seed = static_cast<uint64_t>(detail::parse_int(flag, value, 0, INT64_MAX));
      input_seed_given = true;
    } else if (flag == "--weights") {
      o.weights = value;
    } else if (flag == "--save-weights") {
      o.save_weights = value;
    } else if (flag == "--threads") {
      o.threads = static_cast<int>(detail::parse_int(flag, value, 0, 1024));
    } else if (flag == "--min-time") {
      char* end = nullptr;
      o.min_time = std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !(o.min_time >= 0 && o.min_time <= 3600))
        throw UsageError("--min-time " + value + ": expected seconds in [0, 3600]");
    } else {
      throw UsageError("unknown option " + flag);
    }
  }
  if (!input_seed_given) o.input_seed = o.seed;
  return o;
}

/// Random byte tokens [batch * length], the same for a seed on every platform.
inline std::vector<int32_t> random_tokens(uint64_t seed, int64_t batch, int64_t length, int vocab) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  std::vector<int32_t> t(static_cast<size_t>(batch * length));
  for (auto& x : t) {
    s ^= s >> 33, s *= 0xFF51AFD7ED558CCDull, s ^= s >> 29, s += 0x9E3779B97F4A7C15ull;  // splitmix-like
    x = static_cast<int32_t>((s >> 32) % static_cast<uint64_t>(vocab));
  }
  return t;
}

/// Times model.forward over the lengths and prints the table. Model provides
///   void forward(const std::vector<int32_t>& tokens, int64_t batch, int64_t length, std::vector<float>& logits)
///     (returns when the logits are on the host),
///   size_t bytes_per_sequence(int64_t batch, int64_t length) const, int vocab() const, int classes() const.
template <class Model>
void run_lengths(const Options& o, Model& model) {
  using clock = std::chrono::steady_clock;
  std::printf("%8s %12s %12s %18s\n", "length", "seq/s", "ms/batch", "memory/seq (MiB)");
  std::vector<float> logits, first_logits;
  for (const int64_t n : o.lengths) {
    const std::vector<int32_t> tokens =
        random_tokens(o.input_seed ^ static_cast<uint64_t>(n), o.batch, n, model.vocab());
    model.forward(tokens, o.batch, n, logits);  // warm-up: first-touch of buffers, thread start
    if (first_logits.empty()) first_logits = logits;
    int64_t passes = 0;
    const auto t0 = clock::now();
    double elapsed = 0;
    do {
      model.forward(tokens, o.batch, n, logits);
      ++passes;
      elapsed = std::chrono::duration<double>(clock::now() - t0).count();
    } while (elapsed < o.min_time);
    std::printf("%8lld %12.2f %12.2f %18.2f\n", static_cast<long long>(n), double(passes * o.batch) / elapsed,
                1e3 * elapsed / double(passes), double(model.bytes_per_sequence(o.batch, n)) / (1024.0 * 1024.0));
    std::fflush(stdout);
  }
  // Printed so that two runs (e.g. saved and reloaded weights) can be compared exactly.
  std::printf("logits of sequence 0 at length %lld:", static_cast<long long>(o.lengths.front()));
  for (int c = 0; c < model.classes(); ++c) std::printf(" %.6e", double(first_logits[static_cast<size_t>(c)]));
  std::printf("\n");
}

}  // namespace lra
