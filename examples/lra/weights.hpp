// Weights of the LRA encoder: named float32 tensors, random (seeded) or read from a file.
//
// Weights file format (all integers and floats little-endian, no padding, no alignment):
//   char[8]   magic "EFFATTNW"
//   uint32    version = 1
//   uint32    vocab, embed, hidden, heads, layers, classes     (the model's sizes)
//   uint32    tensor count
//   per tensor:
//     uint32  name length, then the name's bytes (ASCII, no terminator), e.g. "layer0.ffn.w1"
//     uint32  rank, then int64 dims[rank]
//     float32 data[product of dims], row-major
// Tensors (E = embed, F = hidden, H = heads, Dh = E / H, M = landmarks/features/proxies, C = classes;
// a dense layer computes y = x W + b with W stored [in, out]):
//   embed.tokens [vocab, E]; positions are sinusoidal and not stored
//   layer{l}.ln1.gamma, .ln1.beta [E]; layer{l}.attn.wqkv [E, 3E] (columns q | k | v, head-major
//   within each), .attn.bqkv [3E], .attn.wo [E, E], .attn.bo [E];
//   proxy only: .attn.proxy_q, .attn.proxy_k [H, M, Dh]; favor only: .attn.favor_projection [H, M, Dh]
//   layer{l}.ln2.gamma, .ln2.beta [E]; .ffn.w1 [E, F], .ffn.b1 [F], .ffn.w2 [F, E], .ffn.b2 [E]
//   final_ln.gamma, final_ln.beta [E]; classifier.w [E, C], classifier.b [C]
// Tensors the chosen attention does not use are ignored; tensor order in the file is free.
// Write one with `lra_encoder --save-weights FILE` (any exporter can write the same layout).
#pragma once
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "lra/options.hpp"

namespace lra {

struct Config {
  int vocab = 256;  // byte-level tokens, as the LRA text task
  int embed = 64;
  int hidden = 128;
  int heads = 2;
  int layers = 2;
  int classes = 2;
  int head_dim() const { return embed / heads; }
};

/// Floats of activations one forward pass holds for `tokens` tokens of `sequences` sequences:
/// residual stream x [E], normalized h [E], fused qkv [3E], attention output [E], FFN hidden [F]
/// per token; pooled [E] and logits [C] per sequence. Shared with the CUDA program.
inline int64_t activation_floats(const Config& c, int64_t sequences, int64_t tokens) {
  return tokens * (6 * int64_t(c.embed) + c.hidden) + sequences * (int64_t(c.embed) + c.classes);
}

/// A weights file that cannot be read or does not fit the model; main reports it, exit 3.
struct WeightsError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Param {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);

struct Weights {
  Config config;
  std::map<std::string, Param> tensors;

  /// The tensor `name`, checked to have `shape`; throws WeightsError otherwise.
  const Param& get(const std::string& name, const Shape& shape) const;
  size_t bytes() const;
};

/// The tensors a model with this attention reads, in file order, with their shapes.
std::vector<std::pair<std::string, Shape>> expected_tensors(const Config& c, Attention a, int m);

/// Seeded random weights: dense W ~ U(+-1/sqrt(in)), biases 0, LayerNorm 1/0, embeddings and
/// proxies of unit variance, FAVOR+ projections from effattn::favor_projection.
Weights random_weights(const Config& c, Attention a, int m, uint64_t seed);

void save_weights(const std::string& path, const Weights& w);
/// Reads a weights file and checks that it holds every tensor of expected_tensors(config, a, m).
Weights load_weights(const std::string& path, Attention a, int m);

}  // namespace lra
