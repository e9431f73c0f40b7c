// The LRA encoder's forward pass on the CPU: Eigen matrix products for the dense layers and
// effattn::attention<Cpu> for the attention, reading q, k and v in place from the fused QKV
// projection through strided views.
#pragma once
#include <Eigen/Dense>
#include <cmath>
#include <cstdlib>
#include <effattn/effattn.hpp>
#include <memory>
#include <string>
#include <vector>

#include "lra/methods.hpp"
#include "lra/weights.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lra {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<RowMatrix>;
using ConstMatrixMap = Eigen::Map<const RowMatrix>;
using ConstRowMap = Eigen::Map<const Eigen::RowVectorXf>;
using RowMap = Eigen::Map<Eigen::RowVectorXf>;

class CpuEncoder {
 public:
  CpuEncoder(const Weights& w, Attention a, int m, int threads) : w_(w), c_(w.config), attention_(a), m_(m) {
    exec_.threads = threads;
    if (threads > 0) {
      Eigen::setNbThreads(threads);
#ifdef _OPENMP
      omp_set_num_threads(threads);
#endif
    }
    for (const auto& [name, shape] : expected_tensors(c_, a, m)) w_.get(name, shape);  // fail early
  }

  int vocab() const { return c_.vocab; }
  int classes() const { return c_.classes; }

  /// logits [batch, classes] of tokens [batch, length].
  void forward(const std::vector<int32_t>& tokens, int64_t batch, int64_t length, std::vector<float>& logits) {
    const int64_t T = batch * length, E = c_.embed, F = c_.hidden;
    acts_.resize(static_cast<size_t>(activation_floats(c_, batch, T)));
    float* x = acts_.data();
    float* h = x + T * E;
    float* qkv = h + T * E;
    float* att = qkv + T * 3 * E;
    float* ffn = att + T * E;
    float* pooled = ffn + T * F;
    float* out = pooled + batch * E;

    embed(tokens, batch, length, x);
    for (int l = 0; l < c_.layers; ++l) {
      const std::string p = "layer" + std::to_string(l) + ".";
      // x = x + Wo Attn(LN1(x))
      layer_norm(p + "ln1", x, h, T);
      dense(p + "attn.wqkv", p + "attn.bqkv", h, qkv, T);
      attend(l, qkv, att, batch, length);
      dense_residual(p + "attn.wo", p + "attn.bo", att, x, T);
      // x = x + W2 GELU(W1 LN2(x))
      layer_norm(p + "ln2", x, h, T);
      dense(p + "ffn.w1", p + "ffn.b1", h, ffn, T);
      for_rows(T, [&](int64_t r) {  // GELU, exact (erf) form
        for (float* z = ffn + r * F; z < ffn + (r + 1) * F; ++z) *z = 0.5f * *z * (1.0f + std::erf(*z * 0.70710678f));
      });
      dense_residual(p + "ffn.w2", p + "ffn.b2", ffn, x, T);
    }
    layer_norm("final_ln", x, h, T);
    for (int64_t b = 0; b < batch; ++b)
      RowMap(pooled + b * E, E) = ConstMatrixMap(h + b * length * E, length, E).colwise().mean();
    dense("classifier.w", "classifier.b", pooled, out, batch);
    logits.assign(out, out + batch * c_.classes);
  }

  /// Activations of one sequence plus its share of the attention workspace, in bytes, as the
  /// last forward(batch, length) allocated them. Weights are shared by the batch and not counted.
  size_t bytes_per_sequence(int64_t batch, int64_t length) const {
    const size_t activations = sizeof(float) * size_t(activation_floats(c_, batch, batch * length));
    return (activations + workspace_needed_) / size_t(batch);
  }

 private:
  const Param& param(const std::string& name) const { return w_.tensors.at(name); }
  ConstMatrixMap matrix(const std::string& name) const {
    const Param& p = param(name);
    return ConstMatrixMap(p.data.data(), p.shape[0], p.shape[1]);
  }
  ConstRowMap vector(const std::string& name) const {
    const Param& p = param(name);
    return ConstRowMap(p.data.data(), p.shape[0]);
  }

