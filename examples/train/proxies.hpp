// The testable pieces of examples/train_proxies.cpp: the input distribution (clustered token
// embeddings), the contrastive loss on proxies with its gradient, Adam, segment means and the
// redundancy measure. Plain C++ templates on the element type, so the tests run them in double.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace train {

// ---- Inputs: clustered token embeddings -----------------------------------------------------------
// Every token has a type z (one of `clusters`), drawn like words of text: type frequencies
// follow Zipf's law (p(c) ∝ 1/(c+1)^zipf), and types come in runs (the next token keeps the
// type with probability `stay`, else draws a fresh one), as topics and repeated words do. Per
// head h, the type has a center mu[h][z] in R^D shared by q and k (tokens attend to tokens of
// their own type, the retrieval pattern of trained heads) and a value center nu[h][z] in R^Dv;
// each token adds independent Gaussian noise to all three. The centers are fixed by the seed of
// the distribution; sequences are drawn from a caller's generator.
struct ClusterSpec {
  int clusters = 64;
  double zipf = 1.0;
  double stay = 0.9;
  double center_std = 0.7;  // entries of mu; same-type logits ~ s |mu|^2 = sqrt(D) center_std^2
  double value_std = 1.0;   // entries of nu
  double noise_std = 0.3;   // per-token noise on q, k and v
};

class ClusteredTokens {
 public:
  ClusteredTokens(const ClusterSpec& spec, int64_t heads, int64_t dim, int64_t value_dim, uint64_t seed)
      : spec_(spec), H_(heads), D_(dim), Dv_(value_dim) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> center(0.0, spec.center_std), value(0.0, spec.value_std);
    mu_.resize(static_cast<size_t>(H_ * spec.clusters * D_));
    nu_.resize(static_cast<size_t>(H_ * spec.clusters * Dv_));
    for (double& x : mu_) x = center(gen);
    for (double& x : nu_) x = value(gen);
    for (int c = 0; c < spec.clusters; ++c) weights_.push_back(std::pow(c + 1.0, -spec.zipf));
  }

  int64_t heads() const { return H_; }
  int64_t dim() const { return D_; }
  int64_t value_dim() const { return Dv_; }
  const ClusterSpec& spec() const { return spec_; }

  /// Type sequence of one sequence of `length` tokens.
  std::vector<int> labels(std::mt19937_64& gen, int64_t length) const {
    std::discrete_distribution<int> draw(weights_.begin(), weights_.end());
    std::bernoulli_distribution keep(spec_.stay);
    std::vector<int> z(static_cast<size_t>(length));
    for (int64_t i = 0; i < length; ++i) z[i] = i > 0 && keep(gen) ? z[i - 1] : draw(gen);
    return z;
  }

  /// q, k [batch, H, length, D] and v [batch, H, length, Dv], contiguous; labels [batch, length]
  /// when given (the same types for every head).
  template <class T>
  void sample(std::mt19937_64& gen, int64_t batch, int64_t length, T* q, T* k, T* v, int* labels_out = nullptr) const {
    std::normal_distribution<double> noise(0.0, spec_.noise_std);
    const int C = spec_.clusters;
    for (int64_t b = 0; b < batch; ++b) {
      const std::vector<int> z = labels(gen, length);
      if (labels_out != nullptr) std::copy(z.begin(), z.end(), labels_out + b * length);
      for (int64_t h = 0; h < H_; ++h)
        for (int64_t i = 0; i < length; ++i) {
          const double* m = &mu_[static_cast<size_t>((h * C + z[i]) * D_)];
          const double* n = &nu_[static_cast<size_t>((h * C + z[i]) * Dv_)];
          const int64_t row = (b * H_ + h) * length + i;
          for (int64_t d = 0; d < D_; ++d) q[row * D_ + d] = static_cast<T>(m[d] + noise(gen));
          for (int64_t d = 0; d < D_; ++d) k[row * D_ + d] = static_cast<T>(m[d] + noise(gen));
          for (int64_t d = 0; d < Dv_; ++d) v[row * Dv_ + d] = static_cast<T>(n[d] + noise(gen));
        }
    }
  }

 private:
  ClusterSpec spec_;
  int64_t H_, D_, Dv_;
  std::vector<double> mu_, nu_, weights_;
};

// ---- Landmarks ----------------------------------------------------------------------------------

/// Nyström's landmarks of x [N, D] (row-major): segment i is [floor(i N / M), floor((i+1) N / M)),
/// the library's segments (DESIGN.md); means [M, D]. An empty segment (N < M) gives a zero row.
template <class T, class U>
void segment_means(const T* x, int64_t N, int64_t D, int64_t M, U* means) {
  for (int64_t i = 0; i < M; ++i) {
    const int64_t r0 = i * N / M, r1 = (i + 1) * N / M;
    for (int64_t d = 0; d < D; ++d) {
      double s = 0;
      for (int64_t r = r0; r < r1; ++r) s += static_cast<double>(x[r * D + d]);
      means[i * D + d] = static_cast<U>(r1 > r0 ? s / double(r1 - r0) : 0.0);
    }
  }
}

