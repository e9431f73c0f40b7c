// Random initialization and the weights file reader/writer (format: weights.hpp). Plain C++, so
// that the CUDA program links it without compiling Eigen under nvcc.
#include "lra/weights.hpp"

#include <cmath>
#include <cstring>
#include <effattn/favor_projection.hpp>
#include <fstream>
#include <random>

namespace lra {
namespace {

constexpr char kMagic[8] = {'E', 'F', 'F', 'A', 'T', 'T', 'N', 'W'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kMaxSize = 1u << 24;  // a bound on every stored size, so a corrupt file fails early

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (const int64_t d : s) n *= d;
  return n;
}

// The file is little-endian; this program stores host order, so refuse big-endian hosts loudly.
bool host_is_little_endian() {
  const uint32_t one = 1;
  unsigned char first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

class Reader {
 public:
  Reader(const std::string& path) : path_(path), in_(path, std::ios::binary) {
    if (!in_) throw WeightsError(path + ": cannot open for reading");
    in_.seekg(0, std::ios::end);
    remaining_ = static_cast<int64_t>(in_.tellg());
    in_.seekg(0, std::ios::beg);
  }
  void bytes(void* dst, int64_t n, const char* what) {
    if (n > remaining_ || !in_.read(static_cast<char*>(dst), n))
      throw WeightsError(path_ + ": file ends inside " + what + " (truncated or not a weights file)");
    remaining_ -= n;
  }
  uint32_t u32(const char* what) {
    uint32_t v;
    bytes(&v, sizeof v, what);
    return v;
  }
  int64_t remaining() const { return remaining_; }

 private:
  std::string path_;
  std::ifstream in_;
  int64_t remaining_ = 0;
};

class Writer {
 public:
  Writer(const std::string& path) : path_(path), out_(path, std::ios::binary | std::ios::trunc) {
    if (!out_) throw WeightsError(path + ": cannot open for writing");
  }
  void bytes(const void* src, size_t n) {
    if (!out_.write(static_cast<const char*>(src), static_cast<std::streamsize>(n)))
      throw WeightsError(path_ + ": write failed");
  }
  void u32(uint32_t v) { bytes(&v, sizeof v); }
  void close() {
    out_.close();
    if (!out_) throw WeightsError(path_ + ": write failed");
  }

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

const Param& Weights::get(const std::string& name, const Shape& shape) const {
  const auto it = tensors.find(name);
  if (it == tensors.end()) throw WeightsError("weights: tensor " + name + " is missing");
  if (it->second.shape != shape)
    throw WeightsError("weights: tensor " + name + " has shape " + shape_str(it->second.shape) +
                       " but the model needs " + shape_str(shape));
  return it->second;
}

size_t Weights::bytes() const {
  size_t n = 0;
  for (const auto& t : tensors) n += t.second.data.size() * sizeof(float);
  return n;
}

std::vector<std::pair<std::string, Shape>> expected_tensors(const Config& c, Attention a, int m) {
  const int64_t E = c.embed, F = c.hidden, H = c.heads, Dh = c.head_dim();
  std::vector<std::pair<std::string, Shape>> t{{"embed.tokens", {c.vocab, E}}};
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "layer" + std::to_string(l) + ".";
    t.push_back({p + "ln1.gamma", {E}});
    t.push_back({p + "ln1.beta", {E}});
    t.push_back({p + "attn.wqkv", {E, 3 * E}});
    t.push_back({p + "attn.bqkv", {3 * E}});
    t.push_back({p + "attn.wo", {E, E}});
    t.push_back({p + "attn.bo", {E}});
    if (a == Attention::proxy) {
      t.push_back({p + "attn.proxy_q", {H, m, Dh}});
      t.push_back({p + "attn.proxy_k", {H, m, Dh}});
    }
    if (a == Attention::favor) t.push_back({p + "attn.favor_projection", {H, m, Dh}});
    t.push_back({p + "ln2.gamma", {E}});
    t.push_back({p + "ln2.beta", {E}});
    t.push_back({p + "ffn.w1", {E, F}});
    t.push_back({p + "ffn.b1", {F}});
    t.push_back({p + "ffn.w2", {F, E}});
    t.push_back({p + "ffn.b2", {E}});
  }
  t.push_back({"final_ln.gamma", {E}});
  t.push_back({"final_ln.beta", {E}});
  t.push_back({"classifier.w", {E, c.classes}});
  t.push_back({"classifier.b", {c.classes}});
  return t;
}

Weights random_weights(const Config& c, Attention a, int m, uint64_t seed) {
  Weights w;
  w.config = c;
  std::mt19937_64 gen(seed);  // mt19937_64 is fully specified by the standard: same numbers everywhere
  const auto uniform = [&](double bound) { return float(bound * (2.0 * double(gen() >> 11) * 0x1p-53 - 1.0)); };
  uint64_t projection_seed = seed;
  for (const auto& [name, shape] : expected_tensors(c, a, m)) {
    Param& p = w.tensors[name];
    p.shape = shape;
    p.data.resize(static_cast<size_t>(numel(shape)));
    if (ends_with(name, ".gamma")) {
      std::fill(p.data.begin(), p.data.end(), 1.0f);
    } else if (shape.size() == 1) {  // LayerNorm betas and dense biases
      std::fill(p.data.begin(), p.data.end(), 0.0f);
    } else if (ends_with(name, "favor_projection")) {
      p.data = effattn::favor_projection(++projection_seed, c.heads, m, c.head_dim());
    } else if (ends_with(name, "embed.tokens") || name.find("proxy_") != std::string::npos) {
      for (auto& x : p.data) x = uniform(std::sqrt(3.0));  // unit variance
    } else {
      for (auto& x : p.data) x = uniform(1.0 / std::sqrt(double(shape[0])));
    }
  }
  return w;
}

void save_weights(const std::string& path, const Weights& w) {
  if (!host_is_little_endian()) throw WeightsError("weights files are little-endian; this host is not");
  Writer out(path);
  out.bytes(kMagic, sizeof kMagic);
  out.u32(kVersion);
  const Config& c = w.config;
  for (const int v : {c.vocab, c.embed, c.hidden, c.heads, c.layers, c.classes}) out.u32(static_cast<uint32_t>(v));
  out.u32(static_cast<uint32_t>(w.tensors.size()));
  for (const auto& [name, p] : w.tensors) {
    out.u32(static_cast<uint32_t>(name.size()));
    out.bytes(name.data(), name.size());
    out.u32(static_cast<uint32_t>(p.shape.size()));
    out.bytes(p.shape.data(), p.shape.size() * sizeof(int64_t));
    out.bytes(p.data.data(), p.data.size() * sizeof(float));
  }
  out.close();
}

Weights load_weights(const std::string& path, Attention a, int m) {
  if (!host_is_little_endian()) throw WeightsError("weights files are little-endian; this host is not");
  Reader in(path);
  char magic[8];
  in.bytes(magic, sizeof magic, "the header");
  if (std::memcmp(magic, kMagic, sizeof magic) != 0)
    throw WeightsError(path + ": not an effattn weights file (no EFFATTNW magic)");
  const uint32_t version = in.u32("the header");
  if (version != kVersion)
    throw WeightsError(path + ": weights file version " + std::to_string(version) + ", this program reads version " +
                       std::to_string(kVersion));
  Weights w;
  Config& c = w.config;
  const char* names[6] = {"vocab", "embed", "hidden", "heads", "layers", "classes"};
  int* fields[6] = {&c.vocab, &c.embed, &c.hidden, &c.heads, &c.layers, &c.classes};
  for (int i = 0; i < 6; ++i) {
    const uint32_t v = in.u32("the header");
    if (v < 1 || v > kMaxSize)
      throw WeightsError(path + ": " + names[i] + " = " + std::to_string(v) + " is out of range");
    *fields[i] = static_cast<int>(v);
  }
  if (c.embed % c.heads != 0)
    throw WeightsError(path + ": embed = " + std::to_string(c.embed) +
                       " is not a multiple of heads = " + std::to_string(c.heads));
  const uint32_t count = in.u32("the header");
  for (uint32_t t = 0; t < count; ++t) {
    const uint32_t name_length = in.u32("a tensor name");
    if (name_length < 1 || name_length > 256)
      throw WeightsError(path + ": tensor " + std::to_string(t) + " has a bad name length");
    std::string name(name_length, '\0');
    in.bytes(name.data(), name_length, "a tensor name");
    const uint32_t rank = in.u32("a tensor shape");
    if (rank < 1 || rank > 8) throw WeightsError(path + ": tensor " + name + " has rank " + std::to_string(rank));
    Param p;
    p.shape.resize(rank);
    in.bytes(p.shape.data(), int64_t(rank) * int64_t(sizeof(int64_t)), "a tensor shape");
    int64_t n = 1;
    for (const int64_t d : p.shape) {
      if (d < 1 || d > kMaxSize || n * d > in.remaining() / int64_t(sizeof(float)))
        throw WeightsError(path + ": tensor " + name + " has shape " + shape_str(p.shape) +
                           ", more data than the file holds");
      n *= d;
    }
    p.data.resize(static_cast<size_t>(n));
    in.bytes(p.data.data(), n * int64_t(sizeof(float)), ("tensor " + name).c_str());
    if (!w.tensors.emplace(name, std::move(p)).second) throw WeightsError(path + ": tensor " + name + " appears twice");
  }
  if (in.remaining() != 0)
    throw WeightsError(path + ": " + std::to_string(in.remaining()) + " bytes after the last tensor");
  for (const auto& [name, shape] : expected_tensors(c, a, m)) {
    try {
      w.get(name, shape);
    } catch (const WeightsError& e) {
      throw WeightsError(
          path + ": " + e.what() +
          (name.find("attn.proxy") != std::string::npos || name.find("favor") != std::string::npos
               ? " (for --attention " + std::string(attention_name(a)) + " with --landmarks " + std::to_string(m) + ")"
               : ""));
    }
  }
  return w;
}

}  // namespace lra
