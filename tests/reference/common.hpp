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

inline double default_scale(float scale, int64_t d) { return scale == 0 ? 1.0 / std::sqrt(double(d)) : scale; }

/// Contiguous [B, H, N, Dv] result, and its element accessor.
struct Result {
  int64_t B = 0, H = 0, N = 0, Dv = 0;
  std::vector<double> a;
  Result(int64_t b, int64_t h, int64_t n, int64_t dv) : B(b), H(h), N(n), Dv(dv), a(static_cast<size_t>(b * h * n * dv), 0.0) {}
  double& operator()(int64_t b, int64_t h, int64_t i, int64_t c) { return a[static_cast<size_t>(((b * H + h) * N + i) * Dv + c)]; }
  double operator()(int64_t b, int64_t h, int64_t i, int64_t c) const {
    return a[static_cast<size_t>(((b * H + h) * N + i) * Dv + c)];
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

}  // namespace ref