/// Mean cosine similarity over the M (M − 1) ordered pairs i != j of the rows of p [M, D]: the
/// redundancy of a landmark set (1: all parallel; the least possible is −1/(M − 1)). 0 for M = 1.
template <class T>
double mean_pairwise_cosine(const T* p, int64_t M, int64_t D) {
  if (M < 2) return 0;
  std::vector<double> u(static_cast<size_t>(M * D));
  for (int64_t i = 0; i < M; ++i) {
    double n2 = 0;
    for (int64_t d = 0; d < D; ++d) n2 += double(p[i * D + d]) * double(p[i * D + d]);
    const double inv = 1.0 / std::max(std::sqrt(n2), 1e-30);
    for (int64_t d = 0; d < D; ++d) u[i * D + d] = double(p[i * D + d]) * inv;
  }
  double sum = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = i + 1; j < M; ++j) {
      double c = 0;
      for (int64_t d = 0; d < D; ++d) c += u[i * D + d] * u[j * D + d];
      sum += 2 * c;
    }
  return sum / double(M * (M - 1));
}

// ---- Contrastive loss on one proxy set ------------------------------------------------------------
// Our reading of Proxyformer's contrastive term (its formula is not public): InfoNCE in which
// each proxy is its own positive and the other proxies of the same set are the negatives. With
// u_i = p_i / |p_i|, S_ij = u_i · u_j and temperature tau,
//   L(P) = (1/M) sum_i −log( exp(S_ii / tau) / sum_j exp(S_ij / tau) )
//        = (1/M) sum_i [ log sum_j exp(S_ij / tau) − 1 / tau ]      (S_ii = 1)
// It is >= 0, scale-free in each p_i, and falls as distinct proxies point apart. Gradient, with
// A = softmax_row(S / tau) (the diagonal included; S_ii is constant and has none):
//   g_i = dL/du_i = (1 / (M tau)) sum_{j != i} (A_ij + A_ji) u_j
//   dL/dp_i = (g_i − (u_i · g_i) u_i) / |p_i|      (the radial part vanishes)

/// L(P) of p [M, D]; with grad != nullptr writes dL/dp [M, D] there (grad = weight · dL/dp added
/// when accumulate is true). Computed in double whatever T is.
template <class T>
double contrastive_loss(const T* p, int64_t M, int64_t D, double tau, T* grad = nullptr, double weight = 1.0,
                        bool accumulate = false) {
  std::vector<double> u(static_cast<size_t>(M * D)), norm(static_cast<size_t>(M)), A(static_cast<size_t>(M * M));
  for (int64_t i = 0; i < M; ++i) {
    double n2 = 0;
    for (int64_t d = 0; d < D; ++d) n2 += double(p[i * D + d]) * double(p[i * D + d]);
    norm[i] = std::max(std::sqrt(n2), 1e-30);
    for (int64_t d = 0; d < D; ++d) u[i * D + d] = double(p[i * D + d]) / norm[i];
  }
  double loss = 0;
  for (int64_t i = 0; i < M; ++i) {
    double* a = &A[static_cast<size_t>(i * M)];
    double top = -INFINITY;
    for (int64_t j = 0; j < M; ++j) {
      double s = 1.0;
      if (j != i) {
        s = 0;
        for (int64_t d = 0; d < D; ++d) s += u[i * D + d] * u[j * D + d];
      }
      a[j] = s / tau;
      top = std::max(top, a[j]);
    }
    double z = 0;
    for (int64_t j = 0; j < M; ++j) z += (a[j] = std::exp(a[j] - top));
    for (int64_t j = 0; j < M; ++j) a[j] /= z;
    loss += top + std::log(z) - 1.0 / tau;
  }
  loss /= double(M);
  if (grad == nullptr) return loss;
  std::vector<double> g(static_cast<size_t>(D));
  for (int64_t i = 0; i < M; ++i) {
    std::fill(g.begin(), g.end(), 0.0);
    for (int64_t j = 0; j < M; ++j) {
      if (j == i) continue;
      const double c = (A[i * M + j] + A[j * M + i]) / (double(M) * tau);
      for (int64_t d = 0; d < D; ++d) g[d] += c * u[j * D + d];
    }
    double radial = 0;
    for (int64_t d = 0; d < D; ++d) radial += u[i * D + d] * g[d];
    for (int64_t d = 0; d < D; ++d) {
      const double gp = weight * (g[d] - radial * u[i * D + d]) / norm[i];
      grad[i * D + d] = static_cast<T>((accumulate ? double(grad[i * D + d]) : 0.0) + gp);
    }
  }
  return loss;
}

// ---- Adam -------------------------------------------------------------------------------------------
// Kingma & Ba's Adam with bias correction; moments in double.
struct Adam {
  double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::vector<double> m, v;
  int64_t t = 0;

  /// One step on x [n] with gradient g [n]: x -= lr m̂ / (sqrt(v̂) + eps).
  template <class T>
  void step(T* x, const T* g, size_t n) {
    if (m.size() != n) m.assign(n, 0.0), v.assign(n, 0.0), t = 0;
    ++t;
    const double c1 = 1.0 - std::pow(beta1, double(t)), c2 = 1.0 - std::pow(beta2, double(t));
    for (size_t i = 0; i < n; ++i) {
      const double gi = static_cast<double>(g[i]);
      m[i] = beta1 * m[i] + (1 - beta1) * gi;
      v[i] = beta2 * v[i] + (1 - beta2) * gi * gi;
      x[i] = static_cast<T>(double(x[i]) - lr * (m[i] / c1) / (std::sqrt(v[i] / c2) + eps));
    }
  }
};

}  // namespace train
