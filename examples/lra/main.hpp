// main() of lra_encoder and lra_encoder_cuda: command line, weights, error handling and exit
// codes, around the backend's model. Free of Eigen and CUDA.
#pragma once
#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include "lra/options.hpp"
#include "lra/weights.hpp"

namespace lra {

/// Parses the command line, then (unless --help) returns `no_device()` if it is non-zero, else
/// gets the weights (random or --weights), saves them if asked and calls
/// run(options, weights, header) where header describes the run in one line for the backend to
/// complete and print. Exit codes: 0 ok, 2 usage, 3 failure, or no_device()'s code.
template <class NoDevice, class Run>
int main_with(int argc, char** argv, const char* program, NoDevice&& no_device, Run&& run) {
  Options o;
  try {
    o = parse_options(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s\n%s", program, e.what(), usage_text());
    return kExitUsage;
  }
  if (o.help) {
    std::printf("%s", usage_text());
    return 0;
  }
  if (const int code = no_device()) return code;
  try {
    Config config;
    config.classes = o.classes;
    const Weights w = o.weights.empty() ? random_weights(config, o.attention, o.m, o.seed)
                                        : load_weights(o.weights, o.attention, o.m);
    if (!o.save_weights.empty()) save_weights(o.save_weights, w);
    const Config& c = w.config;
    std::string setup = std::string("attention ") + attention_name(o.attention);
    if (o.attention != Attention::softmax) setup += " with M = " + std::to_string(o.m);
    setup += ", batch " + std::to_string(o.batch) + "\nmodel: " + std::to_string(c.layers) + " layers, " +
             std::to_string(c.embed) + " dims, " + std::to_string(c.heads) + " heads, FFN " + std::to_string(c.hidden) +
             ", vocab " + std::to_string(c.vocab) + ", " + std::to_string(c.classes) + " classes; weights " +
             (o.weights.empty() ? "random, seed " + std::to_string(o.seed) : o.weights) + ", " +
             std::to_string(w.bytes() / 1024) + " KiB";
    if (!o.save_weights.empty()) setup += "\nweights saved to " + o.save_weights;
    run(o, w, setup);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: out of memory (try a smaller --batch or --lengths)\n", program);
    return kExitFailure;
  } catch (const std::exception& e) {  // WeightsError, effattn::Error, CUDA and cuBLAS failures
    std::fprintf(stderr, "%s: %s\n", program, e.what());
    return kExitFailure;
  }
  return 0;
}

}  // namespace lra