  template <class F>
  static void for_rows(int64_t rows, F&& f) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int64_t r = 0; r < rows; ++r) f(r);
  }

  // x[t] = embedding[token t] + sinusoidal position of t within its sequence.
  void embed(const std::vector<int32_t>& tokens, int64_t batch, int64_t length, float* x) const {
    const int64_t E = c_.embed;
    const float* table = param("embed.tokens").data.data();
    for_rows(batch * length, [&](int64_t t) {
      const int32_t tok = tokens[static_cast<size_t>(t)];
      const double pos = double(t % length);
      for (int64_t i = 0; i < E; ++i) {
        const double angle = pos * std::pow(10000.0, -double(i / 2 * 2) / double(E));
        x[t * E + i] = table[int64_t(tok) * E + i] + float(i % 2 == 0 ? std::sin(angle) : std::cos(angle));
      }
    });
  }

  void layer_norm(const std::string& name, const float* x, float* y, int64_t rows) const {
    const int64_t E = c_.embed;
    const ConstRowMap gamma = vector(name + ".gamma"), beta = vector(name + ".beta");
    for_rows(rows, [&](int64_t r) {
      const ConstRowMap in(x + r * E, E);
      const float mean = in.mean();
      const float var = (in.array() - mean).square().mean();
      RowMap(y + r * E, E) = ((in.array() - mean) / std::sqrt(var + 1e-5f) * gamma.array() + beta.array()).matrix();
    });
  }

  // y [rows, out] = x [rows, in] W + b
  void dense(const std::string& w, const std::string& b, const float* x, float* y, int64_t rows) const {
    const ConstMatrixMap W = matrix(w);
    MatrixMap Y(y, rows, W.cols());
    Y.noalias() = ConstMatrixMap(x, rows, W.rows()) * W;
    Y.rowwise() += vector(b);
  }
  // acc [rows, out] += x W + b
  void dense_residual(const std::string& w, const std::string& b, const float* x, float* acc, int64_t rows) const {
    const ConstMatrixMap W = matrix(w);
    MatrixMap Y(acc, rows, W.cols());
    Y.noalias() += ConstMatrixMap(x, rows, W.rows()) * W;
    Y.rowwise() += vector(b);
  }

  // att [B, N, H, Dh] = attention of the heads of qkv [B, N, 3, H, Dh], one call for the batch.
  void attend(int layer, const float* qkv, float* att, int64_t batch, int64_t length) {
    const int64_t H = c_.heads, Dh = c_.head_dim(), E = c_.embed, row = 3 * E;
    const auto part = [&](int64_t offset) {  // q, k or v: strided views into the fused projection
      return effattn::Tensor<const float>(qkv + offset, {batch, H, length, Dh}, {length * row, Dh, row, 1});
    };
    const effattn::Tensor<const float> q = part(0), k = part(E), v = part(2 * E);
    const effattn::Tensor<float> out = effattn::bshd(att, batch, length, H, Dh);
    const auto tensor = [&](const std::string& name) { return param(name).data.data(); };
    with_method(attention_, m_, c_, layer, tensor, [&](const auto& method) {
      workspace_needed_ = effattn::workspace_bytes<effattn::Cpu>(method, q, k, v, exec_);
      if (workspace_needed_ > workspace_size_) {  // caller-owned workspace: the library allocates nothing
        workspace_.reset(std::aligned_alloc(64, (workspace_needed_ + 63) / 64 * 64));
        if (!workspace_) throw std::bad_alloc();
        workspace_size_ = workspace_needed_;
      }
      effattn::Exec<effattn::Cpu> exec = exec_;
      exec.workspace = workspace_.get();
      exec.workspace_size = workspace_size_;
      effattn::attention<effattn::Cpu>(method, q, k, v, out, {}, exec);
    });
  }

  struct Free {
    void operator()(void* p) const { std::free(p); }
  };

  const Weights& w_;
  Config c_;
  Attention attention_;
  int m_;
  effattn::Exec<effattn::Cpu> exec_;
  std::vector<float> acts_;
  std::unique_ptr<void, Free> workspace_;
  size_t workspace_size_ = 0, workspace_needed_ = 0;
};

}  // namespace lra
