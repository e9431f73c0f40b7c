// Float64 naive references, written from DESIGN.md's formulas and not from the fast code.
// Each takes views of any element type, computes in double and returns a contiguous
// [B, H, Nq, Dv] result.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "effattn/core.hpp"

namespace ref {

using effattn::Masks;
using effattn::Tensor;

/// A dense double matrix, row-major.
struct Mat {
  int64_t rows = 0, cols = 0;
  std::vector<double> a;
  Mat() = default;
  Mat(int64_t r, int64_t c, double fill = 0) : rows(r), cols(c), a(static_cast<size_t>(r * c), fill) {}
  double& operator()(int64_t r, int64_t c) { return a[static_cast<size_t>(r * cols + c)]; }
  double operator()(int64_t r, int64_t c) const { return a[static_cast<size_t>(r * cols + c)]; }
};

/// Element (b, h, s, d) of a view, as double (works for any arithmetic-convertible T).
template <class T>
double at(const Tensor<T>& t, int64_t b, int64_t h, int64_t s, int64_t d) {
  return static_cast<double>(static_cast<float>(t(b, h, s, d)));
}
inline double at(const Tensor<const double>& t, int64_t b, int64_t h, int64_t s, int64_t d) { return t(b, h, s, d); }
inline double at(const Tensor<double>& t, int64_t b, int64_t h, int64_t s, int64_t d) { return t(b, h, s, d); }

/// The [N, D] matrix of head h in batch b.
template <class T>
Mat head(const Tensor<T>& t, int64_t b, int64_t h) {
  Mat m(t.shape[2], t.shape[3]);
  for (int64_t i = 0; i < m.rows; ++i)
    for (int64_t c = 0; c < m.cols; ++c) m(i, c) = at(t, b, h, i, c);
  return m;
}

inline bool valid(const uint8_t* mask, int64_t batch_stride, int64_t b, int64_t i) {
  return mask == nullptr || mask[b * batch_stride + i] != 0;
}

inline double default_scale(double scale, int64_t d) { return scale == 0 ? 1.0 / std::sqrt(double(d)) : scale; }

/// Contiguous [B, H, N, Dv] result, and its element accessor.
struct Result {
  int64_t B = 0, H = 0, N = 0, Dv = 0;
  std::vector<double> a;
  Result(int64_t b, int64_t h, int64_t n, int64_t dv) : B(b), H(h), N(n), Dv(dv), a(static_cast<size_t>(b * h * n * dv), 0.0) {}
  double& operator()(int64_t b, int64_t h, int64_t i, int64_t c) { return a[static_cast<size_t>(((b * H + h) * N + i) * Dv + c)]; }
  double operator()(int64_t b, int64_t h, int64_t i, int64_t c) const {
    return a[static_cast<size_t>(((b * H + h) * N + i) * Dv + c)];
  }
  /// Adds the [N, Dv] matrix m to head (b, h).
  template <class M>
  void add_head(int64_t b, int64_t h, const M& m) {
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < Dv; ++c) (*this)(b, h, i, c) += m(i, c);
  }
};

/// Row-wise softmax of s * A Bᵀ over the columns where allowed(i, j); rows with none are zero.
template <class Allowed>
Mat softmax_rows(const Mat& A, const Mat& Bm, double s, Allowed allowed) {
  Mat P(A.rows, Bm.rows);
  for (int64_t i = 0; i < A.rows; ++i) {
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < Bm.rows; ++j) {
      if (!allowed(i, j)) continue;
      double dot = 0;
      for (int64_t c = 0; c < A.cols; ++c) dot += A(i, c) * Bm(j, c);
      P(i, j) = s * dot;
      mx = std::max(mx, P(i, j));
    }
    double sum = 0;
    for (int64_t j = 0; j < Bm.rows; ++j) {
      P(i, j) = allowed(i, j) ? std::exp(P(i, j) - mx) : 0.0;
      sum += P(i, j);
    }
    for (int64_t j = 0; j < Bm.rows; ++j) P(i, j) = sum > 0 ? P(i, j) / sum : 0.0;
  }
  return P;
}

inline Mat transpose(const Mat& A) {
  Mat T(A.cols, A.rows);
  for (int64_t i = 0; i < A.rows; ++i)
    for (int64_t j = 0; j < A.cols; ++j) T(j, i) = A(i, j);
  return T;
}

inline Mat matmul(const Mat& A, const Mat& Bm) {
  Mat C(A.rows, Bm.cols);
  for (int64_t i = 0; i < A.rows; ++i)
    for (int64_t k = 0; k < A.cols; ++k) {
      const double a = A(i, k);
      if (a == 0) continue;
      for (int64_t j = 0; j < Bm.cols; ++j) C(i, j) += a * Bm(k, j);
    }
  return C;
}

/// The gradients of one call, each a contiguous [B, H, N, D] array shaped like its input.
struct GradSet {
  Result dq{0, 0, 0, 0}, dk{0, 0, 0, 0}, dv{0, 0, 0, 0}, dproxy_q{0, 0, 0, 0}, dproxy_k{0, 0, 0, 0};
};

template <class T>
Result shaped_like(const Tensor<T>& t) {
  return Result(t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
}

/// A reference backward's result: the gradients, and `size`, the same computation done on the
/// absolute values of every term (|a|·|b| for each product, |a| + |b| for each sum). Rounding in
/// any evaluation is at most a modest multiple of eps · size, so comparisons are made relative to
/// max(size): exact zeros and cancellations (a row with one key has dq = 0) cannot demand more
/// digits than any arithmetic has.
struct Grads : GradSet {
  GradSet size;
  Grads() = default;
  template <class T>
  Grads(const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v) {
    for (GradSet* g : {static_cast<GradSet*>(this), &size}) {
      g->dq = shaped_like(q);
      g->dk = shaped_like(k);
      g->dv = shaped_like(v);
    }
  }
};

inline Mat absolute(Mat m) {
  for (double& x : m.a) x = std::abs(x);
  return m;
}

/// The backward of P = softmax_row(s A Bᵀ) (masked entries fixed at 0) followed by O = P V, for an
/// upstream dO: dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dA = s dS B, dB = s dSᵀ A.
/// `magnitude`: the same with every term's absolute value (see Grads::size).
struct SoftmaxGrad {
  Mat dA, dB, dV, dS;
};
inline SoftmaxGrad softmax_rows_backward(const Mat& P, const Mat& A_in, const Mat& B_in, const Mat& V_in,
                                         const Mat& dO_in, double s, bool magnitude = false) {
  const Mat A = magnitude ? absolute(A_in) : A_in, Bm = magnitude ? absolute(B_in) : B_in;
  const Mat V = magnitude ? absolute(V_in) : V_in, dO = magnitude ? absolute(dO_in) : dO_in;
  const Mat O = matmul(P, V);
  const Mat dP = matmul(dO, transpose(V));
  Mat dS(P.rows, P.cols);
  for (int64_t i = 0; i < P.rows; ++i) {
    double delta = 0;
    for (int64_t c = 0; c < O.cols; ++c) delta += dO(i, c) * O(i, c);
    for (int64_t j = 0; j < P.cols; ++j) dS(i, j) = P(i, j) * (magnitude ? dP(i, j) + delta : dP(i, j) - delta);
  }
  SoftmaxGrad g{matmul(dS, Bm), matmul(transpose(dS), A), matmul(transpose(P), dO), dS};
  for (double& x : g.dA.a) x *= std::abs(s);
  for (double& x : g.dB.a) x *= std::abs(s);
  return g;
}

}  // namespace ref
